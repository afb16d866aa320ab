"""Local input files, read safely: regular files only, and a size cap on every read.

Inputs named by a user or an untrusted catalog (catalog files, STAC items, AOIs, config files, AEF index
tables and COGs, raster assets, model files) may be anything the file system holds. Two kinds of path make
a naive reader hang or eat the node's memory:

- a FIFO (named pipe): ``open()`` for reading blocks until some process opens it for writing, for ever in a
  cron job; a socket or a terminal device blocks the same way;
- a character device such as ``/dev/zero`` or ``/dev/urandom``: a read never ends.

:func:`check_regular` refuses everything that is not a regular file (``os.stat`` + ``stat.S_ISREG``, links
followed) before anything opens it; use it before a path is handed to a library (rasterio, pandas,
safetensors). :func:`read_capped` reads a file for the caller: it checks the path, opens it with
``O_NONBLOCK`` (so a FIFO swapped in after the check cannot block the open either), checks the open file
again, and reads at most ``max_bytes`` (a file that claims size 0 but never ends, as some ``/proc`` files,
still stops there).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fusarbatch.errors import FusarbatchError

#: Largest TOML file read (run configurations, catalog definitions): bytes.
MAX_TOML_BYTES = 1 * 2**20
#: Largest JSON document read from a local file (STAC catalog, collection or item; Zarr metadata): bytes.
MAX_JSON_BYTES = 64 * 2**20

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``a regular file``, ``a FIFO (named pipe)``, ``a directory`` ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(
    path: str | os.PathLike[str], what: str, error: type[FusarbatchError], fix: str = "give a regular file"
) -> os.stat_result:
    """Refuse ``path`` unless it is a regular file (symbolic links followed); nothing is opened.

    :param what: how the message names the input, e.g. ``--config`` or ``AEF index``.
    :param error: the :class:`~fusarbatch.errors.FusarbatchError` subclass raised.
    :param fix: the end of the message: what to give instead.
    :returns: the ``os.stat`` result.
    :raises error: the path is a FIFO, device, socket or directory (one line naming it and the fix).
    :raises OSError: the path cannot be stat'ed (missing, permission denied): callers word that themselves.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path}: {file_kind(st.st_mode)}, not a regular file; {fix}")
    return st


def read_capped(
    path: str | os.PathLike[str],
    what: str,
    error: type[FusarbatchError],
    max_bytes: int,
    fix: str = "give a regular file",
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes (see the module docstring).

    :raises error: not a regular file, or larger than ``max_bytes`` (the message gives the cap in MiB or KiB).
    :raises OSError: the file cannot be opened or read (missing, permission denied).
    """
    check_regular(path, what, error, fix)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the check and the open
            raise error(f"{what} {path}: {file_kind(st.st_mode)}, not a regular file; {fix}")
        too_large = error(f"{what} {Path(path)}: larger than {_size(max_bytes)}; {fix} of a sensible size")
        if st.st_size > max_bytes:
            raise too_large
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(2**20, max_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise too_large
    finally:
        os.close(fd)


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:g} MiB"
    return f"{n / 2**10:g} KiB" if n >= 2**10 else f"{n} bytes"
