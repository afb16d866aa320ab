"""Outputs: GeoParquet tables, quick-looks, the run ledger, and output-folder checks."""

from __future__ import annotations

import uuid
from pathlib import Path

from fusarbatch.errors import UsageError


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
