"""``fusarbatch run`` under faults (issue 10): a model with NaN weights, a scene group missing an array,
leftovers of Zarr's own writes, and the only worker of a real Dask cluster killed while a scene is tiled.
Real runs of the tiny demo model over the camargue demo scene (one scene, a few tiles)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import zarr

from fusarbatch.config import RunConfig
from fusarbatch.errors import ModelError
from fusarbatch.outputs.geoparquet import KINDS
from fusarbatch.outputs.ledger import Ledger, collect_status, lock_state
from fusarbatch.pipeline import run, sweep_leftovers
from tests.conftest import REPO, free_port, stop_process

CAMARGUE = "S1A_IW_GRD_20150309T173017_VV_camargue"
AOI = REPO / "catalogs" / "demo" / "aois" / "camargue.geojson"

pytestmark = pytest.mark.timeout(300)


def config(out: Path, model: Path, **kw) -> RunConfig:
    return RunConfig(aoi=AOI, start="2015-01", out=out, model=model, max_new_tokens=8, device="cpu", **kw)


@pytest.fixture(scope="module")
def done_out(tmp_path_factory, generated_demo_model) -> Path:
    """An output folder where the camargue scene is done."""
    out = tmp_path_factory.mktemp("faults") / "out"
    summary = run(config(out, generated_demo_model))
    assert [s.status for s in summary.scenes] == ["ok"], [s.error for s in summary.scenes]
    return out


def copy_of(done_out: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(done_out, out)
    return out


def snapshot(out: Path) -> dict[str, object]:
    snap: dict[str, object] = {}
    for kind in KINDS:
        for p in sorted((out / kind).glob("date=*/*.parquet")):
            snap[str(p.relative_to(out))] = pd.read_parquet(p)
    for p in sorted((out / "quicklooks").glob("*.png")):
        snap[str(p.relative_to(out))] = p.read_bytes()
    return snap


def test_nan_weights_end_the_run_with_one_line_and_keep_the_good_outputs(done_out, tmp_path):
    """A copy of the model with a NaN final norm (every logit NaN): a --force redo stops at the first
    batch with a ModelError (exit 2) naming the model; before, the scene ended "done" with 0 detections and
    its outputs were replaced."""
    import torch
    from safetensors.torch import load_file, save_file

    from fusarbatch.model.demo import demo_model_dir

    out = copy_of(done_out, tmp_path)
    before = snapshot(out)
    model = tmp_path / "generated_nan_model"
    shutil.copytree(demo_model_dir(), model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as info:
        run(config(out, model, force=True))
    assert info.value.exit_code == 2
    assert str(info.value).startswith(f"model {model}: ") and "logits of the first batch are NaN" in str(
        info.value
    )
    now = snapshot(out)
    assert sorted(now) == sorted(before)
    for key, value in before.items():
        if isinstance(value, bytes):
            assert now[key] == value, key
        else:
            pd.testing.assert_frame_equal(now[key], value, obj=key)
    status = collect_status(out)
    assert status["runs"][0]["status"] == "error" and status["runs"][0]["exit_code"] == 2
    assert status["lock"]["held"] is False


def test_a_scene_group_missing_an_array_is_explained_and_retiled(done_out, generated_demo_model, tmp_path):
    """valid_fraction deleted by hand from a complete group, and the scene's detections file gone (so the
    scene is redone): status names the group and the array; the next run tiles it again instead of failing
    on it (every run, before)."""
    out = copy_of(done_out, tmp_path)
    shutil.rmtree(out / "tiles.zarr" / CAMARGUE / "valid_fraction")
    for f in (out / "detections").rglob("*.parquet"):
        f.unlink()
    status = collect_status(out)
    assert status["corrupt_groups"] == [{"group": CAMARGUE, "missing": ["valid_fraction"]}]
    assert status["disk"]["tiles.zarr"]["corrupt"] == 1
    summary = run(config(out, generated_demo_model))
    assert [(s.status, s.reused) for s in summary.scenes] == [("ok", [])], [s.error for s in summary.scenes]
    g = zarr.open_group(str(out / "tiles.zarr" / CAMARGUE), mode="r")
    assert g["valid_fraction"].shape == (summary.scenes[0].tiles,)
    after = collect_status(out)
    assert after["corrupt_groups"] == [] and after["missing_outputs"] == [] and after["leftovers"] == []


def test_zarr_temporary_files_are_counted_by_status_and_swept(done_out, tmp_path):
    out = copy_of(done_out, tmp_path)
    root_tmp = out / "tiles.zarr" / f"zarr.{uuid.uuid4().hex}.partial"
    group_tmp = out / "tiles.zarr" / CAMARGUE / f"zarr.{uuid.uuid4().hex}.partial"
    array_tmp = out / "tiles.zarr" / CAMARGUE / "backscatter" / f"zarr.{uuid.uuid4().hex}.partial"
    for p in (root_tmp, group_tmp, array_tmp):
        p.write_text('{"zarr_format": 3')  # a write cut short
    expected = sorted(str(p.relative_to(out)) for p in (root_tmp, group_tmp, array_tmp))
    assert collect_status(out)["leftovers"] == expected
    Ledger.open(out).close()
    assert sweep_leftovers(out) == expected
    assert collect_status(out)["leftovers"] == []
    assert zarr.open_group(str(out / "tiles.zarr" / CAMARGUE), mode="r").attrs["complete"] is True


# ------------------------------------------------------------------- the only worker dies during tiling


def _dask() -> list[str]:
    beside = Path(sys.executable).parent / "dask"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "dask"]


def test_the_only_worker_killed_while_a_scene_is_tiled_fails_the_scene_within_the_task_timeout(
    generated_demo_model, tmp_path
):
    """A real scheduler (in this process, TCP on 127.0.0.1) and one real ``dask worker`` process (no
    nanny, GPU=1). The worker is SIGKILLed when the scene enters tiling: the run notices within
    --task-timeout (3 s), fails the scene with that reason, fails nothing else, releases the lock and
    ends with exit code 1 (before: tiling waited for a worker for ever, holding run.lock)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0")
    worker = subprocess.Popen(
        [
            *_dask(),
            "worker",
            cluster.scheduler_address,
            "--no-nanny",
            "--nthreads",
            "2",
            "--resources",
            "GPU=1",
            "--host",
            "127.0.0.1",
            "--dashboard-address",
            f"127.0.0.1:{free_port()}",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.log").open("w"),
    )
    try:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
        killed: list[float] = []

        def progress(event: str, fields: dict) -> None:
            if event == "stage" and fields.get("stage") == "tile" and not killed:
                worker.send_signal(signal.SIGKILL)
                worker.wait(timeout=30)
                killed.append(time.monotonic())

        out = tmp_path / "out"
        summary = run(
            config(out, generated_demo_model, scheduler=cluster.scheduler_address, task_timeout_s=3), progress
        )
        assert killed, "the run never reached tiling"
        assert time.monotonic() - killed[0] < 3 + 30
        [scene] = summary.scenes
        assert scene.status == "failed" and scene.stage == "tile"
        assert scene.error == (
            "tile: the Dask cluster has had no live worker for 3 s (--task-timeout) while tiling; restart "
            "its workers (the remaining scenes are not tried)"
        )
        assert summary.exit_code == 1
        assert lock_state(out)[0] is False
        status = collect_status(out)
        assert status["runs"][0]["status"] == "failed" and status["runs"][0]["exit_code"] == 1
        assert [(f["scene_id"], f["stage"]) for f in status["failures"]] == [(CAMARGUE, "tile")]
        assert status["leftovers"] == []
    finally:
        stop_process(worker, timeout=5)
        cluster.close()
