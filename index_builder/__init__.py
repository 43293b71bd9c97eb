"""From trained models to a published, versioned index bundle.

Not implemented yet: the index builder (FAISS indexes, recall check, atomic publish)
is tracked by its own issue. The package exists so that the layout is stable.
"""
