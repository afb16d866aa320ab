"""Operations (DESIGN 3.7, issue 5) on the real ``fusarbatch`` command: SIGKILL during tiling, inference and
writing then rerun (outputs equal an uninterrupted run), two concurrent runs and ``--wait``, taking over the
lock of a killed run, ``fusarbatch status``, JSON-lines logs and ``--log-file``, rich progress on a
terminal, disk full (a real small filesystem, and a file-size limit), configuration files, and
``--scheduler`` on a real Dask cluster (scheduler and worker processes started here on loopback).

The kill points come from the pipeline's test hook (``FUSARBATCH_TEST_PAUSE_AT``, see
:mod:`fusarbatch.pipeline`): the run pauses at a known point and says so in a file; the test then kills it
with SIGKILL. Runs use the tiny random demo model, 8 new tokens, and the three demo scenes (camargue 2015,
SEN12MS 2017, a GCP-only quick-look 2021); ``--batch-size 1`` gives the 2-tile scene two model tasks.
"""

from __future__ import annotations

import json
import os
import pty
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr

from fusarbatch.outputs.geoparquet import KINDS
from tests.conftest import REPO, free_port, run_cli, stop_process

AOIS = REPO / "catalogs" / "demo" / "aois"
CAMARGUE = "S1A_IW_GRD_20150309T173017_VV_camargue"
SEN12MS = "SEN12MS_ROIs1158_spring_s1_1_p30"
QUICKLOOK = "S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255_quicklook"
ALL = (CAMARGUE, SEN12MS, QUICKLOOK)
BOUNDED_S = 240


def run_args(out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--aoi",
        str(AOIS / "demo_all.geojson"),
        "--start",
        "2015-01",
        "--out",
        str(out),
        "--model",
        str(model),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "1",
        "--device",
        "cpu",
        *extra,
    ]


