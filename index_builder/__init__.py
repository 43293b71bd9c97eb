"""From trained models to a published, versioned index bundle.

``index_builder.build.build_bundle`` builds the FAISS indexes (recall-checked against
exact search), the serving tables and the manifest, and publishes atomically;
``python -m index_builder`` (= ``tandem build-index``, ``make index``) runs it from the
latest trained models. ``index_builder.train.train_and_publish`` is ``make train index`` as
one call: train both models on a dataset and publish their bundle.
"""

from index_builder.build import PublishRefused, build_bundle
from index_builder.train import train_and_publish

__all__ = ["build_bundle", "PublishRefused", "train_and_publish"]
