# Tandem — every target here works; see README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= auto
# The data flags of every target that reads data: DATA=path|synthetic, and side tables of
# your own attributes, ITEM_FEATURES=items.csv / USER_FEATURES=users.csv (see README).
SIDE_FLAGS = $(if $(ITEM_FEATURES),--item-features $(ITEM_FEATURES)) $(if $(USER_FEATURES),--user-features $(USER_FEATURES))
DATA_FLAGS = $(if $(filter auto,$(DATA)),,--data $(DATA)) $(SIDE_FLAGS)

.PHONY: help install install-bench test lint typecheck demo describe train index publish tune rollback serve web proto bench-serve bench-http train-cf eval-cf train-towers eval-towers bench-towers bench-ann bench-engine bench-feedback bench-milvus eval-pipeline bench-cf bench-cf-dist bench-cf-scale bench-shapes bench-train-time bench-live-items bench-synthetic clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml setup.py protos/tandem/v1/tandem.proto
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,dev,milvus]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install Tandem with its dev tools

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[train,dev,milvus,bench]"
	touch $@

install-bench: $(VENV)/.installed-bench  ## add the benchmark peers (scikit-surprise, implicit, hnswlib)

test: install  ## run the test suite
	$(PY) -m pytest -q

lint: install  ## ruff: lint and format check (configured in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install  ## mypy over engine/ and index_builder/ (configured in pyproject.toml)
	$(VENV)/bin/mypy

describe: install  ## describe the dataset (DATA=path|synthetic, default: ML-100K if present)
	$(VENV)/bin/tandem data describe $(if $(filter auto,$(DATA)),,$(DATA)) $(SIDE_FLAGS)

DIST ?= 1
train: install  ## retrain CF (topn preset), the towers (retrieval preset) and the learned ranker on the configured data, for serving (DIST=N: on N torchrun processes)
ifeq ($(DIST),1)
	$(VENV)/bin/tandem train --no-progress $(DATA_FLAGS)
else
	$(VENV)/bin/torchrun --nproc_per_node $(DIST) -m engine train --distributed --no-progress $(DATA_FLAGS)
endif

index: install  ## rebuild the indexes from the latest trained models (no retraining) and publish a bundle
	$(VENV)/bin/tandem build-index $(DATA_FLAGS)

publish: install  ## make train index in one command: train both models on all the data and publish a bundle
	$(VENV)/bin/tandem publish --no-progress $(DATA_FLAGS)

BUDGET ?= 10
tune: install  ## fit the serving settings to the data on a validation split of it (DATA=..., BUDGET=minutes)
	$(VENV)/bin/tandem tune --budget $(BUDGET) $(DATA_FLAGS)

rollback: install  ## point artifacts/bundles/current at the previous bundle version
	$(VENV)/bin/tandem rollback

serve: install  ## serve the published bundle over gRPC on server.port (hot reload; TANDEM_TOKEN for auth)
	$(VENV)/bin/tandem serve

HTTP_PORT ?= 8000
web: install  ## serve gRPC, and the HTTP/JSON API with the web page at http://127.0.0.1:8000/ (HTTP_PORT=... for another port)
	@echo "the web page: http://127.0.0.1:$(HTTP_PORT)/  (the API: /v1/..., its OpenAPI document: /openapi.json; Ctrl-C stops)"
	$(VENV)/bin/tandem serve --http-port $(HTTP_PORT)

proto: install  ## regenerate engine/service/rpc from protos/tandem/v1/tandem.proto (generated at install, not committed)
	$(PY) protos/generate.py

bench-serve: install  ## B5: Recommend / SimilarItems / Echo QPS and p50/p99 at 1, 4, 16 clients, 100k items, 1 and 2 server processes
	$(PY) bench/serve.py

bench-http: install  ## B5 for the HTTP/JSON face beside gRPC: Recommend p50/p99 and QPS at 1, 4, 16 clients, 100k items, one process
	$(PY) bench/serve_http.py

train-cf: install  ## train the CF model on the configured data and split (artifacts/models/cf)
	$(VENV)/bin/tandem train-cf $(DATA_FLAGS)

eval-cf: install  ## evaluate the trained CF model (JSON metrics)
	$(VENV)/bin/tandem eval-cf $(DATA_FLAGS)

train-towers: install  ## train the two-tower model (softmax objective) on the configured data and split
	$(VENV)/bin/tandem train-towers --objective softmax $(DATA_FLAGS)

eval-towers: install  ## evaluate the trained two-tower model (JSON metrics)
	$(VENV)/bin/tandem eval-towers $(DATA_FLAGS)

bench-towers: install  ## B1-B3 for the towers beside popularity baselines, and inference latency
	$(PY) bench/towers.py

bench-ann: install  ## B4: exact vs HNSW vs IVF on 1M clustered vectors and on ML-100K CF vectors
	$(PY) bench/ann.py

bench-engine: install  ## in-process recommend latency and batch throughput on a 100k-item catalogue (table and live-event users)
	$(PY) bench/engine_latency.py

bench-milvus: install  ## the Milvus backend (Milvus Lite) beside FAISS: recall@10, QPS, filter strategies, engine latency
	$(PY) bench/milvus.py

bench-feedback: install  ## RecordFeedback events/s (100-event batches, fsync), SIGKILL trials (events lost), memory per million events
	$(PY) bench/feedback.py

SPLIT ?= folds
eval-pipeline: install-bench  ## the two-stage pipeline beside popularity, implicit ALS and EASE (DATA=..., SPLIT=folds|u1..u5|temporal|random|last)
	$(VENV)/bin/tandem eval-pipeline --split $(SPLIT) $(DATA_FLAGS)

bench-cf: install-bench  ## B1 + B2: CF on ML-100K u1..u5 beside surprise SVD/SVD++, popularity, implicit ALS
	$(PY) bench/cf.py

bench-cf-dist: install  ## one CF epoch on synthetic 20M ratings, read as user parts, with 1 and 2 torchrun processes (ratings/s, RSS per rank, efficiency)
	$(PY) bench/cf_dist.py

bench-cf-scale: install  ## B6: one CF epoch on synthetic 20M ratings (ratings/s, peak RSS)
	$(PY) bench/cf_scale.py

bench-shapes: install-bench  ## the pipeline beside popularity, implicit ALS and EASE on three synthetic shapes (explicit 1k items, implicit 16k, implicit 3k without features)
	$(PY) bench/shapes.py

bench-live-items: install  ## items added live: where clones of the 10 most popular items rank beside their originals (ranker and blend)
	$(PY) bench/live_items.py

bench-train-time: install-bench  ## make train index wall time on ML-100K and a 100k-interaction implicit set of 17k items, beside implicit ALS's fit
	$(PY) bench/train_time.py

demo: install describe  ## set up, then train -> evaluate -> index -> serve -> query on the default data
	$(VENV)/bin/tandem train-cf --no-progress --out artifacts/eval/cf $(DATA_FLAGS)
	$(VENV)/bin/tandem publish --no-progress $(DATA_FLAGS)
	$(PY) -m engine.cli.demo

bench-synthetic: install  ## time the synthetic generator at 20M ratings (peak memory too)
	$(PY) bench/synthetic_scale.py

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
