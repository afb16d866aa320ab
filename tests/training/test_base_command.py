"""``python -m training base``: what an existing ``--out`` may be (hostile round 6, D1, D2, D14), on real
folders, links and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fusarbatch.errors import UsageError
from training.__main__ import app


def _base(out: Path | str, seed: int = 0):
    return CliRunner().invoke(app, ["base", "--out", str(out), "--preset", "test", "--seed", str(seed)])


def _refused(res, *words: str) -> str:
    assert res.exit_code != 0 and isinstance(res.exception, UsageError), res.output
    message = str(res.exception)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_base_replaces_only_an_empty_folder_or_an_earlier_base_model(tmp_path, monkeypatch):
    """D1: ``--out DIR`` removed whatever DIR held (a user's thesis.txt; ``--out .`` emptied the current
    folder, then a traceback)."""
    user = tmp_path / "userdata"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    _refused(_base(user), "--out", "neither empty nor a base model", "new or empty folder")
    assert sorted(p.name for p in user.iterdir()) == ["thesis.txt"]
    assert _leftovers(tmp_path) == []

    # an empty folder and an earlier base model are replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _base(empty).exit_code == 0
    assert json.loads((empty / "fusarbatch_base.json").read_text())["seed"] == 0
    (empty / "extra.txt").write_text("in an earlier base model")
    res = _base(empty, seed=3)
    assert res.exit_code == 0, res.output
    assert json.loads((empty / "fusarbatch_base.json").read_text())["seed"] == 3
    assert not (empty / "extra.txt").exists()
    assert _leftovers(tmp_path) == []

    # the current folder and the folders above it are never replaced, even when one is a base model
    (empty / "work").mkdir()
    (empty / "work" / "notes.txt").write_text("kept")
    monkeypatch.chdir(empty / "work")
    for out in (".", "", "..", str(empty), str(empty / "work" / ".." / "work"), "/"):
        _refused(_base(out), "the current folder or one above it")
    assert (empty / "work" / "notes.txt").read_text() == "kept"
    assert (empty / "fusarbatch_base.json").is_file() and (empty / "model.safetensors").is_file()
    assert _leftovers(empty / "work") == [] and _leftovers(tmp_path) == []

    # a file is refused as before
    (tmp_path / "file").write_text("x")
    _refused(_base(tmp_path / "file"), "not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_base_refuses_links_and_leaves_no_temporary_folder(tmp_path):
    """D2: a symlink, a dangling symlink or a symlink loop as ``--out`` was a traceback that left a full
    model behind as ``.NAME.tmp-PID``."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("kept")
    links = {"to_folder": real, "dangling": tmp_path / "nowhere", "loop": tmp_path / "loop"}
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    for name in links:
        _refused(_base(tmp_path / name), f"--out {tmp_path / name}", "symbolic link")
    assert (real / "keep.txt").read_text() == "kept" and not (tmp_path / "nowhere").exists()
    assert all((tmp_path / name).is_symlink() for name in links)
    assert _leftovers(tmp_path) == []
    # a loop above --out
    _refused(_base(tmp_path / "loop" / "model"), "cannot resolve the path")
    assert _leftovers(tmp_path) == []


def test_base_removes_the_temporary_folders_of_killed_builds_only(tmp_path):
    """D14: a ``base`` killed by SIGKILL left ``.NAME.tmp-PID`` forever; a live build's folder must stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # the process that runs pytest: alive
    stale = tmp_path / f".model.tmp-{dead.pid}"
    stale_old = tmp_path / f".model.tmp-{dead.pid}-old"
    running = tmp_path / f".model.tmp-{live}"
    other = tmp_path / f".other.tmp-{dead.pid}"  # another --out's: not this run's business
    for folder in (stale, stale_old, running, other):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    res = _base(tmp_path / "model")
    assert res.exit_code == 0, res.output
    assert not stale.exists() and not stale_old.exists()
    assert running.is_dir() and other.is_dir()
    assert (tmp_path / "model" / "fusarbatch_base.json").is_file()
    assert _leftovers(tmp_path) == sorted([running.name, other.name])


@pytest.mark.parametrize("pid", [0, 2**40])
def test_base_keeps_temporary_folders_it_cannot_prove_stale(tmp_path, pid):
    """PID 0 (signal 0 reaches the process group) and one too large for kill(): kept, no traceback."""
    odd = tmp_path / f".model.tmp-{pid}"
    odd.mkdir()
    assert _base(tmp_path / "model").exit_code == 0
    assert (tmp_path / "model" / "config.json").is_file() and odd.is_dir()
