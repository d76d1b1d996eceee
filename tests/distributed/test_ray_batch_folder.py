"""The issue's claim at full size (slow; `pytest -m slow tests/distributed`): `batch --backend ray` on a folder of
40+ real models writes the local backend's folders and summary byte for byte, and does again when a Ray worker is
killed mid-run, with Ray rerunning that worker's model. benchmarks/ray_batch.py measures it; this replays it."""
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'fgcompile[ray]')")
import ray_batch  # noqa: E402  (benchmarks/, on the path by conftest)


@pytest.mark.slow
def test_batch_on_ray_of_40_models_matches_local_and_survives_a_killed_worker(tmp_path):
    sources = ray_batch.assemble(tmp_path)
    assert len(sources) >= ray_batch.MIN_MODELS
    r = ray_batch.measure(tmp_path / "models", tmp_path)
    assert r["models"] == len(sources) and r["statuses"].get("ok", 0) >= ray_batch.MIN_MODELS, r["failed"]
    assert r["files"] >= 6 * r["models"]
    assert r["identical"], r["differences"]
    assert r["killed"] is not None, "no Ray worker was seen compiling, so none was killed"
    assert r["retried"] == {"ray": {}, "ray_kill": {r["killed"]["model"]: 1}}   # Ray reran the killed worker's model
    assert r["kill_identical"], r["kill_differences"]
