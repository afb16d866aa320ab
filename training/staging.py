"""Outputs that appear only once complete: files are written into a staging folder inside the output folder,
then moved in (``os.replace``, one rename per file on the same file system). A failed or killed save leaves
the staging folder, never a model with some of its files; the next save removes it first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

PARTIAL_MODEL_DIR = ".model.partial"
"""The staging folder, inside the output folder, of a final model's files."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists, so that its staging is not stale (a PID that cannot be signalled for
    lack of rights exists; 0 or a PID too large for ``kill`` counts as alive: nothing is removed on a
    guess)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def make_out_dir(out: Path) -> None:
    """Create the output folder ``out`` (and its parents).

    :raises UsageError: it cannot be created (a file or a dangling link in the way, no permission): one line.
    """
    from fusarbatch.errors import UsageError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"--out {out}: cannot create the folder ({exc.strerror or exc}); choose another --out"
        ) from None


def fresh_staging(final: Path, name: str = PARTIAL_MODEL_DIR) -> Path:
    """``final / name``, emptied (a killed save's leftovers removed): where to write before
    :func:`move_into`."""
    partial = final / name
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def move_into(partial: Path, final: Path, last: str = "fusarbatch_train.json") -> None:
    """Move every entry of the complete staging folder ``partial`` into ``final`` (replacing the same-named
    ones: a folder is removed first, ``os.replace`` does not replace a non-empty one), then remove
    ``partial``. Every destination is checked before the first move, and ``last`` (the file that marks a run
    done) moves last, so that a failure leaves no model that looks complete.

    :raises FusarbatchError: a folder stands where a file goes (or a file where a folder goes); nothing moved.
    """
    from fusarbatch.errors import FusarbatchError

    entries = sorted(partial.iterdir(), key=lambda e: (e.name == last, e.name))
    for entry in entries:
        dest = final / entry.name
        if dest.is_symlink() or not dest.exists():
            continue
        if entry.is_dir() != dest.is_dir():
            kind = "a folder" if dest.is_dir() else "a file"
            raise FusarbatchError(
                f"{dest}: {kind} in the way of the model's {entry.name}; remove it, then rerun (the finished "
                f"model waits in {partial})"
            )
    for entry in entries:
        dest = final / entry.name
        if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    partial.rmdir()
