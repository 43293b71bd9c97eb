"""Data-parallel training with torch.distributed (DistributedDataParallel, gloo):
`torchrun --nproc_per_node 2 -m engine train-cf --distributed` (train-towers, train)
trains on two processes through the same code path as one process, each rank reading
only its parts of a sharded directory and holding only its users' rows, keeps the
replicated parameters equal and a rerun's model the same, lets rank 0 alone write, and
reaches the single-process model's test RMSE (towers: Recall@10) within a stated
tolerance."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="training needs the train extra")

SETTINGS = ["--set", "data.synthetic.n_users=300", "--set", "data.synthetic.n_items=200"]
SETTINGS += ["--set", "data.synthetic.n_ratings=20000", "--set", "data.split=random"]
FLAGS = ["--data", "synthetic", "--epochs", "12", "--n-features", "16", "--lr", "0.01", "--batch-size", "512"]
TOLERANCE = 0.03  # RMSE: 2 processes vs 1 (the same data, seed and global batch size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tmp_path, out: str, nproc: int, trainer: str = "train-cf", flags: list[str] = FLAGS) -> dict:
    """Run ``tandem <trainer>`` on ``nproc`` processes (torchrun for more than one); its
    printed metrics."""
    if nproc == 1:
        command = [sys.executable, "-m", "engine"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command += ["--master_port", str(free_port()), "-m", "engine"]
    command += [*SETTINGS, trainer, *flags, "--out", str(tmp_path / out), "--no-progress"]
    command += ["--distributed"] if nproc > 1 else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def test_two_processes_train_cf_like_one(tmp_path):
    from engine.models.cf import CFModel

    one = train(tmp_path, "one", 1)
    two = train(tmp_path, "two", 2)
    print(f"\ntest RMSE: 1 process {one['test']['rmse']:.4f}, 2 processes {two['test']['rmse']:.4f}")
    assert abs(two["test"]["rmse"] - one["test"]["rmse"]) < TOLERANCE, (one["test"], two["test"])
    model = CFModel.load(tmp_path / "two")  # written once, by rank 0, with its learning curve
    assert (tmp_path / "two" / "learning_curve.json").is_file()
    assert np.isfinite(model.W).all() and two["epochs_run"] >= 1


def test_two_processes_train_the_towers_like_one(tmp_path):
    """The towers (in-batch softmax), the ranks' batches making one batch of the same
    size: Recall@10 within a stated tolerance of one process's."""
    flags = ["--data", "synthetic", "--objective", "softmax", "--epochs", "4", "--batch-size", "256"]
    one = train(tmp_path, "one", 1, "train-towers", flags)
    two = train(tmp_path, "two", 2, "train-towers", flags)
    recall = next(key for key in one["test"] if key.startswith("recall"))
    print(f"\ntowers test {recall}: 1 process {one['test'][recall]:.4f}, 2 processes {two['test'][recall]:.4f}")
    assert abs(two["test"][recall] - one["test"][recall]) < 0.05, (one["test"], two["test"])


