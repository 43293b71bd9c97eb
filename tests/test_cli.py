import json
import re
import subprocess
import sys

import numpy as np
import pytest

from engine.cli import main
from engine.config import load_config
from engine.errors import ConfigError


def test_describe_synthetic_summary(capsys):
    assert main(["--set", "data.synthetic.n_ratings=3000", "data", "describe", "synthetic", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "ratings      3,000" in out and "Top 3 items" in out and "sparsity" in out


def test_describe_json_on_ml100k(capsys, ml100k_path):
    assert main(["data", "describe", str(ml100k_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["n_users"], stats["n_items"], stats["n_ratings"]) == (943, 1682, 100_000)
    assert stats["top_items"][0]["title"] == "Star Wars (1977)"


def test_bad_path_is_a_clear_error(capsys, tmp_path):
    assert main(["data", "describe", str(tmp_path / "nope")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_config_file_and_overrides(tmp_path):
    cfg = tmp_path / "tandem.toml"
    cfg.write_text('[data]\nsource = "synthetic"\n[data.synthetic]\nseed = 4\n[server]\nport = 6000\n')
    config = load_config(cfg, ["server.port=7000", "data.synthetic.n_users=50"])
    assert config["data"]["source"] == "synthetic"
    assert config["data"]["synthetic"]["seed"] == 4 and config["data"]["synthetic"]["n_users"] == 50
    assert config["server"]["port"] == 7000  # flag beats file
    assert config["server"]["host"] == "127.0.0.1"  # default kept


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting 'server.prot'"):
        load_config(None, ["server.prot=1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["nonsense"])


def test_python_dash_m_engine_help():
    out = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True, check=True)
    assert "data" in out.stdout and "--set" in out.stdout


def test_train_cf_then_eval_cf_on_synthetic(tmp_path, capsys):
    common = [
        "--set",
        "data.synthetic.n_ratings=4000",
        "--set",
        "data.synthetic.n_users=200",
        "--set",
        "data.synthetic.n_items=100",
    ]
    out = tmp_path / "cf"
    assert (
        main(
            common
            + [
                "train-cf",
                "--data",
                "synthetic",
                "--split",
                "random",
                "--out",
                str(out),
                "--epochs",
                "3",
                "--n-features",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    trained = json.loads(capsys.readouterr().out)
    assert trained["saved"] == str(out) and trained["epochs_run"] == 3
    assert {"rmse", "mae", "recall@10", "ndcg@10"} <= set(trained["test"])
    assert (out / "cf.json").is_file() and (out / "learning_curve.json").is_file()
    assert main(common + ["eval-cf", "--data", "synthetic", "--split", "random", "--model", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["rmse"] == pytest.approx(trained["test"]["rmse"])


def test_train_cf_rejects_bad_settings(tmp_path, capsys):
    assert main(["--set", "cf.n_factors=3", "train-cf", "--data", "synthetic", "--out", str(tmp_path)]) == 2
    assert "unknown CF setting" in capsys.readouterr().err
    assert main(["train-cf", "--data", "synthetic", "--split", "u1", "--out", str(tmp_path)]) == 2
    assert "needs an ML-100K directory" in capsys.readouterr().err


def test_train_towers_then_eval_and_recommend_cf_example(tmp_path, capsys):
    common = [
        "--set",
        "data.synthetic.n_ratings=4000",
        "--set",
        "data.synthetic.n_users=200",
        "--set",
        "data.synthetic.n_items=100",
    ]
    out = tmp_path / "towers"
    assert (
        main(
            common
            + [
                "train-towers",
                "--data",
                "synthetic",
                "--split",
                "random",
                "--out",
                str(out),
                "--epochs",
                "2",
                "--layers",
                "32,16",
                "--output-dim",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    trained = json.loads(capsys.readouterr().out)
    assert {"rmse", "recall@10"} <= set(trained["test"]) and (out / "towers.json").is_file()
    assert main(common + ["eval-towers", "--data", "synthetic", "--split", "random", "--model", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["rmse"] == pytest.approx(trained["test"]["rmse"])

    cf_dir = tmp_path / "cf"
    assert (
        main(
            common
            + [
                "train-cf",
                "--data",
                "synthetic",
                "--split",
                "none",
                "--out",
                str(cf_dir),
                "--epochs",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(common + ["recommend-cf", "--data", "synthetic", "--model", str(cf_dir), "--example", "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Top 3 for user" in printed and "More like Item" in printed
    assert len(re.findall(r"distance \d", printed)) == 3


def test_train_build_index_recommend_rollback(tmp_path, capsys):
    common = [
        "--set",
        "data.synthetic.n_ratings=3000",
        "--set",
        "data.synthetic.n_users=150",
        "--set",
        "data.synthetic.n_items=90",
        "--set",
        f"paths.models={tmp_path / 'models'}",
        "--set",
        f"paths.bundles={tmp_path / 'bundles'}",
        "--set",
        "engine.segment_key=occupation",
    ]
    assert main(common + ["train-cf", "--data", "synthetic", "--split", "none", "--epochs", "2", "--no-progress"]) == 0
    assert (
        main(
            common
            + [
                "train-towers",
                "--data",
                "synthetic",
                "--split",
                "none",
                "--epochs",
                "1",
                "--layers",
                "16",
                "--output-dim",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    ranker_settings = ["--set", "ranker.num_trees=10", "--set", "ranker.n_candidates=50"]
    capsys.readouterr()
    assert main(common + ranker_settings + ["train-ranker", "--data", "synthetic"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["saved"] == str(tmp_path / "models" / "ranker") and trained["depth"] == 50
    for _ in range(2):
        assert main(common + ["build-index", "--data", "synthetic"]) == 0
    from engine import Engine

    assert Engine.load(tmp_path / "bundles").ranker is not None  # build-index stored train-ranker's
    capsys.readouterr()
    assert main(common + ["recommend", "--example", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "Recommended for user" in out and "Recommended for a new user" in out and "More like" in out
    assert main(common + ["rollback"]) == 0
    assert "rolled back" in capsys.readouterr().out
    assert main(common + ["recommend", "--features", "{not json"]) == 2
    assert "--features must be a JSON object" in capsys.readouterr().err


def test_serve_token_sources(tmp_path, monkeypatch):
    """--token-file beats --token beats $TANDEM_TOKEN; a token set but empty is refused
    (it would silently turn authentication off)."""
    from engine.cli import build_parser
    from engine.cli.serve import _token

    def token(*argv):
        return _token(build_parser().parse_args(["serve", *argv]))

    monkeypatch.delenv("TANDEM_TOKEN", raising=False)
    assert token() is None
    monkeypatch.setenv("TANDEM_TOKEN", "from-env")
    assert token() == "from-env" and token("--token", "flag") == "flag"
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert token("--token", "flag", "--token-file", str(secret)) == "from-file"
    for argv, origin in ((["--token", ""], "--token"), (["--token-file", str(tmp_path / "empty")], "empty")):
        (tmp_path / "empty").write_text("  \n")
        with pytest.raises(ConfigError, match=f"{origin}.* empty"):
            token(*argv)
    monkeypatch.setenv("TANDEM_TOKEN", "")
    with pytest.raises(ConfigError, match="TANDEM_TOKEN is set but empty"):
        token()
    with pytest.raises(ConfigError, match="no-such-file"):
        token("--token-file", str(tmp_path / "no-such-file"))


def test_the_shipped_tandem_toml_uses_known_settings_only():
    """Defaults are written once (engine.settings); the shipped tandem.toml must name no
    setting the loader does not know (a key documented there was once unknown), and its
    sections must build the settings classes."""
    from pathlib import Path

    from engine.settings import EngineConfig, IndexConfig, ServerConfig

    config = load_config(Path(__file__).resolve().parents[1] / "tandem.toml")
    EngineConfig(**config["engine"]), IndexConfig(**config["index"]), ServerConfig(**config["server"])


def implicit_csv(path):
    """A generic CSV of implicit interactions (no rating column) with string ids."""
    rng = np.random.default_rng(0)
    rows = {(f"user-{u}", f"sku-{int(i)}") for u in range(60) for i in rng.zipf(1.3, 15) % 80}
    path.write_text("customer,product\n" + "".join(f"{u},{i}\n" for u, i in sorted(rows)))
    return path


def test_implicit_data_trains_and_evaluates_and_the_model_survives_a_failed_evaluation(tmp_path, capsys):
    """Relevance follows the data: on implicit data every held-out interaction is
    relevant (it used to be rating >= 4: "no test user has a relevant item" after
    training, and the model was lost). A model is saved before it is evaluated."""
    data_file = implicit_csv(tmp_path / "interactions.csv")
    common = ["--set", "data.columns.user=customer", "--set", "data.columns.item=product"]
    flags = ["--data", str(data_file), "--split", "random", "--epochs", "2", "--no-progress"]
    assert main(common + ["train-cf", *flags, "--out", str(tmp_path / "cf")]) == 0
    report = json.loads(capsys.readouterr().out)["test"]
    assert report["n_users_evaluated"] > 10 and 0 <= report["recall@10"] <= 1
    assert main(common + ["train-towers", *flags, "--objective", "softmax", "--out", str(tmp_path / "towers")]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["n_users_evaluated"] > 10
    evaluate = ["eval-cf", "--data", str(data_file), "--split", "random", "--model", str(tmp_path / "cf")]
    assert main(common + evaluate) == 0
    capsys.readouterr()
    failing = ["train-cf", *flags, "--out", str(tmp_path / "kept"), "--min-rating", "100"]
    assert main(common + failing) == 2
    err = capsys.readouterr().err
    assert "no user of" in err and "--min-rating" in err
    assert (tmp_path / "kept" / "cf.json").is_file()  # saved before the evaluation failed


def test_evaluating_a_model_on_data_it_was_trained_on_is_refused(tmp_path, capsys):
    """After `make train` (trained on everything) an eval-cf / eval-towers on a split
    would score the model on its own training data: refused, with the reason."""
    data_file = implicit_csv(tmp_path / "interactions.csv")
    common = ["--set", "data.columns.user=customer", "--set", "data.columns.item=product"]
    train_flags = ["--data", str(data_file), "--split", "none", "--epochs", "2", "--no-progress"]
    assert main(common + ["train-cf", *train_flags, "--out", str(tmp_path / "cf")]) == 0
    assert main(common + ["train-towers", *train_flags, "--out", str(tmp_path / "towers")]) == 0
    capsys.readouterr()
    for command, model in (("eval-cf", "cf"), ("eval-towers", "towers")):
        evaluate = [command, "--data", str(data_file), "--split", "random", "--model", str(tmp_path / model)]
        assert main(common + evaluate) == 2, command
        assert "was trained on" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, words",
    [
        ("cf.bogus=1", "unknown CF setting(s) ['bogus']"),
        ("cf.n_features=abc", "[cf] n_features = 'abc': expected int"),
        ("cf.lambda=-1", "lambda must be >= 0"),  # the file's spelling, not lambda_
        ("towers.epochs=0", "epochs must be >= 1"),
        ("engine.max_k=abc", "[engine] max_k = 'abc': expected int"),
        ("server.port=99.5", "[server] port = 99.5: expected int"),
        ("engine.pipeline=quantum", "engine.pipeline must be one of"),
    ],
)
def test_configuration_errors_are_found_at_load_time(capsys, override, words):
    assert main(["--set", override, "config", "show"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tandem: error:") and words in err and "Traceback" not in err


def test_data_and_index_errors_are_messages_not_tracebacks(tmp_path, capsys):
    semicolons = tmp_path / "events.csv"
    semicolons.write_text("user;item\nu1;i1\nu2;i1\nu2;i2\n")
    assert main(["data", "describe", str(semicolons)]) == 2
    assert "--set data.columns.user=NAME" in capsys.readouterr().err
    assert main(["data", "describe", str(semicolons), "--delimiter", ";", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_ratings"] == 3
    small = ["--set", "data.synthetic.n_users=100", "--set", "data.synthetic.n_items=50"]
    small += ["--set", "data.synthetic.n_ratings=2000"]
    for model in ("cf", "towers"):
        command = [f"train-{model}", "--data", "synthetic", "--split", "none", "--epochs", "1", "--no-progress"]
        assert main(small + command + ["--out", str(tmp_path / "models" / model)]) == 0
    capsys.readouterr()
    build = [
        "build-index",
        "--data",
        "synthetic",
        "--models",
        str(tmp_path / "models"),
        "--out",
        str(tmp_path / "root"),
    ]
    assert main(small + build + ["--factory", "Bogus"]) == 2
    assert "invalid FAISS factory string 'Bogus'" in capsys.readouterr().err
    assert not list((tmp_path / "root").glob("versions/*"))  # nothing published


def test_eval_pipeline_on_any_data_and_split_beside_the_peers(tmp_path, capsys):
    """eval-pipeline used to refuse anything but ML-100K folds. On an implicit CSV with
    string ids and a temporal split, it reports the pipeline beside popularity, EASE and
    implicit ALS (or says why not), with the ratio to the best peer, as JSON, a table
    and a PNG chart."""
    data_file = implicit_csv(tmp_path / "interactions.csv")
    settings = ["--set", "data.columns.user=customer", "--set", "data.columns.item=product"]
    settings += ["--set", "cf.epochs=3", "--set", "towers.epochs=2"]
    out = tmp_path / "eval" / "report.json"
    command = ["eval-pipeline", "--data", str(data_file), "--split", "temporal", "--out", str(out)]
    assert main(settings + command) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["splits"] == ["temporal"] and out.with_suffix(".png").is_file()
    summary = report["summary"]
    for system in ("pipeline", "popularity", "ease"):
        assert 0 <= summary[system]["recall@10"] <= 1 and summary[system]["fit_s"] >= 0, system
    assert "skipped" in summary["implicit_als"] or summary["implicit_als"]["recall@10"] > 0
    if "skipped" in summary["implicit_als"]:
        assert "implicit" in summary["implicit_als"]["skipped"] and "skipped" in table
    assert summary["pipeline"]["ratio_to_best_peer_ndcg@10"] > 0 and "pipeline / best peer" in table
    assert set(summary["pipeline"]["candidate_recall"]) >= {"cf", "towers", "popular", "merged"}
    assert main(settings + ["eval-pipeline", "--data", str(data_file), "--split", "u1"]) == 2
    assert "ML-100K fold" in capsys.readouterr().err


def test_publish_is_train_and_index_in_one_command(tmp_path, capsys):
    """tandem publish = make train index: the models saved where make train saves them
    (so that build-index rebuilds from them) and a published bundle that serves."""
    data_file = implicit_csv(tmp_path / "interactions.csv")
    common = ["--set", "data.columns.user=customer", "--set", "data.columns.item=product"]
    common += ["--set", f"paths.models={tmp_path / 'models'}", "--set", f"paths.bundles={tmp_path / 'bundles'}"]
    common += ["--set", "cf.epochs=2", "--set", "towers.epochs=1"]
    assert main(common + ["publish", "--data", str(data_file), "--no-progress"]) == 0
    published = json.loads(capsys.readouterr().out)
    from engine import Engine
    from engine.models.cf import CFModel

    cf = CFModel.load(tmp_path / "models" / "cf")
    assert cf.config.loss == "wmse" and cf.metrics["trained_on"]["data"] == "interactions"
    assert Engine.load(tmp_path / "bundles").version == published["version"]
    assert main(common + ["build-index", "--data", str(data_file)]) == 0  # rebuilds from the saved models


def test_train_is_every_model_for_serving_then_index_publishes_them(tmp_path, capsys):
    """make train (tandem train): the ranker, CF (topn) and the towers (retrieval) saved in
    paths.models, one process; make index then publishes all three."""
    common = ["--set", f"paths.models={tmp_path / 'models'}", "--set", f"paths.bundles={tmp_path / 'bundles'}"]
    common += ["--set", "data.synthetic.n_ratings=3000", "--set", "data.synthetic.n_users=150"]
    common += ["--set", "data.synthetic.n_items=90", "--set", "retrieval.towers.epochs=1"]
    common += ["--set", "ranker.num_trees=10", "--set", "ranker.n_candidates=50"]
    # Events recorded live at the bundle root so far are trained on (a new user among them).
    log = tmp_path / "bundles" / "feedback.jsonl"
    log.parent.mkdir()
    event = {"item_id": "i1", "kind": "click", "value": None, "timestamp": 1.0}
    log.write_text("".join(json.dumps({**event, "user_id": user}) + "\n" for user in ("visitor", "visitor", "u1")))
    trained_to = log.stat().st_size
    assert main(common + ["train", "--data", "synthetic", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["models"] == ["cf", "ranker", "towers"]
    from engine.models.cf import CFModel

    cf = CFModel.load(tmp_path / "models" / "cf")
    assert cf.config.loss == "wmse" and "visitor" in cf.users  # the serving preset; the log's new user
    with open(log, "a") as f:  # recorded after training: replayed on top of the bundle
        f.write(json.dumps({**event, "user_id": "late-visitor"}) + "\n")
    assert main(common + ["build-index", "--data", "synthetic"]) == 0
    from engine import Engine

    engine = Engine.load(tmp_path / "bundles")
    assert engine.ranker is not None and engine.bundle.manifest.feedback == {"offset": trained_to}
    assert engine.recommend("visitor").served_by == "known user"
    assert engine.recommend("late-visitor").served_by == "live events" and engine.feedback.n_events == 1
