"""User-facing errors.

Every error a user can cause is raised as a :class:`FusarbatchError` whose message is one line that names
the input and the fix. The CLI prints it without a traceback and exits with :attr:`exit_code`.

Exit codes (README): 0 all done, 1 some scenes failed or a runtime error, 2 usage error (bad input),
75 locked.
"""

from __future__ import annotations

import errno
import os
import re


class FusarbatchError(Exception):
    """Base class: a one-line, user-facing error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1


class UsageError(FusarbatchError):
    """Bad input from the user (arguments, AOI file, config): exit code 2."""

    exit_code = 2


class AOIError(UsageError):
    """The AOI file is missing, malformed, empty or overlaps nothing."""


class CatalogError(FusarbatchError):
    """A catalog cannot be resolved, opened or searched (unknown name, unreachable URL, bad file)."""

    exit_code = 2


class SceneError(FusarbatchError):
    """One scene cannot be processed (missing or unreadable asset, corrupt raster).

    Raised per scene: the pipeline records the scene as failed with this message and goes on.
    """


class ModelError(FusarbatchError):
    """A model, adapter or TLM directory is missing, incomplete or does not match (exit code 2)."""

    exit_code = 2


class NoWorkerError(FusarbatchError):
    """The Dask cluster has had no live worker for longer than the task timeout (the only worker died):
    the run stops sending work to it; the scenes not done fail with this message."""


#: errno values that mean "the output device is full" (or a per-user or per-file limit on it was hit).
_DISK_FULL = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file-size limit"}


def as_os_error(exc: BaseException) -> BaseException:
    """``exc`` itself, or the :class:`OSError` that safetensors reports only in its message: a failed write is
    ``SafetensorError("... (os error N)")``, not an ``OSError``."""
    if isinstance(exc, OSError):
        return exc
    code = re.search(r"\(os error (\d+)\)", str(exc))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else exc


def disk_full(
    exc: BaseException, writing: str = "the outputs", fix: str = "rerun (earlier outputs are kept)"
) -> str | None:
    """One line when ``exc`` (or an exception in its cause/context chain) is a write that failed for lack of
    space: ``disk full (No space left on device: '<path>') while writing <writing>; free space, then
    <fix>``, ``disk quota exceeded (...)`` or ``disk full: file-size limit reached (File too large)``
    (``RLIMIT_FSIZE``, ``ulimit -f``); else ``None``. Safetensors' write errors count
    (:func:`as_os_error`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        failed = as_os_error(current)
        if isinstance(failed, OSError) and failed.errno in _DISK_FULL:
            where = f": {failed.filename!r}" if failed.filename else ""
            what = _DISK_FULL[failed.errno]
            head = "disk full: file-size limit reached" if failed.errno == errno.EFBIG else what
            return f"{head} ({failed.strerror}{where}) while writing {writing}; free space, then {fix}"
        current = current.__cause__ or current.__context__
    return None
