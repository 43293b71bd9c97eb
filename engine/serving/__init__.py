"""Two-stage serving: the served catalogue (:mod:`engine.serving.catalogue`), candidate
retrieval and its merge (:mod:`engine.serving.retrieval`, with the compiled lone-request
path :mod:`engine.serving.lone_merge`), exact ranking (:mod:`engine.serving.ranking`) and
the :class:`~engine.serving.engine.Engine` that runs them (:mod:`engine.serving.engine`)."""
