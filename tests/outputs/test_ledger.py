"""The ledger (real SQLite files) and the run lock (real flock between real processes)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusarbatch.config import RunConfig, load_config
from fusarbatch.errors import UsageError
from fusarbatch.outputs.ledger import (
    EXIT_LOCKED,
    Ledger,
    LockedError,
    LockInfo,
    RunLock,
    collect_status,
    lock_state,
    model_hash,
)

HOLD_LOCK = """
import sys, time
from pathlib import Path
from fusarbatch.outputs.ledger import RunLock
lock = RunLock(Path(sys.argv[1])).acquire(run_id="holder-run")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
print("released", flush=True)
"""


def _demo_scenes() -> list:
    """The two first demo scenes as real :class:`Scene` objects (sorted by datetime)."""
    from fusarbatch.catalog import resolve_catalog
    from fusarbatch.catalog.scene import scenes_from_items
    from tests.conftest import demo_items_absolute

    return scenes_from_items(demo_items_absolute(), resolve_catalog(None))[:2]


def _holder(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_lock_is_refused_with_the_holder_named(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(LockedError) as info:
            RunLock(tmp_path).acquire()
        assert time.monotonic() - started < RunLock.GRACE_S + 1.0
        message = str(info.value)
        assert f"pid {proc.pid}" in message and "holder-run" in message and "--wait" in message
        assert "\n" not in message and info.value.exit_code == EXIT_LOCKED == 75
        held, holder = lock_state(tmp_path)
        assert held and holder.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_wait_blocks_until_the_holder_releases(tmp_path):
    proc = _holder(tmp_path, 1.5)
    try:
        lock = RunLock(tmp_path).acquire(wait=True)
        assert proc.stdout.readline().strip() == "released"
        assert lock.waited_s >= 0.5
        assert lock.stale is None  # a clean release leaves no holder behind
        assert LockInfo.read(tmp_path / "run.lock").pid == os.getpid()
        lock.release()
        assert LockInfo.read(tmp_path / "run.lock") is None
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = _holder(tmp_path, 60)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    held, holder = lock_state(tmp_path)
    assert not held and holder.pid == proc.pid  # the file still names the dead holder
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.stale is not None and lock.stale.pid == proc.pid and lock.stale.run_id == "holder-run"
        assert lock_state(tmp_path)[0]
    finally:
        lock.release()


def test_unwritable_folder_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="--out"):
        RunLock(blocker).acquire()


def test_model_hash_follows_content_not_time(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "weights.bin").write_bytes(b"\0" * 1000)
    first = model_hash(model)
    os.utime(model / "weights.bin", (1, 1))
    assert model_hash(model) == first
    (model / "weights.bin").write_bytes(b"\0" * 999 + b"\1")
    assert model_hash(model) != first
    (model / "weights.bin").write_bytes(b"\0" * 1000)
    assert model_hash(model) == first
    (model / "adapter.safetensors").write_bytes(b"x")
    assert model_hash(model) != first


def test_config_hash_covers_output_fields_only():
    base = RunConfig(aoi=Path("a.geojson"), start="2024-01")
    same = RunConfig(
        aoi=Path("b.geojson"),
        start="2020-01",
        batch_size=2,
        workers=3,
        force=True,
        wait=True,
        out=Path("elsewhere"),
        scheduler="tcp://x:1",
    )
    assert base.output_hash() == same.output_hash()
    for change in ({"max_new_tokens": 5}, {"labels": ("ship", "oil")}, {"tile_size": 256}, {"anchors": 4}):
        assert RunConfig(aoi=Path("a.geojson"), start="2024-01", **change).output_hash() != base.output_hash()
    # tiling is reused across changes that do not touch it
    other = RunConfig(aoi=Path("a.geojson"), start="2024-01", max_new_tokens=5, labels=("oil",))
    assert other.stage_hash("tile") == base.stage_hash("tile")
    assert other.stage_hash("features") == base.stage_hash("features")
    assert RunConfig(aoi=Path("a.geojson"), start="2024-01", overlap=0).stage_hash("tile") != base.stage_hash(
        "tile"
    )


def test_the_aoi_counts_by_its_geometry_not_its_path(tmp_path):
    square = '{"type": "Polygon", "coordinates": [[[4, 43], [4.1, 43], [4.1, 43.1], [4, 43.1], [4, 43]]]}'
    for name in ("a.geojson", "copy.geojson"):
        (tmp_path / name).write_text(square)
    (tmp_path / "b.geojson").write_text(square.replace("4.1", "4.2"))
    a, copy, b = (
        RunConfig(aoi=tmp_path / n, start="2024-01") for n in ("a.geojson", "copy.geojson", "b.geojson")
    )
    assert a.output_hash() == copy.output_hash() and a.stage_hash("tile") == copy.stage_hash("tile")
    assert b.output_hash() != a.output_hash() and b.stage_hash("tile") != a.stage_hash("tile")
    whole = [
        RunConfig(aoi=tmp_path / n, start="2024-01", whole_scenes=True) for n in ("a.geojson", "b.geojson")
    ]
    assert whole[0].stage_hash("tile") == whole[1].stage_hash("tile") != a.stage_hash("tile")


def test_scene_life_cycle_recovery_and_status(tmp_path):
    scenes = _demo_scenes()
    a_id, b_id = scenes[0].item_id, scenes[1].item_id
    ledger = Ledger.open(tmp_path)
    ledger.start_run(
        "r1", argv=["x"], config={}, config_hash="c1", model_hash="m1", model_id="tiny", mode="window"
    )
    ledger.found(scenes, "r1")
    assert [s.status for s in ledger.scenes()] == ["pending", "pending"]
    for stage in ("tile", "features", "infer", "write"):
        ledger.stage_started(a_id, stage, "r1", "h")
        if stage != "write":
            ledger.stage_done(a_id, stage, 0.1)
    (tmp_path / "detections").mkdir()
    (tmp_path / "detections" / "a.parquet").write_bytes(b"x")
    ledger.scene_done(
        a_id,
        "r1",
        config_hash="c1",
        model_hash="m1",
        outputs=["detections/a.parquet"],
        tiles=2,
        tiles_inferred=1,
        detections=0,
        parse_failures=3,
        seconds=0.2,
    )
    ledger.stage_started(b_id, "tile", "r1", "h")
    ledger.close()  # the process "dies" with b running

    ledger = Ledger.open(tmp_path)
    assert ledger.recover("r2") == ["r1"]
    a, b = ledger.scene(a_id), ledger.scene(b_id)
    assert (a.status, a.stage, a.config_hash, a.model_hash, a.outputs) == (
        "done",
        "done",
        "c1",
        "m1",
        ("detections/a.parquet",),
    )
    assert a.attempts == 1 and a.item["id"] == a_id and a.group == scenes[0].safe_id
    assert a.datetime == scenes[0].datetime.isoformat().replace("+00:00", "Z")
    assert b.status == "interrupted" and "r1 stopped during tile" in b.reason
    assert ledger.runs()[0]["status"] == "killed"
    ledger.stage_started(b_id, "tile", "r2")
    ledger.scene_failed(b_id, "tile", "tile: [Errno 28] No space left on device", "r2")
    assert ledger.scene(b_id).attempts == 2
    ledger.close()

    status = collect_status(tmp_path)
    assert status["scenes_total"] == 2
    assert {(r["status"], r["stage"], r["n"]) for r in status["scenes"]} == {
        ("done", "done", 1),
        ("failed", "tile", 1),
    }
    assert status["failures"][0]["scene_id"] == b_id and "No space" in status["failures"][0]["reason"]
    stages = {(r["stage"], r["status"]): r["n"] for r in status["stages"]}
    assert stages[("write", "done")] == 1 and stages[("tile", "failed")] == 1
    assert status["disk"]["detections"]["files"] == 0  # not under date=...: not an output file
    assert status["missing_outputs"] == []
    (tmp_path / "detections" / "a.parquet").unlink()
    assert collect_status(tmp_path)["missing_outputs"] == [{"scene_id": a_id, "path": "detections/a.parquet"}]


def test_not_a_ledger_is_a_clear_error(tmp_path):
    (tmp_path / "ledger.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UsageError, match="not a usable fusarbatch ledger"):
        Ledger.open(tmp_path)
    with pytest.raises(UsageError, match=r"no ledger\.sqlite"):
        collect_status(tmp_path / "empty")


def test_ledger_is_plain_sqlite(tmp_path):
    Ledger.open(tmp_path).close()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"runs", "scenes", "stages", "meta"} <= tables
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert json.loads(json.dumps(conn.execute("SELECT value FROM meta").fetchall())) == [["1"]]


def test_config_file_errors_name_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('aoi = "a.geojson"\nstart = "2024-01"\nmax-new-token = 4\n')
    with pytest.raises(UsageError, match=r"unknown key 'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        load_config(path, {})
    path.write_text('aoi = "a.geojson"\nstart = "2024-01"\nquicklooks = "often"\n')
    with pytest.raises(UsageError, match=r"quicklooks: .*bool.*'often'"):
        load_config(path, {})
    path.write_text('start = "2024-01"\n')
    with pytest.raises(UsageError, match="aoi: required"):
        load_config(path, {})
    path.write_text('aoi = "aois/a.geojson"\nstart = "-P2D"\nsince_margin = "P2"\n')
    with pytest.raises(UsageError, match="since_margin"):
        load_config(path, {})
    path.write_text('aoi = "aois/a.geojson"\nstart = "-P2D"\nbatch-size = 3\n')
    cfg = load_config(path, {"batch_size": 5, "end": None})
    assert cfg.batch_size == 5 and cfg.start == "-P2D"
    assert cfg.aoi == (tmp_path / "aois" / "a.geojson").resolve()  # relative to the file


def test_config_hash_of_the_cfar_engine_covers_its_parameters():
    base = dict(aoi=Path("a.geojson"), start="2024-01")
    model = RunConfig(**base)
    cfar = RunConfig(**base, engine="cfar")
    assert cfar.output_hash() != model.output_hash()
    for change in (
        {"cfar_k": 7.0},
        {"cfar_guard_m": 500.0},
        {"cfar_background_m": 2000.0},
        {"cfar_min_area_m2": 1},
    ):
        assert RunConfig(**base, engine="cfar", **change).output_hash() != cfar.output_hash(), change
        # a model run's hash does not move with CFAR settings (no redo of model scenes)
        assert RunConfig(**base, **change).output_hash() == model.output_hash(), change
    # generation settings and tile classes do not change a CFAR run's outputs
    same = RunConfig(**base, engine="cfar", max_new_tokens=5, classes=("ship", "sea"))
    assert same.output_hash() == cfar.output_hash()
    assert cfar.stage_hash("tile") == model.stage_hash("tile")  # the tiles are shared


# ---- garbage lock files, symbolic links out of --out (issue 10) ----------------------------------------


@pytest.mark.parametrize(
    "content", [b"\xff\xfe\x00binary\x80", b'[1, "two"]', b'{"pid": "x", "host": 3}', b"[" * 100_000]
)
def test_garbage_lock_file_is_replaced_and_status_explains_it(tmp_path, content, caplog):
    Ledger.open(tmp_path).close()
    (tmp_path / "run.lock").write_bytes(content)
    assert LockInfo.read(tmp_path / "run.lock") == LockInfo(None, None, None, None)
    status = collect_status(tmp_path)
    assert status["lock"] == {"held": False, "holder": None, "stale": False, "unreadable": True}
    with caplog.at_level("WARNING", logger="fusarbatch.outputs.ledger"):
        lock = RunLock(tmp_path).acquire(run_id="after-garbage")
    try:
        assert lock.stale is None
        assert json.loads((tmp_path / "run.lock").read_text())["run_id"] == "after-garbage"
        assert any("run.lock held unreadable content" in r.getMessage() for r in caplog.records)
    finally:
        lock.release()
    assert collect_status(tmp_path)["lock"]["unreadable"] is False


@pytest.fixture
def victim(tmp_path):
    """A file and a folder outside --out that a symbolic link in --out points to: never touched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me\n")
    return outside


