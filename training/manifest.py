"""The triplet manifest (DESIGN 4): JSON Lines, one image-question-answer(-anchors) triplet per line.

Official keys (FUSAR-GPT ``data.py``): ``id``, ``image`` (path relative to the manifest file), ``aef`` (an
``.npz`` with ``features [S, 64] float32`` and ``positions [S, 2] float32`` (y, x) in [0, 1], path relative
to the manifest), ``question``, ``answer`` (a string; for detection a JSON list or ``None``) and
``coordinate_size`` (504: the side of the square grid the boxes of the question and answer live on).

fusarbatch additions, optional on read:

- ``aef`` may be ``null``: the image has no AlphaEarth anchors (the labelled chips carry no geolocation), so
  the TLM leaves its tokens unmodulated (an empty mask). The official loader needs an npz on every line.
- ``task``: ``caption``, ``counting``, ``grounding``, ``classification`` or ``detection``; when missing it is
  inferred from the question (:func:`infer_task`).
- ``meta``: free-form provenance (source dataset, split, fine classes of the boxes, caption origin).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusarbatch.errors import UsageError

__all__ = [
    "TASKS",
    "ManifestError",
    "Triplet",
    "infer_task",
    "read_manifest",
    "read_manifests",
    "write_manifest",
]

TASKS = ("caption", "counting", "grounding", "classification", "detection")
"""The task names, in the order tables list them."""

_REQUIRED = ("id", "image", "question", "answer")


class ManifestError(UsageError):
    """A manifest line is missing, malformed or points at a missing file (exit code 2)."""


@dataclass(frozen=True)
class Triplet:
    """One manifest record; paths are absolute once read (:func:`read_manifest`).

    :ivar id: unique record id.
    :ivar image: image file.
    :ivar question: the prompt (without chat template).
    :ivar answer: the target answer text.
    :ivar aef: anchor ``.npz`` file, or None (no anchors).
    :ivar coordinate_size: side of the square box grid (and of the model input) in pixels.
    :ivar task: one of :data:`TASKS`.
    :ivar meta: provenance, free form.
    """

    id: str
    image: Path
    question: str
    answer: str
    aef: Path | None = None
    coordinate_size: int = 504
    task: str = "caption"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self, root: Path) -> dict[str, Any]:
        """The manifest line as a dict, paths relative to ``root`` (the manifest's folder)."""
        return {
            "id": self.id,
            "image": _relative(self.image, root),
            "aef": None if self.aef is None else _relative(self.aef, root),
            "question": self.question,
            "answer": self.answer,
            "coordinate_size": int(self.coordinate_size),
            "task": self.task,
            "meta": self.meta,
        }


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), root.resolve())).as_posix()


def infer_task(question: str) -> str:
    """The task of a question written by :mod:`fusarbatch.model.prompts` (``caption`` when unknown)."""
    q = question.lower()
    if "detect the following object" in q:
        return "detection"
    if "count the" in q:
        return "counting"
    if "3x3 grid" in q:
        return "grounding"
    if "what is the category" in q:
        return "classification"
    return "caption"


def read_manifest(path: str | Path, *, check_files: bool = True) -> list[Triplet]:
    """Read a manifest; relative paths are resolved against the manifest's folder.

    :param path: the ``.jsonl`` file.
    :param check_files: fail when an image or anchor file is missing.
    :raises ManifestError: unreadable file, bad JSON, missing keys, wrong types, duplicate ids or missing
        files (the message names the file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p}: file missing; build one with `python -m training build`")
    root = p.resolve().parent
    records: list[Triplet] = []
    seen: set[str] = set()
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"manifest {p}, line {lineno}"
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ManifestError(f"{where}: not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: a line must be a JSON object")
            missing = [k for k in _REQUIRED if k not in obj]
            if missing:
                raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}")
            for key in ("id", "image", "question", "answer"):
                if not isinstance(obj[key], str):
                    raise ManifestError(f"{where}: {key!r} must be a string")
            aef = obj.get("aef")
            if aef is not None and not isinstance(aef, str):
                raise ManifestError(f"{where}: 'aef' must be a path or null")
            size = obj.get("coordinate_size", 504)
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ManifestError(f"{where}: 'coordinate_size' must be a positive integer")
            task = obj.get("task") or infer_task(obj["question"])
            if task not in TASKS:
                raise ManifestError(f"{where}: unknown task {task!r} (expected one of {', '.join(TASKS)})")
            if obj["id"] in seen:
                raise ManifestError(f"{where}: duplicate id {obj['id']!r}")
            seen.add(obj["id"])
            image = Path(os.path.normpath(root / obj["image"]))
            aef_path = None if aef is None else Path(os.path.normpath(root / aef))
            if check_files:
                for f in (image, aef_path):
                    if f is not None and not f.is_file():
                        raise ManifestError(f"{where}: file {f} missing")
            meta = obj.get("meta") or {}
            records.append(
                Triplet(
                    id=obj["id"],
                    image=image,
                    question=obj["question"],
                    answer=obj["answer"],
                    aef=aef_path,
                    coordinate_size=size,
                    task=task,
                    meta=meta if isinstance(meta, dict) else {"meta": meta},
                )
            )
    return records


def read_manifests(paths: Sequence[str | Path]) -> list[Triplet]:
    """Read several manifests into one list (ids must stay unique across them)."""
    out: list[Triplet] = []
    seen: set[str] = set()
    for path in paths:
        for rec in read_manifest(path):
            if rec.id in seen:
                raise ManifestError(f"manifest {path}: id {rec.id!r} also appears in an earlier manifest")
            seen.add(rec.id)
            out.append(rec)
    return out


def write_manifest(path: str | Path, records: Iterable[Triplet]) -> int:
    """Write records as JSON Lines (atomically: a temporary file renamed into place); returns the count.

    Paths are written relative to the manifest's folder.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    root = p.resolve().parent
    n = 0
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".jsonl", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec.to_json(root), ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
