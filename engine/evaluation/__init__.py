"""Offline evaluation: metrics (:mod:`engine.evaluation.metrics`), a model's rating and
top-N metrics on a split beside simple peers (:mod:`engine.evaluation.offline`), and the
served two-stage pipeline on held-out data (:mod:`engine.evaluation.pipeline`)."""
