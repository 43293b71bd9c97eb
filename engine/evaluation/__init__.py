"""Offline evaluation: metrics (:mod:`engine.evaluation.metrics`), a model's rating and
top-N metrics on a split beside simple peers (:mod:`engine.evaluation.offline`), and the
whole two-stage pipeline on ML-100K's folds (:mod:`engine.evaluation.pipeline`)."""