def command(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "fusarbatch"
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "fusarbatch.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250", **extra}
    env.pop("FUSARBATCH_CATALOGS", None)
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` parsed as JSON (fails on a line that is not)."""
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON line: {line!r} in:\n{text}") from None
    return rows


def events(text: str, event: str) -> list[dict[str, Any]]:
    return [r for r in json_lines(text) if r.get("event") == event]


def status_json(out: Path) -> dict[str, Any]:
    proc = run_cli("status", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def start_paused(
    out: Path, model: Path, point: str, tmp: Path, *extra: str
) -> tuple[subprocess.Popen, dict[str, Any], Path]:
    """Start a run that pauses at ``point`` (the pipeline's test hook); wait until it is there."""
    pause = tmp / f"pause-{point.replace(':', '-')}"
    err = tmp / f"paused-{point.replace(':', '-')}.err"
    proc = subprocess.Popen(
        command(*run_args(out, model, *extra)),
        cwd=REPO,
        env=cli_env(FUSARBATCH_TEST_PAUSE_AT=point, FUSARBATCH_TEST_PAUSE_FILE=str(pause)),
        stdout=subprocess.DEVNULL,
        stderr=err.open("w"),
    )
    deadline = time.monotonic() + BOUNDED_S
    while not pause.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before pausing at {point}: {err.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach {point} within {BOUNDED_S} s")
        time.sleep(0.05)
    time.sleep(0.05)
    return proc, json.loads(pause.read_text()), pause


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


# ------------------------------------------------------------------------------------- output comparison


def output_files(out: Path) -> list[str]:
    """Every file under the output folders and the tile store, relative (dot files included)."""
    files = []
    for kind in (*KINDS, "quicklooks", "tiles.zarr"):
        files += [str(p.relative_to(out)) for p in (out / kind).rglob("*") if p.is_file()]
    return sorted(files)


def assert_same_outputs(ref: Path, out: Path) -> None:
    """``out`` holds what the uninterrupted run wrote in ``ref``: the same files (no leftovers), the same
    rows in every table (apart from ``run_id``), no duplicates, identical quick-looks, complete Zarr
    groups with identical arrays and attributes (apart from the ids of each write, which must be those
    the outputs record), and a ledger with every scene done."""
    assert output_files(out) == output_files(ref)
    assert not [f for f in output_files(out) if "/." in f or f.startswith(".")]
    for kind in KINDS:
        for path in sorted((ref / kind).glob("date=*/*.parquet")):
            rel = path.relative_to(ref)
            a = pd.read_parquet(path).drop(columns=["run_id"])
            b = pd.read_parquet(out / rel).drop(columns=["run_id"])
            pd.testing.assert_frame_equal(a, b, obj=str(rel))
    tiles = pd.concat([pd.read_parquet(p) for p in (out / "tiles").glob("date=*/*.parquet")])
    assert not tiles.duplicated(["scene_id", "tile_id"]).any() and set(tiles.scene_id) == set(ALL)
    detections = pd.concat([pd.read_parquet(p) for p in (out / "detections").glob("date=*/*.parquet")])
    assert not detections.detection_id.duplicated().any()
    for png in sorted((ref / "quicklooks").glob("*.png")):
        assert png.read_bytes() == (out / "quicklooks" / png.name).read_bytes(), png.name
    for scene in ALL:
        g_ref = zarr.open_group(str(ref / "tiles.zarr" / scene), mode="r")
        g_out = zarr.open_group(str(out / "tiles.zarr" / scene), mode="r")
        assert g_out.attrs["complete"] is True and g_out.attrs["aef_complete"] is True
        # the ids of each write differ from run to run (like run_id); the outputs record the group's own
        write_ids = ("tiling_id", "aef_id", "outputs_made_from")
        made = g_out.attrs["outputs_made_from"]
        assert (made["tiling_id"], made["aef_id"]) == (g_out.attrs["tiling_id"], g_out.attrs["aef_id"])
        assert {k: v for k, v in g_out.attrs.items() if k not in write_ids} == {
            k: v for k, v in g_ref.attrs.items() if k not in write_ids
        }
        assert sorted(g_out.array_keys()) == sorted(g_ref.array_keys())
        for name in g_ref.array_keys():
            np.testing.assert_array_equal(g_out[name][:], g_ref[name][:], err_msg=f"{scene}/{name}")
    status = status_json(out)
    assert [(r["status"], r["n"]) for r in status["scenes"]] == [("done", 3)]
    assert status["missing_outputs"] == [] and status["leftovers"] == [] and status["out_of_step"] == []


# ------------------------------------------------------------------------------------ the reference run


@pytest.fixture(scope="module")
def reference(tmp_path_factory, generated_demo_model):
    """An uninterrupted run over the three demo scenes, with ``--log-file``."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "out"
    proc = run_cli(
        *run_args(out, generated_demo_model, "--log-file", str(tmp / "run.log")), timeout=BOUNDED_S
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc, tmp / "run.log"


def test_cron_logs_are_json_lines_with_scene_ids_and_log_file(reference):
    out, proc, log_file = reference
    records = json_lines(proc.stderr)  # not a terminal: every line is JSON
    run_ids = {r["run_id"] for r in records}
    assert len(run_ids) == 1
    done = events(proc.stderr, "scene_done")
    assert sorted(r["scene"] for r in done) == sorted(ALL)
    assert all(r["status"] == "ok" and r["level"] == "info" and r["seconds"] > 0 for r in done)
    stages = {(r["scene"], r["stage"]) for r in events(proc.stderr, "stage")}
    assert stages == {(s, st) for s in ALL for st in ("tile", "features", "infer", "write")}
    assert events(proc.stderr, "scenes")[0]["total"] == 3
    in_file = json_lines(log_file.read_text())
    assert [r for r in in_file if r.get("event")] == [r for r in records if r.get("event")]
    assert "run " + run_ids.pop() in proc.stdout  # the summary table stays on stdout
    ledger_runs = status_json(out)["runs"]
    assert ledger_runs[0]["status"] == "ok" and ledger_runs[0]["exit_code"] == 0


@pytest.mark.parametrize("point", ["tile:2", "write:2"])
def test_sigkill_during_tiling_or_writing_then_rerun_equals_uninterrupted(
    point, reference, generated_demo_model, tmp_path
):
    ref, _, _ = reference
    out = tmp_path / "out"
    proc, info, _ = start_paused(out, generated_demo_model, point, tmp_path)
    assert info["scene"] == SEN12MS and info["pid"] == proc.pid
    if point.startswith("tile"):
        # inside tiling: the scene's partial group holds tiles but is not complete, not published
        partial = out / "tiles.zarr" / f".{SEN12MS}.partial-{proc.pid}"
        assert (partial / "backscatter" / "c").is_dir()
        assert json.loads((partial / "zarr.json").read_text())["attributes"]["complete"] is False
        assert not (out / "tiles.zarr" / SEN12MS).exists()
    else:
        # inside writing: the detections file is replaced, the tiles and counts files not yet
        assert (out / "detections" / "date=2017-03-01" / f"{SEN12MS}.parquet").is_file()
        assert not (out / "tiles" / "date=2017-03-01" / f"{SEN12MS}.parquet").exists()
    kill(proc)
    dead = status_json(out)
    assert dead["lock"] == {
        "held": False,
        "holder": dead["lock"]["holder"],
        "stale": True,
        "unreadable": False,
    }
    assert dead["lock"]["holder"]["pid"] == proc.pid and dead["running_without_run"] >= 1
    rerun = run_cli(*run_args(out, generated_demo_model), timeout=BOUNDED_S)
    assert rerun.returncode == 0, rerun.stderr
    took_over = [r for r in json_lines(rerun.stderr) if "took over the lock" in r["message"]]
    assert len(took_over) == 1 and f"pid {proc.pid}" in took_over[0]["message"]
    done = {r["scene"]: r for r in events(rerun.stderr, "scene_done")}
    skipped = [r["scene"] for r in events(rerun.stderr, "skipped")]
    if point.startswith("tile"):
        assert sorted(done) == sorted(ALL) and skipped == []
        assert done[CAMARGUE]["reused"] == "tile,features"  # it was at inference: tiles kept
        assert "reused" not in done[SEN12MS]  # its tiling was cut: redone
        assert any("partial" in r["message"] for r in json_lines(rerun.stderr))  # leftover removed
    else:
        assert skipped == [CAMARGUE] and sorted(done) == sorted((SEN12MS, QUICKLOOK))
    assert_same_outputs(ref, out)
    assert [r["status"] for r in status_json(out)["runs"]] == ["ok", "killed"]


def test_concurrent_runs_wait_and_sigkill_during_inference(reference, generated_demo_model, tmp_path):
    """Run A pauses during inference; run B on the same --out exits 75 at once with one line; status
    shows A holding the lock; run C --wait waits; A is killed with SIGKILL; C takes the lock over, redoes
    what A left, and ends with the outputs of an uninterrupted run."""
    ref, _, _ = reference
    out = tmp_path / "out"
    a, info, _ = start_paused(out, generated_demo_model, "infer:1", tmp_path)
    assert info["scene"] == CAMARGUE

    started = time.monotonic()
    b = run_cli(*run_args(out, generated_demo_model), timeout=60)
    b_seconds = time.monotonic() - started
    assert b.returncode == 75
    lines = b.stderr.strip().splitlines()
    assert len(lines) == 1, b.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error" and record["exit_code"] == 75
    assert f"is locked by another fusarbatch run (pid {a.pid}" in record["message"]
    assert "--wait" in record["message"]
    assert b_seconds < 15, b_seconds  # before the heavy imports: python start-up plus ~1 s of grace
    assert b.stdout == ""

    status = status_json(out)
    assert status["lock"]["held"] and status["lock"]["holder"]["pid"] == a.pid
    running = {(r["status"], r["stage"]) for r in status["scenes"]}
    assert ("running", "infer") in running

    c_err = tmp_path / "c.err"
    c = subprocess.Popen(
        command(*run_args(out, generated_demo_model, "--wait")),
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=c_err.open("w"),
        text=True,
    )
    deadline = time.monotonic() + 60
    while "waiting (--wait)" not in c_err.read_text():
        assert c.poll() is None, c_err.read_text()
        assert time.monotonic() < deadline, "run C never said it was waiting"
        time.sleep(0.05)
    kill(a)
    stdout, _ = c.communicate(timeout=BOUNDED_S)
    assert c.returncode == 0, c_err.read_text()
    messages = [r["message"] for r in json_lines(c_err.read_text())]
    assert any(
        f"took over the lock of --out {out} left by a run that is gone (pid {a.pid}" in m for m in messages
    )
    assert "3 processed (0 failed), 0 skipped" in stdout
    assert_same_outputs(ref, out)

    text = run_cli("status", "--out", str(out))
    assert text.returncode == 0
    assert "3 scene(s); lock: free" in text.stdout
    assert re.search(r"^done\s+done\s+3$", text.stdout, re.M)  # scenes by status and stage
    assert re.search(r"^infer\s+3\s+0\s+0\s+0$", text.stdout, re.M)  # stages: done failed running interr.
    assert re.search(r"\sok\s+0\s+3\s+0\s+3\s+0\s", text.stdout)  # C: exit 0, found 3, 0 skipped, 3 done
    assert re.search(r"\s-\s+killed\s+-\s+3\s", text.stdout)  # A: killed, no exit code
    assert "done scenes with missing output files: 0" in text.stdout
    print(text.stdout)


def test_sigterm_stops_the_run_cleanly(generated_demo_model, tmp_path):
    """systemd stops a service with SIGTERM: the run records itself interrupted, releases the lock
    cleanly and exits 130; its scene is marked interrupted (the next run redoes it)."""
    out = tmp_path / "out"
    proc, info, _ = start_paused(
        out, generated_demo_model, "infer:1", tmp_path, "--aoi", str(AOIS / "camargue.geojson")
    )
    assert info["scene"] == CAMARGUE
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    status = status_json(out)
    assert status["lock"] == {"held": False, "holder": None, "stale": False, "unreadable": False}  # emptied
    assert status["runs"][0]["status"] == "interrupted" and status["runs"][0]["exit_code"] == 130
    assert [(f["scene_id"], f["status"], f["stage"]) for f in status["failures"]] == [
        (CAMARGUE, "interrupted", "infer")
    ]


# --------------------------------------------------------------------------------------------- disk full


def snapshot(out: Path) -> dict[str, Any]:
    """Every table (rows without run_id) and quick-look of an output folder."""
    snap: dict[str, Any] = {}
    for kind in KINDS:
        for p in sorted((out / kind).glob("date=*/*.parquet")):
            snap[str(p.relative_to(out))] = pd.read_parquet(p).drop(columns=["run_id"])
    for p in sorted((out / "quicklooks").glob("*.png")):
        snap[str(p.relative_to(out))] = p.read_bytes()
    return snap


def assert_snapshot(out: Path, snap: dict[str, Any]) -> None:
    now = snapshot(out)
    assert sorted(now) == sorted(snap)
    for key, value in snap.items():
        if isinstance(value, bytes):
            assert now[key] == value, key
        else:
            pd.testing.assert_frame_equal(now[key], value, obj=key)


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 24 MB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise: the size-limit test below
    covers the same path without privileges)."""
    mount = shutil.which("mount")
    target = tmp_path / "small"
    target.mkdir()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(target)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_disk_full_while_writing_fails_the_scenes_and_loses_nothing(
    small_filesystem, generated_demo_model, tmp_path
):
    out = small_filesystem / "out"
    first = run_cli(*run_args(out, generated_demo_model), timeout=BOUNDED_S)
    assert first.returncode == 0, first.stderr
    before = snapshot(out)
    # --force redoes every scene; when the first one's answers come in, just before its outputs are
    # written (to temporary names, renamed together once all are), the disk is filled up
    proc, info, pause = start_paused(out, generated_demo_model, "infer:1", tmp_path, "--force")
    assert info["scene"] == CAMARGUE
    ballast = small_filesystem / "ballast"
    free = os.statvfs(small_filesystem).f_bavail * os.statvfs(small_filesystem).f_frsize
    with ballast.open("wb") as fh:  # leave 64 kB: less than a quick-look, more than a ledger update
        fh.write(b"\0" * max(0, free - 64 * 1024))
    pause.unlink()  # let the run go on
    proc.wait(timeout=BOUNDED_S)
    err = (tmp_path / "paused-infer-1.err").read_text()
    assert proc.returncode == 1, err
    status = status_json(out)
    failures = {f["scene_id"]: f for f in status["failures"]}
    # camargue fails while its outputs are written; the quick-look scene while its tiles are (its old,
    # complete group stays: issue 10)
    assert failures[CAMARGUE]["stage"] == "write" and failures[QUICKLOOK]["stage"] == "tile", err
    assert all("disk full (No space left on device" in f["reason"] for f in failures.values()), failures
    assert status["disk"]["tiles.zarr"]["complete"] == 3
    assert set(failures) | {r["scene"] for r in events(err, "scene_done") if r["status"] == "ok"} == set(ALL)
    assert status["leftovers"] == []  # temporary files were removed
    assert_snapshot(out, before)  # every earlier table and quick-look is intact, none truncated
    ballast.unlink()
    assert status_json(out)["scenes_total"] == 3  # the ledger stayed readable and consistent


def test_file_size_limit_fails_the_scenes_cleanly(reference, generated_demo_model, tmp_path):
    """RLIMIT_FSIZE (no privileges needed; writes fail with EFBIG, as on a full disk): 150 kB per file lets
    the single-polarisation scene through (its float16 + zstd tile chunk: ~95 kB) and stops the
    dual-polarisation ones (~0.2 and ~1.1 MB chunks) while they are written, in a --force redo. Their
    complete groups of the earlier run stay (issue 10: failure markers replaced them), and the reason says
    disk full, not a source raster."""
    ref, _, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    before = snapshot(out)
    limit = 150_000

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        command(*run_args(out, generated_demo_model, "--force")),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=BOUNDED_S,
        preexec_fn=limit_files,
    )
    assert proc.returncode == 1, proc.stderr
    failed = {r["scene"]: r for r in events(proc.stderr, "scene_done") if r["status"] == "failed"}
    assert sorted(failed) == sorted((SEN12MS, QUICKLOOK))
    assert all(r["stage"] == "tile" for r in failed.values())
    assert {r["error"] for r in failed.values()} == {
        "tile: disk full: file-size limit reached (File too large) while writing the tile store; free space, "
        "then rerun (earlier outputs are kept)"
    }
    assert re.search(r"^S1A_IW_GRD_20150309T173017_VV_camargue\s+ok\s", proc.stdout, re.M)
    assert_snapshot(out, before)
    status = status_json(out)
    assert status["leftovers"] == []
    zarr_disk = status["disk"]["tiles.zarr"]
    assert {k: v for k, v in zarr_disk.items() if k != "bytes"} == {
        "complete": 3,
        "failed": 0,
        "incomplete": 0,
        "corrupt": 0,
    }
    assert zarr_disk["bytes"] > 0
    for scene in (SEN12MS, QUICKLOOK):  # the last good tiles, as the reference run wrote them
        g_ref = zarr.open_group(str(ref / "tiles.zarr" / scene), mode="r")
        g_out = zarr.open_group(str(out / "tiles.zarr" / scene), mode="r")
        np.testing.assert_array_equal(g_out["backscatter"][:], g_ref["backscatter"][:])
    assert {(r["status"], r["n"]) for r in status["scenes"]} == {("done", 1), ("failed", 2)}


# ---------------------------------------------------------------------------- terminal and configuration


def test_terminal_gets_rich_progress_not_json(reference, generated_demo_model, tmp_path):
    ref, _, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        command(*run_args(out, generated_demo_model, "--force", "--aoi", str(AOIS / "camargue.geojson"))),
        cwd=REPO,
        env=cli_env(TERM="xterm-256color", COLUMNS="160"),
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=BOUNDED_S)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    assert '{"time"' not in text  # no JSON on a terminal
    assert "━" in text  # the rich progress bar, its description following the stages
    assert re.search(r"(tile|features|infer|write): S1A_IW_GRD", text), text
    assert "┃" in text or "│" in text  # the summary as a rich table


def test_run_takes_every_config_key_as_a_flag():
    import typer

    from fusarbatch.cli import _RUN_FLAG_FIELDS, app
    from fusarbatch.config import RunConfig

    params = typer.main.get_command(app).commands["run"].params
    names = {_RUN_FLAG_FIELDS.get(p.name, p.name) for p in params} - {"config"}
    assert names == set(RunConfig.model_fields)


def test_config_file_flags_and_show_round_trip(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        f'aoi = "{AOIS / "camargue.geojson"}"\nstart = "-P2D"\nbatch_size = 3\nlabels = ["ship", "oil rig"]\n'
        'out = "results"\nsince-last-run = true\nquicklooks = false\n'
    )
    shown = run_cli("config", "show", "--config", str(config), "--batch-size", "5", "--quicklooks")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "batch_size = 5\n" in text  # flag beats file
    assert 'labels = ["ship", "oil rig"]\n' in text  # file beats default
    assert "quicklooks = true\n" in text and "since_last_run = true\n" in text
    assert f'out = "{tmp_path / "results"}"\n' in text  # relative to the file
    assert "max_new_tokens = 128\n" in text and "# end =\n" in text  # defaults, unset keys commented
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert run_cli("config", "show", "--config", str(again)).stdout == text  # reads back to the same

    config.write_text('aoi = "a.geojson"\nstart = "2024-01"\nbatch = 3\n')
    bad = run_cli("run", "--config", str(config))
    assert bad.returncode == 2 and "unknown key 'batch'" in bad.stderr and "Traceback" not in bad.stderr
    config.write_text('aoi = "a.geojson"\nstart = "2024-01"\nmax_new_tokens = "lots"\n')
    bad = run_cli("run", "--config", str(config))
    assert bad.returncode == 2 and "max_new_tokens" in bad.stderr and "'lots'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = run_cli("run", "--config", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and "missing.toml" in bad.stderr


# ------------------------------------------------------------------------------------------- scale-out
# ``fusarbatch run --scheduler`` against a real Dask cluster started here on loopback: a ``dask scheduler``
# process and a ``dask worker --resources GPU=1`` process (the ``dask`` command of this environment), with
# bounded waits and both stopped at teardown. Plus an unreachable scheduler.

START_S = 90


def _dask() -> list[str]:
    beside = Path(sys.executable).parent / "dask"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "dask"]


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[str]:
    """``tcp://127.0.0.1:PORT`` of a scheduler with one worker declaring ``GPU=1`` (2 threads)."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    scheduler = subprocess.Popen(
        [*_dask(), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(logs / "scheduler.log").open("w"),
    )
    worker = None
    try:
        worker = subprocess.Popen(
            [
                *_dask(),
                "worker",
                address,
                "--host",
                "127.0.0.1",
                "--nworkers",
                "1",
                "--nthreads",
                "2",
                "--resources",
                "GPU=1",
                "--no-dashboard",
                "--name",
                "gpu-worker-0",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(logs / "worker.log").open("w"),
        )
        deadline = time.monotonic() + START_S
        client = None
        while client is None:
            if scheduler.poll() is not None or worker.poll() is not None:
                pytest.fail(f"dask exited: {(logs / 'scheduler.log').read_text()[-2000:]}")
            try:
                client = Client(address, timeout="2s")
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no dask scheduler on {address} after {START_S} s")
                time.sleep(0.2)
        with client:
            client.wait_for_workers(1, timeout=START_S)
            workers = client.scheduler_info()["workers"].values()
            assert [w["resources"] for w in workers] == [{"GPU": 1}]
        yield address
    finally:
        if worker is not None:
            stop_process(worker)
        stop_process(scheduler)


def test_run_on_an_existing_cluster(dask_cluster, reference, generated_demo_model, tmp_path):
    """``--scheduler``: a real ``dask scheduler`` and ``dask worker --resources GPU=1`` (other processes):
    the worker runs the model, the scheduler is left with nothing, the outputs are the LocalCluster's."""
    from distributed import Client

    ref, _, _ = reference
    out = tmp_path / "out"
    proc = run_cli(*run_args(out, generated_demo_model, "--scheduler", dask_cluster), timeout=BOUNDED_S)
    assert proc.returncode == 0, proc.stderr
    done = events(proc.stderr, "scene_done")
    assert sorted(r["scene"] for r in done) == sorted(ALL) and all(r["status"] == "ok" for r in done)
    with Client(dask_cluster, timeout="10s") as client:

        def cached_models() -> list[str]:
            from fusarbatch.inference.workers import _models

            return sorted({spec.model_dir for spec in _models})

        # the model ran in the worker process: its model cache holds the demo model
        assert list(client.run(cached_models).values()) == [[str(generated_demo_model)]]
        assert os.getpid() not in client.run(os.getpid).values()

        def left(dask_scheduler: Any) -> tuple[int, int, int]:
            spans = dask_scheduler.extensions["spans"].spans
            return len(dask_scheduler.tasks), len(dask_scheduler.task_groups), len(spans)

        # tasks released scene by scene; one span for the whole run (not one per computation)
        assert client.run_on_scheduler(left) == (0, 0, 1)
    assert_same_outputs(ref, out)


def test_unreachable_scheduler_fails_within_the_timeout(generated_demo_model, tmp_path):
    """``--scheduler`` to a port nothing listens on: a clear error within ``--scheduler-timeout``, before
    any search, recorded in the ledger (in-process: the CLI's exit code 1 comes from the same error)."""
    from fusarbatch.config import RunConfig
    from fusarbatch.errors import FusarbatchError
    from fusarbatch.pipeline import run

    address = f"tcp://127.0.0.1:{free_port()}"
    cfg = RunConfig(
        aoi=AOIS / "camargue.geojson",
        start="2015-01",
        out=tmp_path / "out",
        model=generated_demo_model,
        scheduler=address,
        scheduler_timeout_s=3,
    )
    started = time.monotonic()
    with pytest.raises(FusarbatchError) as info:
        run(cfg)
    assert time.monotonic() - started < 20
    assert f"--scheduler {address}: cannot connect within 3 s" in str(info.value)
    assert info.value.exit_code == 1
    status = status_json(tmp_path / "out")
    last = status["runs"][0]
    assert last["status"] == "error" and last["exit_code"] == 1 and address in last["error"]
    assert (
        status["scenes_total"] == 0 and status["lock"]["held"] is False and status["lock"]["holder"] is None
    )
