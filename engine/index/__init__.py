"""Vector indexes and the bundle: FAISS indexes built, tuned against exact search, saved
and loaded (:mod:`engine.index.faiss_index`), and the versioned, checksummed bundle
directory that the index builder publishes and the engine serves
(:mod:`engine.index.bundle`)."""
