"""torch is the `train` extra: serving, index building and the gRPC service must work
without it, and training must say how to get it. Checked in a fresh interpreter where
importing torch fails, as it does where the extra is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_serving_and_index_building_never_import_torch(small_models, tmp_path):
    ds, cf, towers = small_models
    cf.save(tmp_path / "models" / "cf")
    towers.save(tmp_path / "models" / "towers")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from engine import Engine, data
        from engine.errors import TandemError
        from engine.models.cf import CFModel, train_cf
        from engine.models.towers import TwoTowerModel
        from engine.service.server import ServerConfig, TandemServer
        from index_builder import build_bundle

        ds = data.make_synthetic(n_users=400, n_items=300, n_ratings=12_000, seed=0)
        models = {str(tmp_path / "models")!r}
        cf, towers = CFModel.load(models + "/cf"), TwoTowerModel.load(models + "/towers")
        build_bundle(ds, cf, towers, {str(tmp_path / "root")!r}, log=lambda line: None)
        engine = Engine.load({str(tmp_path / "root")!r})
        assert len(engine.recommend("u3", k=5)) == 5 and len(engine.recommend(user_features={{"age": 30}})) == 10
        engine.add_items(["new"], [{{"year": 2024}}])
        server = TandemServer({str(tmp_path / "root")!r}, ServerConfig(port=0, watch_interval=0)).start()
        server.stop(0)
        try:
            train_cf(ds, epochs=1, progress=False)
        except TandemError as e:
            assert "pip install 'tandem[train]'" in str(e), e
        else:
            raise AssertionError("training ran without torch")
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
