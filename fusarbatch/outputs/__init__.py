"""Outputs: GeoParquet tables, quick-looks, the run ledger, and output-folder checks."""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusarbatch.errors import UsageError

#: Arrays of a complete scene group of the tile store (:mod:`fusarbatch.tiling.store`).
SCENE_ARRAYS = ("backscatter", "transform", "row_off", "col_off", "valid_fraction")
#: Arrays that ``aef_complete`` adds (:mod:`fusarbatch.features.anchors`).
AEF_ARRAYS = ("aef_features", "aef_positions", "aef_mask")
#: Zarr's own temporary file (``LocalStore`` writes ``zarr.json`` as ``zarr.<uuid hex>.partial``, then
#: renames it): left behind when a process is killed in between.
ZARR_TEMP = re.compile(r"^zarr\.[0-9a-f]{32}\.partial$")
#: Largest ``zarr.json`` read when the store is inspected, bytes.
_MAX_ZARR_JSON_BYTES = 64 * 2**20


def ensure_writable_dir(out: Path, flag: str = "--out") -> None:
    """Create ``out`` if needed and check that a file can be written in it.

    :raises UsageError: ``out`` is a file, cannot be created, or is not writable (one line naming it).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"{flag} {out}: not a writable folder ({exc.strerror}); choose another folder"
        ) from None


def check_inside(out: Path, path: Path) -> None:
    """Refuse to write ``path`` when its folder, links resolved, is not inside ``out`` (e.g.
    ``detections/date=2024-01-15`` made a symbolic link to another place).

    :raises UsageError: one line naming the path and where it leads.
    """
    where = path.parent.resolve()
    if not where.is_relative_to(Path(out).resolve()):
        raise UsageError(
            f"--out {out}: {path.parent} leads to {where}, outside --out (a symbolic link?); fusarbatch "
            "writes only inside --out: remove the link"
        )


def publish_staged(staged: Sequence[tuple[Path, Path]]) -> None:
    """Rename each ``(temporary, final)`` pair into place, in order (the files were all written first)."""
    for tmp, final in staged:
        os.replace(tmp, final)


def discard_staged(staged: Sequence[tuple[Path, Path]]) -> None:
    """Delete the temporary files of ``(temporary, final)`` pairs not published."""
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)


def group_attrs(group: Path) -> dict[str, Any] | None:
    """The attributes in ``<group>/zarr.json``; ``None`` when it is missing, not a regular file, too large
    or not JSON."""
    from fusarbatch.errors import FusarbatchError
    from fusarbatch.files import read_capped

    try:
        meta = json.loads(read_capped(group / "zarr.json", "zarr.json", UsageError, _MAX_ZARR_JSON_BYTES))
    except (OSError, ValueError, RecursionError, FusarbatchError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def missing_arrays(group: Path, attrs: dict[str, Any]) -> list[str]:
    """The arrays a scene group should hold by its attributes (``complete``: :data:`SCENE_ARRAYS`;
    ``aef_complete``: :data:`AEF_ARRAYS` too) whose ``zarr.json`` is not there."""
    wanted = [*SCENE_ARRAYS] if attrs.get("complete") is True else []
    if attrs.get("aef_complete") is True:
        wanted += AEF_ARRAYS
    return [name for name in wanted if not (group / name / "zarr.json").is_file()]


def zarr_temp_files(store: Path) -> list[Path]:
    """Zarr's temporary metadata files (:data:`ZARR_TEMP`) in the store root, its groups and their
    arrays."""
    if not store.is_dir():
        return []
    found = []
    groups = (g for g in store.iterdir() if g.is_dir() and not g.is_symlink() and not g.name.startswith("."))
    for level in (store, *groups):
        for p in level.iterdir():
            if ZARR_TEMP.match(p.name) and p.is_file():
                found.append(p)
            elif level is not store and p.is_dir() and not p.is_symlink():
                found += [q for q in p.iterdir() if ZARR_TEMP.match(q.name) and q.is_file()]
    return sorted(found)
