"""Models that learn embeddings: collaborative filtering (:mod:`engine.models.cf`), the
content-based two-tower network (:mod:`engine.models.towers`) with its feature pipelines
(:mod:`engine.models.features`), the shared training helpers
(:mod:`engine.models.training`) and the model directory format
(:mod:`engine.models.artifacts`)."""