def _untouched(victim):
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt"]
    assert (victim / "precious.txt").read_text() == "keep me\n"


@pytest.mark.parametrize(
    "name", ["run.lock", "ledger.sqlite", "ledger.sqlite-journal", "detections", "tiles.zarr"]
)
def test_symbolic_link_in_out_is_refused_before_anything_is_written(tmp_path, victim, name):
    from fusarbatch.outputs.ledger import prepare_out

    out = tmp_path / "out"
    out.mkdir()
    target = victim / "precious.txt" if "." in name and name != "tiles.zarr" else victim
    (out / name).symlink_to(target)
    expected = (
        f"--out {out}: {name} is a symbolic link (to {target}); fusarbatch writes only inside --out: remove "
        "the link (or choose another --out)"
    )
    with pytest.raises(UsageError) as info:
        prepare_out(out)
    assert str(info.value) == expected
    with pytest.raises(UsageError, match="is a symbolic link"):
        Ledger.open(out)  # SQLite would follow the link
    if name == "run.lock":
        with pytest.raises(UsageError, match="is a symbolic link"):
            RunLock(out).acquire()  # O_NOFOLLOW: the file would be truncated
    _untouched(victim)


def test_scene_group_or_partition_linked_out_of_out_is_refused(tmp_path, victim):
    import datetime as dt

    import shapely

    from fusarbatch.outputs.geoparquet import write_table
    from fusarbatch.outputs.ledger import prepare_out

    out = tmp_path / "out"
    (out / "tiles.zarr").mkdir(parents=True)
    (out / "tiles.zarr" / "scene-a").symlink_to(victim)
    with pytest.raises(UsageError, match=r"tiles.zarr/scene-a is a symbolic link"):
        prepare_out(out)
    (out / "tiles.zarr" / "scene-a").unlink()
    (out / "detections").mkdir()
    (out / "detections" / "date=2024-01-15").symlink_to(victim)
    row = {"scene_id": "a", "tile_id": 0, "geometry": shapely.box(0, 0, 1, 1)}
    with pytest.raises(UsageError, match=r"detections/date=2024-01-15 leads to .*outside --out"):
        write_table([row], out, "detections", dt.datetime(2024, 1, 15, tzinfo=dt.UTC), "a")
    _untouched(victim)


def test_run_with_a_symbolic_link_as_lock_is_one_usage_error(tmp_path, victim):
    """End to end: ``fusarbatch run`` into an --out whose run.lock links to a file elsewhere."""
    from tests.conftest import REPO, run_cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").symlink_to(victim / "precious.txt")
    aoi = REPO / "catalogs/demo/aois/camargue.geojson"
    proc = run_cli("run", "--aoi", str(aoi), "--start", "2015-01", "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert json.loads(line)["message"].startswith(f"--out {out}: run.lock is a symbolic link (to {victim}")
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    _untouched(victim)
