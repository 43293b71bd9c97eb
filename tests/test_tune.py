"""tandem tune: trials on a validation split carved from the given data, a per-trial
log, pruning, and a settings file that make train / publish / train_and_publish use."""

import json

import pytest

from engine.cli import main
from engine.config import load_config

pytest.importorskip("optuna", reason="tandem tune needs optuna (the train extra)")

SMALL = [
    "--set", "data.synthetic.n_users=150", "--set", "data.synthetic.n_items=100",
    "--set", "data.synthetic.n_ratings=3000",
]  # fmt: skip


def test_tune_writes_settings_that_training_then_uses(tmp_path, capsys):
    out = tmp_path / "tuned.toml"
    command = ["tune", "--data", "synthetic", "--budget", "2", "--trials", "4", "--no-progress", "--out", str(out)]
    assert main(SMALL + command) == 0
    result = json.loads(capsys.readouterr().out)
    trials = [json.loads(line) for line in out.with_suffix(".trials.jsonl").read_text().splitlines()]
    assert len(trials) == result["trials"] == 4 and trials[0]["trial"] == 0 and trials[0]["settings"] == {}
    assert {t["state"] for t in trials} <= {"complete", "pruned"}
    assert result["best_ndcg@10"] >= result["baseline_ndcg@10"] > 0  # trial 0 is the configuration as it was
    assert "temporal" in result["split"]["validation"]  # synthetic data has timestamps
    # Every later command merges the file over tandem.toml; --set still wins.
    from index_builder.train import retrieval_configs

    config = load_config(None, [f"paths.tuned={out}"])
    cf, towers = retrieval_configs(config)
    best = result["best"]
    if best:  # a suggested trial won: its settings are what serving trains
        assert cf.n_features == best["retrieval"]["cf"]["n_features"] and cf.solver == "als"
        assert towers.epochs == best["retrieval"]["towers"]["epochs"] and towers.objective == "softmax"
        assert config["engine"]["blend_cf"] == pytest.approx(best["engine"]["blend_cf"])
    overridden = load_config(None, [f"paths.tuned={out}", "retrieval.cf.n_features=7"])
    assert retrieval_configs(overridden)[0].n_features == 7
    assert "tuned_in_use" not in load_config(None, [f"paths.tuned={tmp_path / 'none.toml'}"])["paths"]


def test_tune_refuses_bad_settings_in_the_tuned_file(tmp_path):
    bad = tmp_path / "tuned.toml"
    bad.write_text("[retrieval.cf]\nsolver = 'newton'\n")
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="retrieval.cf"):
        load_config(None, [f"paths.tuned={bad}"])