def test_a_rerun_on_two_processes_gives_the_same_model(tmp_path):
    """The same seed gives the same model on the same number of processes (the ranks'
    replicas of the item table are checked equal at the end of training), and rank 0's
    model has every user's row and seen list."""
    from engine.models.cf import CFModel

    train(tmp_path, "first", 2)
    train(tmp_path, "second", 2)
    first, second = CFModel.load(tmp_path / "first"), CFModel.load(tmp_path / "second")
    for name in ("W", "X", "user_bias", "seen_indptr", "seen_indices"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # Rank 0 gathered both ranks' users: every one with interactions has a trained row.
    assert first.seen_indptr[-1] == first.metrics["trained_on"]["n_ratings"]
    rated = np.diff(first.seen_indptr) > 0
    assert rated[0::2].any() and rated[1::2].any() and (np.abs(first.W[rated]).sum(1) > 0).all()


REPLICAS = """
import torch, torch.distributed as dist
from engine.models.distributed import check_replicas, init_from_environment
rank, _ = init_from_environment()
check_replicas({"X": torch.ones(3)})  # equal: passes
try:
    check_replicas({"X": torch.tensor([1.0, 2.0, float(rank)])})
except RuntimeError as e:
    print(f"rank {rank}: {e}")
"""


def test_replicas_that_went_out_of_step_are_caught(tmp_path):
    (tmp_path / "replicas.py").write_text(REPLICAS)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    done = subprocess.run(
        [*command, str(free_port()), str(tmp_path / "replicas.py")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("the ranks' replicas of X differ") == 2, done.stdout


def test_each_rank_reads_only_its_parts_of_a_sharded_directory(tmp_path):
    """`tandem data shard` then `torchrun ... train-cf --distributed --data DIR`: every
    rank reads its parts only (together, every rating once), and the model trained on
    two processes predicts the held-out ratings within TOLERANCE of one process's."""
    from engine import data
    from engine.evaluation.offline import rating_metrics
    from engine.models.cf import CFModel, train_cf

    split = data.random_split(data.make_synthetic(n_users=300, n_items=200, n_ratings=20000, seed=0), 0.2, seed=0)
    data.write_shards(split.train, tmp_path / "shards", parts=4)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "-m", "engine", "train-cf", "--distributed", "--data", str(tmp_path / "shards")]
    command += ["--split", "none", *FLAGS[2:], "--out", str(tmp_path / "two"), "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    read = [int(n.replace(",", "")) for n in re.findall(r"rank \d of 2: read ([\d,]+) of the", done.stderr)]
    assert len(read) == 2 and sum(read) == split.train.n_ratings and min(read) < split.train.n_ratings, read
    two = CFModel.load(tmp_path / "two")
    assert two.metrics["trained_on"]["n_ratings"] == split.train.n_ratings  # the whole, not rank 0's parts
    one = train_cf(split.train, n_features=16, epochs=12, learning_rate=0.01, batch_size=512, progress=False)
    rmse = {
        n: rating_metrics(m.predict_indices, split.test, clip=m.rating_range)["rmse"]
        for n, m in (("one", one), ("two", two))
    }
    print(f"\ntest RMSE from shards: 1 process {rmse['one']:.4f}, 2 processes {rmse['two']:.4f}")
    assert abs(rmse["two"] - rmse["one"]) < TOLERANCE, rmse


@pytest.mark.parametrize("source", ["file", "shards"])
def test_make_train_dist_trains_every_serving_model_on_two_processes(tmp_path, source):
    """`torchrun --nproc_per_node 2 -m engine train --distributed` (make train DIST=2):
    the ranker's models and the serving models' towers are trained by both ranks, rank 0
    alone fits ALS and the ranker and writes; `build-index` then publishes a bundle that
    serves. From a sharded directory rank 1 reads only its parts (rank 0, which fits ALS
    and the ranker, reads them all)."""
    from engine.serving.engine import Engine

    data_flags = ["--data", "synthetic"]
    if source == "shards":
        shard = [sys.executable, "-m", "engine", *SETTINGS, "data", "shard", "synthetic", "--parts", "2"]
        subprocess.run([*shard, "--out", str(tmp_path / "shards")], check=True, capture_output=True, timeout=120)
        data_flags = ["--data", str(tmp_path / "shards")]
    paths = ["--set", f"paths.models={tmp_path / 'models'}", "--set", f"paths.bundles={tmp_path / 'bundles'}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "-m", "engine", *SETTINGS, *paths, "train", *data_flags]
    done = subprocess.run([*command, "--distributed", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"saved"') == 1 and "rank 0 of 2" in done.stderr  # one writer
    assert ("rank 1 of 2: read" in done.stderr) == (source == "shards")
    saved = json.loads(done.stdout[done.stdout.index("{") :])
    assert saved["models"] == ["cf", "ranker", "towers"]
    index = [sys.executable, "-m", "engine", *SETTINGS, *paths, "build-index", *data_flags]
    built = subprocess.run(index, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    engine = Engine.load(tmp_path / "bundles")
    assert engine.ranker is not None and len(engine.recommend("u1", k=10)) == 10


def test_the_towers_train_from_the_ranks_parts_like_one_process(tmp_path):
    """The towers from a sharded directory: each rank reads its parts, the feature
    pipelines are the whole data's (sums over the ranks), and Recall@10 is within 0.05
    of one process's on the same training part."""
    from engine import data
    from engine.evaluation.offline import topn_metrics
    from engine.models.towers import TwoTowerModel, train_two_tower

    split = data.random_split(data.make_synthetic(n_users=300, n_items=200, n_ratings=20000, seed=0), 0.2, seed=0)
    data.write_shards(split.train, tmp_path / "shards", parts=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), "-m", "engine", "train-towers", "--distributed", "--data", str(tmp_path / "shards")]
    command += ["--split", "none", "--objective", "softmax", "--epochs", "4", "--batch-size", "256"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "two"), "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(re.findall(r"rank \d of 2: read [\d,]+ of the", done.stderr)) == 2
    two = TwoTowerModel.load(tmp_path / "two")
    one = train_two_tower(split.train, objective="softmax", epochs=4, batch_size=256, progress=False)
    # The pipelines saw every rank's interactions: the same history features as one process's.
    np.testing.assert_allclose(two.user_pipeline.history, one.user_pipeline.history, atol=1e-5)
    np.testing.assert_allclose(two.item_pipeline.history, one.item_pipeline.history, atol=1e-5)
    seen = split.train.user_items()
    recall = {
        name: topn_metrics(lambda users, k, m=m: m.recommend_indices(users, k, seen), split.test, k=10)["recall@10"]
        for name, m in (("one", one), ("two", two))
    }
    print(f"\ntowers test recall@10 from shards: 1 process {recall['one']:.4f}, 2 processes {recall['two']:.4f}")
    assert abs(recall["two"] - recall["one"]) < 0.05, recall
