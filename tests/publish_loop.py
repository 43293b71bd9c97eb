"""Helper process for the crash-safety test: publishes bundles in a loop until killed.

Usage: python publish_loop.py MODELS_DIR BUNDLE_ROOT SEED
Prints "ready" once everything is loaded, then publishes forever.
"""

import sys

from engine import data
from engine.models.cf import CFModel
from engine.models.towers import TwoTowerModel
from index_builder.build import build_bundle

models, root, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
dataset = data.make_synthetic(n_users=120, n_items=80, n_ratings=2000, seed=seed)
cf, towers = CFModel.load(f"{models}/cf"), TwoTowerModel.load(f"{models}/towers")
print("ready", flush=True)
while True:
    build_bundle(dataset, cf, towers, root, keep=3, n_queries=50, log=lambda line: None)
