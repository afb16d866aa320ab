"""The run ledger ``<out>/ledger.sqlite`` and the run lock ``<out>/run.lock`` (DESIGN 3.7).

**Ledger.** One SQLite file per output folder, three tables:

- ``scenes``: one row per scene ever found: ``status`` (``pending``, ``running``, ``done``, ``failed``,
  ``interrupted``), ``stage`` (the last stage reached: ``tile``, ``features``, ``infer``, ``write``,
  ``done``), ``reason`` (why it failed), ``config_hash`` and ``model_hash`` of its last attempt (of its
  outputs when done), attempts, times, counts, the output files (relative to the folder) and the STAC item
  (so that ``--retry-failed`` needs no search);
- ``stages``: per scene and stage, the last attempt: status, stage config hash, times, reason;
- ``runs``: one row per run: pid, host, arguments, hashes, search window and when it searched, counts,
  status (``running``, ``ok``, ``failed``, ``error``, ``interrupted``, ``killed``) and exit code.

A scene is marked done only after every output file has been renamed into place, so a crash at any point
leaves it not done and the next run redoes it. Writes are short transactions (SQLite's rollback journal
makes each one atomic, also under SIGKILL); readers (``fusarbatch status``) wait on a busy timeout.

**Lock.** ``run.lock`` is held with ``fcntl.flock`` (exclusive) on an open file for the whole run; it
holds the pid, host, start time and run id of its holder. The kernel drops a flock when its process dies
(SIGKILL included), so a lock left by a dead process is simply free: the next run takes it over, logs who
left it, and the ledger marks that run ``killed`` and its unfinished scenes ``interrupted``. A clean exit
empties the file (it is never deleted, so two runs can never lock two different files).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusarbatch.errors import FusarbatchError, UsageError
from fusarbatch.outputs.provenance import outputs_out_of_step

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.sqlite"
LOCK_NAME = "run.lock"
SCHEMA_VERSION = 1
STAGES = ("tile", "features", "infer", "write")
#: Exit code of a run that found ``--out`` locked by another run (``EX_TEMPFAIL``, sysexits.h).
EXIT_LOCKED = 75

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    exit_code INTEGER,
    pid INTEGER,
    host TEXT,
    argv TEXT,
    config TEXT,
    config_hash TEXT,
    model_hash TEXT,
    model_id TEXT,
    mode TEXT,
    window_start TEXT,
    window_end TEXT,
    searched_at TEXT,
    scenes_found INTEGER,
    scenes_skipped INTEGER,
    scenes_done INTEGER,
    scenes_failed INTEGER,
    error TEXT
);
CREATE TABLE IF NOT EXISTS scenes (
    scene_id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    datetime TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT,
    reason TEXT,
    config_hash TEXT,
    model_hash TEXT,
    run_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    first_seen TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    done_at TEXT,
    tiles INTEGER,
    tiles_inferred INTEGER,
    detections INTEGER,
    parse_failures INTEGER,
    outputs TEXT,
    item TEXT
);
CREATE TABLE IF NOT EXISTS stages (
    scene_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    run_id TEXT,
    config_hash TEXT,
    started_at TEXT,
    finished_at TEXT,
    seconds REAL,
    reason TEXT,
    PRIMARY KEY (scene_id, stage)
);
CREATE INDEX IF NOT EXISTS scenes_status ON scenes (status);
"""


class LockedError(FusarbatchError):
    """Another run holds ``<out>/run.lock``: exit code 75 (try again later)."""

    exit_code = EXIT_LOCKED


def utc_now() -> str:
    """The current time, ISO 8601 UTC with a ``Z`` (what the ledger stores)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_run_id() -> str:
    """``YYYYmmddTHHMMSSZ-xxxxxx``: sortable by start time, unique."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def prepare_out(out: Path) -> None:
    """Create ``out``, check that files can be written there (:func:`fusarbatch.outputs.
    ensure_writable_dir`) and that nothing written there would land outside it
    (:func:`check_out_paths`).

    :raises UsageError: it cannot be created or written, or holds a symbolic link where fusarbatch writes
        (one line naming ``--out`` and the link).
    """
    from fusarbatch.outputs import ensure_writable_dir

    ensure_writable_dir(Path(out), "--out")
    check_out_paths(Path(out))


#: What a run writes directly under ``--out`` (files and folders).
OUT_ENTRIES = (
    LEDGER_NAME,
    f"{LEDGER_NAME}-journal",
    LOCK_NAME,
    "scenes.parquet",
    "tiles.zarr",
    "detections",
    "tiles",
    "counts",
    "quicklooks",
)


def check_out_paths(out: Path) -> None:
    """Refuse an output folder where a write would leave it: a symbolic link as one of
    :data:`OUT_ENTRIES` (``run.lock`` -> ``/etc/passwd`` would be truncated; ``detections`` -> elsewhere
    would be filled) or as a scene group of ``tiles.zarr``. Nothing is written or truncated first. (Folders
    below, such as ``detections/date=...``, are checked by the writers: :func:`fusarbatch.outputs.
    check_inside`.)

    :raises UsageError: one line naming the link, where it points, and the fix.
    """
    from fusarbatch.files import file_kind

    out = Path(out)
    links = [out / name for name in OUT_ENTRIES if (out / name).is_symlink()]
    store = out / "tiles.zarr"
    if not links and store.is_dir():
        links = [p for p in store.iterdir() if p.is_symlink()]
    if links:
        link = links[0]
        raise UsageError(
            f"--out {out}: {link.relative_to(out)} is a symbolic link (to {os.readlink(link)}); fusarbatch "
            "writes only inside --out: remove the link (or choose another --out)"
        )
    for name in (LEDGER_NAME, f"{LEDGER_NAME}-journal", LOCK_NAME):  # a FIFO there would block or fail
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(out / name).st_mode
            if not stat.S_ISREG(mode):
                raise UsageError(
                    f"--out {out}: {name} is {file_kind(mode)}, not a regular file; remove it (fusarbatch "
                    "recreates it)"
                )


def parse_time(text: str | None) -> dt.datetime | None:
    """A ledger time back to an aware UTC datetime (``None`` stays ``None``)."""
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------------- lock


@dataclass(frozen=True)
class LockInfo:
    """Who holds (or last held) a lock file."""

    pid: int | None
    host: str | None
    started_at: str | None
    run_id: str | None

    def describe(self) -> str:
        if self.pid is None:
            return "an unknown process"
        text = f"pid {self.pid} on {self.host or '?'}"
        if self.started_at:
            text += f", started {self.started_at}"
        if self.run_id:
            text += f", run {self.run_id}"
        return text

    @classmethod
    def read(cls, path: Path) -> LockInfo | None:
        """The holder written in ``path``; ``None`` when the file is missing, empty or unreadable. Whatever
        else the file holds (binary bytes, a JSON list, a wrong type per field: it is only informative)
        gives an unknown holder, never an exception."""
        from fusarbatch.files import read_capped

        try:
            text = read_capped(path, LOCK_NAME, UsageError, 64 * 2**10).decode("utf-8").strip()
        except OSError:
            return None
        except (UsageError, UnicodeDecodeError):  # larger than any lock record, or not text
            return LockInfo(None, None, None, None)
        if not text:
            return None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return LockInfo(None, None, None, None)
        if not isinstance(data, dict):
            return LockInfo(None, None, None, None)
        pid, host, started, run_id = (data.get(k) for k in ("pid", "host", "started_at", "run_id"))
        return cls(
            pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            host if isinstance(host, str) else None,
            started if isinstance(started, str) else None,
            run_id if isinstance(run_id, str) else None,
        )


class RunLock:
    """The exclusive lock on ``<out>/run.lock`` for one run (see the module docstring).

    Use :meth:`acquire` (or the context manager); :attr:`stale` is the holder a dead process left behind,
    if any. A process holds one lock per folder: do not acquire it twice.
    """

    #: A busy lock is tried again for this long before a run gives up: ``fusarbatch status`` holds a
    #: shared lock for microseconds while it looks, and must never make a starting run exit 75.
    GRACE_S = 1.0

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None
        self.stale: LockInfo | None = None
        self.waited_s = 0.0

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = False, run_id: str | None = None) -> RunLock:
        """Take the lock, or raise :class:`LockedError` (``wait=False``) / block until free (``wait=True``).

        :raises LockedError: another live run holds it (one line: who, and what to do).
        :raises UsageError: the lock file cannot be created (folder not writable).
        """
        if self._fd is not None:
            return self
        try:  # never through a symbolic link: a lock file is truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                check_out_paths(self.out)  # raises, naming the link
            raise UsageError(
                f"--out {self.out}: cannot create {LOCK_NAME} ({exc.strerror}); choose a writable folder"
            ) from None
        try:
            started = time.monotonic()
            if not self._try(fd, self.GRACE_S):
                holder = LockInfo.read(self.path)
                who = holder.describe() if holder else "another process"
                if not wait:
                    raise LockedError(
                        f"--out {self.out} is locked by another fusarbatch run ({who}); "
                        "exiting with 75: try again later, or add --wait"
                    )
                log.info("--out %s is locked by another run (%s): waiting (--wait)", self.out, who)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self.waited_s = time.monotonic() - started
            previous = LockInfo.read(self.path)
            if previous is not None and previous.pid is not None:
                self.stale = previous
            elif previous is not None:
                log.warning(
                    "--out %s: %s held unreadable content (not a lock record); replaced", self.out, LOCK_NAME
                )
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": utc_now(),
                "run_id": run_id,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self.stale is not None:
            log.warning(
                "took over the lock of --out %s left by a run that is gone (%s)",
                self.out,
                self.stale.describe(),
            )
        return self

    @staticmethod
    def _try(fd: int, grace_s: float) -> bool:
        deadline = time.monotonic() + grace_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def set_run_id(self, run_id: str) -> None:
        """Record the run id in the lock file (the holder's description names it)."""
        if self._fd is None:
            return
        info = LockInfo.read(self.path)
        data = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": None, "run_id": run_id}
        if info is not None:
            data["started_at"] = info.started_at
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(data) + "\n").encode(), 0)

    def release(self) -> None:
        """Empty the file (a clean exit leaves no holder behind) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_state(out: Path) -> tuple[bool, LockInfo | None]:
    """``(held, holder)`` of ``<out>/run.lock`` without disturbing a run: a shared, non-blocking flock
    held for microseconds (runs retry for :attr:`RunLock.GRACE_S`). ``holder`` is who wrote the file:
    the live holder when held, a dead run's leftovers otherwise (``None`` after a clean exit)."""
    path = Path(out) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True, LockInfo.read(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, LockInfo.read(path)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ model hash

#: Files up to this size are hashed whole; larger ones (weights) by size plus three 4 MiB samples.
_WHOLE_FILE_BYTES = 256 * 2**20
_SAMPLE_BYTES = 4 * 2**20


def model_hash(*model_dirs: Path) -> str:
    """A fingerprint of model directories (a model, or a base model and a checkpoint on top of it): 16 hex
    digits over every file's relative path and content, directory by directory.

    Files up to 256 MiB are hashed whole; larger ones (multi-GB weights) by their size and three 4 MiB
    samples (start, middle, end), so that the hash costs milliseconds, not minutes, per run; replacing
    weights by a file of exactly the same size that differs only outside the samples would go unnoticed
    (use ``--force`` then).
    """
    digest = hashlib.sha256()
    files = [
        (root, p)
        for root in map(Path, model_dirs)
        for p in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    ]
    for n, (root, path) in enumerate(files):
        if n and root != files[n - 1][0]:
            digest.update(b"\0next-dir\0")
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= _WHOLE_FILE_BYTES:
                for block in iter(lambda fh=fh: fh.read(2**20), b""):
                    digest.update(block)
            else:
                for offset in (0, size // 2, size - _SAMPLE_BYTES):
                    fh.seek(offset)
                    digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ ledger


@dataclass(frozen=True)
class SceneRecord:
    """One row of ``scenes``."""

    scene_id: str
    group: str
    datetime: str
    status: str
    stage: str | None
    reason: str | None
    config_hash: str | None
    model_hash: str | None
    run_id: str | None
    attempts: int
    updated_at: str
    done_at: str | None
    outputs: tuple[str, ...]
    item: dict[str, Any] | None


class Ledger:
    """``<out>/ledger.sqlite`` (see the module docstring). Open with :meth:`open`; one writer at a time
    (the run holding the lock); any number of readers."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn

    @classmethod
    def open(cls, out: Path, *, readonly: bool = False) -> Ledger:
        """Open (and for writing, create or upgrade) the ledger of an output folder.

        :raises UsageError: the file is not a fusarbatch ledger, or cannot be opened or created.
        """
        path = Path(out) / LEDGER_NAME
        if not readonly:
            check_out_paths(Path(out))  # SQLite follows a symbolic link (and writes its journal beside)
        if readonly and not path.exists():
            raise UsageError(f"--out {out}: no {LEDGER_NAME} there (no fusarbatch run has used this folder)")
        try:
            if readonly:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None)
            else:
                conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout = 30000")
            if not readonly:
                conn.execute("PRAGMA journal_mode = DELETE")  # plain rollback journal: fine on NFS too
                conn.execute("PRAGMA synchronous = FULL")
                with _transaction(conn):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise UsageError(
                f"{path}: not a usable fusarbatch ledger ({exc}); move it aside to start a new one"
            ) from None
        if version is None or int(version[0]) > SCHEMA_VERSION:
            conn.close()
            raise UsageError(
                f"{path}: ledger schema {version[0] if version else '?'} is newer than this fusarbatch "
                f"({SCHEMA_VERSION}); upgrade fusarbatch"
            )
        return cls(path, conn)

    def close(self) -> None:
        self.conn.close()

    # -------------------------------------------------------------------------------------------- runs

    def recover(self, run_id: str) -> list[str]:
        """After taking the lock: runs still marked ``running`` died (``killed``); their unfinished scenes
        become ``interrupted``. Returns the ids of the runs found dead."""
        now = utc_now()
        with _transaction(self.conn):
            dead = [
                r["run_id"]
                for r in self.conn.execute(
                    "SELECT run_id FROM runs WHERE status = 'running' AND run_id != ?", (run_id,)
                )
            ]
            for rid in dead:
                self.conn.execute(
                    "UPDATE runs SET status = 'killed', error = 'the process died (killed or crashed); "
                    "found by a later run' WHERE run_id = ?",
                    (rid,),
                )
            rows = self.conn.execute(
                "SELECT scene_id, stage, run_id FROM scenes WHERE status = 'running' AND "
                "(run_id IS NULL OR run_id != ?)",
                (run_id,),
            ).fetchall()
            for row in rows:
                reason = f"run {row['run_id']} stopped during {row['stage']} (process gone); redone next run"
                self.conn.execute(
                    "UPDATE scenes SET status = 'interrupted', reason = ?, updated_at = ? WHERE scene_id = ?",
                    (reason, now, row["scene_id"]),
                )
                self.conn.execute(
                    "UPDATE stages SET status = 'interrupted', reason = ?, finished_at = ? "
                    "WHERE scene_id = ? AND status = 'running'",
                    (reason, now, row["scene_id"]),
                )
        return dead

    def interrupt(self, run_id: str, reason: str) -> None:
        """This run is stopping early (Ctrl-C, SIGTERM): its unfinished scenes become ``interrupted``."""
        now = utc_now()
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE stages SET status = 'interrupted', reason = ?, finished_at = ? "
                "WHERE status = 'running' AND scene_id IN "
                "(SELECT scene_id FROM scenes WHERE status = 'running' AND run_id = ?)",
                (reason, now, run_id),
            )
            self.conn.execute(
                "UPDATE scenes SET status = 'interrupted', reason = ?, updated_at = ? "
                "WHERE status = 'running' AND run_id = ?",
                (reason, now, run_id),
            )

    def start_run(
        self,
        run_id: str,
        *,
        argv: Sequence[str],
        config: dict[str, Any],
        config_hash: str,
        model_hash: str,
        model_id: str,
        mode: str,
    ) -> None:
        with _transaction(self.conn):
            self.conn.execute(
                "INSERT INTO runs (run_id, started_at, status, pid, host, argv, config, config_hash, "
                "model_hash, model_id, mode) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    utc_now(),
                    os.getpid(),
                    socket.gethostname(),
                    json.dumps(list(argv)),
                    json.dumps(config, default=str),
                    config_hash,
                    model_hash,
                    model_id,
                    mode,
                ),
            )

    def searched(
        self,
        run_id: str,
        *,
        searched_at: str,
        window_start: dt.datetime | None,
        window_end: dt.datetime | None,
        found: int,
        skipped: int,
    ) -> None:
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE runs SET searched_at = ?, window_start = ?, window_end = ?, scenes_found = ?, "
                "scenes_skipped = ? WHERE run_id = ?",
                (
                    searched_at or None,  # "": nothing was searched (--retry-failed)
                    _iso(window_start),
                    _iso(window_end),
                    found,
                    skipped,
                    run_id,
                ),
            )

    def finish_run(
        self, run_id: str, *, status: str, exit_code: int | None, done: int, failed: int, error: str | None
    ) -> None:
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE runs SET finished_at = ?, status = ?, exit_code = ?, scenes_done = ?, "
                "scenes_failed = ?, error = ? WHERE run_id = ?",
                (utc_now(), status, exit_code, done, failed, error, run_id),
            )

    def last_search_time(self) -> dt.datetime | None:
        """When the last *finished* run (``ok`` or ``failed``, not killed) searched the catalog
        (``--retry-failed`` runs search nothing and do not count)."""
        row = self.conn.execute(
            "SELECT searched_at FROM runs WHERE status IN ('ok', 'failed') AND searched_at IS NOT NULL "
            "AND COALESCE(mode, '') != 'retry-failed' ORDER BY searched_at DESC LIMIT 1"
        ).fetchone()
        return parse_time(row[0]) if row else None

    def run_config(self, run_id: str | None) -> dict[str, Any]:
        """The configuration a run recorded (``{}`` when unknown)."""
        row = self.conn.execute("SELECT config FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def runs(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest runs, newest first."""
        rows = self.conn.execute("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------------------------------ scenes

    def scene(self, scene_id: str) -> SceneRecord | None:
        row = self.conn.execute("SELECT * FROM scenes WHERE scene_id = ?", (scene_id,)).fetchone()
        return _record(row) if row else None

    def scenes(self, statuses: Sequence[str] | None = None) -> list[SceneRecord]:
        """Scene rows (all, or those with one of ``statuses``), by datetime then id."""
        if statuses:
            marks = ",".join("?" * len(statuses))
            rows = self.conn.execute(
                f"SELECT * FROM scenes WHERE status IN ({marks}) ORDER BY datetime, scene_id", tuple(statuses)
            )
        else:
            rows = self.conn.execute("SELECT * FROM scenes ORDER BY datetime, scene_id")
        return [_record(r) for r in rows]

    def found(self, scenes: Sequence[Any], run_id: str) -> None:
        """Record scenes a search found (new ones as ``pending``; the STAC item refreshed for all)."""
        now = utc_now()
        with _transaction(self.conn):
            for s in scenes:
                self.conn.execute(
                    "INSERT INTO scenes (scene_id, grp, datetime, status, run_id, first_seen, updated_at, "
                    "item) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?) ON CONFLICT (scene_id) DO UPDATE SET "
                    "grp = excluded.grp, datetime = excluded.datetime, item = excluded.item",
                    (
                        s.item_id,
                        s.safe_id,
                        _iso(s.datetime),
                        run_id,
                        now,
                        now,
                        json.dumps(s.item, default=str),
                    ),
                )

    def stage_started(self, scene_id: str, stage: str, run_id: str, config_hash: str | None = None) -> None:
        """A scene enters ``stage``: the scene is ``running`` there; the stage row is reset."""
        now = utc_now()
        with _transaction(self.conn):
            if stage == STAGES[0]:
                self.conn.execute(
                    "UPDATE scenes SET attempts = attempts + 1 WHERE scene_id = ?",
                    (scene_id,),
                )
            self.conn.execute(
                "UPDATE scenes SET status = 'running', stage = ?, reason = NULL, run_id = ?, updated_at = ? "
                "WHERE scene_id = ?",
                (stage, run_id, now, scene_id),
            )
            self.conn.execute(
                "INSERT OR REPLACE INTO stages (scene_id, stage, status, run_id, config_hash, started_at) "
                "VALUES (?, ?, 'running', ?, ?, ?)",
                (scene_id, stage, run_id, config_hash, now),
            )

    def stage_done(self, scene_id: str, stage: str, seconds: float, *, reused: bool = False) -> None:
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE stages SET status = 'done', finished_at = ?, seconds = ?, reason = ? "
                "WHERE scene_id = ? AND stage = ?",
                (utc_now(), seconds, "reused from an earlier run" if reused else None, scene_id, stage),
            )

    def stage_hash(self, scene_id: str, stage: str) -> str | None:
        """The config hash of a stage done earlier (``None`` if it is not done)."""
        row = self.conn.execute(
            "SELECT config_hash FROM stages WHERE scene_id = ? AND stage = ? AND status = 'done'",
            (scene_id, stage),
        ).fetchone()
        return row[0] if row else None

    def scene_failed(self, scene_id: str, stage: str, reason: str, run_id: str) -> None:
        now = utc_now()
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE scenes SET status = 'failed', stage = ?, reason = ?, run_id = ?, updated_at = ? "
                "WHERE scene_id = ?",
                (stage, reason, run_id, now, scene_id),
            )
            self.conn.execute(
                "INSERT INTO stages (scene_id, stage, status, run_id, started_at, finished_at, reason) "
                "VALUES (?, ?, 'failed', ?, ?, ?, ?) ON CONFLICT (scene_id, stage) DO UPDATE SET "
                "status = 'failed', finished_at = excluded.finished_at, reason = excluded.reason, "
                "run_id = excluded.run_id",
                (scene_id, stage, run_id, now, now, reason),
            )

    def scene_done(
        self,
        scene_id: str,
        run_id: str,
        *,
        config_hash: str,
        model_hash: str,
        outputs: Sequence[str],
        tiles: int,
        tiles_inferred: int,
        detections: int,
        parse_failures: int,
        seconds: float,
    ) -> None:
        """Every output of the scene is in place: record it done with the hashes it was made with."""
        now = utc_now()
        with _transaction(self.conn):
            self.conn.execute(
                "UPDATE stages SET status = 'done', finished_at = ?, seconds = ? "
                "WHERE scene_id = ? AND stage = 'write'",
                (now, seconds, scene_id),
            )
            self.conn.execute(
                "UPDATE scenes SET status = 'done', stage = 'done', reason = NULL, config_hash = ?, "
                "model_hash = ?, run_id = ?, updated_at = ?, done_at = ?, tiles = ?, tiles_inferred = ?, "
                "detections = ?, parse_failures = ?, outputs = ? WHERE scene_id = ?",
                (
                    config_hash,
                    model_hash,
                    run_id,
                    now,
                    now,
                    tiles,
                    tiles_inferred,
                    detections,
                    parse_failures,
                    json.dumps(list(outputs)),
                    scene_id,
                ),
            )

    # ------------------------------------------------------------------------------------------ status

    def counts(self) -> dict[str, Any]:
        """Scenes per (status, stage), stage rows per (stage, status), and the failures with reasons."""
        by_status = [
            dict(r)
            for r in self.conn.execute(
                "SELECT status, stage, COUNT(*) AS n FROM scenes GROUP BY status, stage "
                "ORDER BY status, stage"
            )
        ]
        by_stage = [
            dict(r)
            for r in self.conn.execute(
                "SELECT stage, status, COUNT(*) AS n FROM stages GROUP BY stage, status "
                "ORDER BY stage, status"
            )
        ]
        failures = [
            dict(r)
            for r in self.conn.execute(
                "SELECT scene_id, status, stage, reason, attempts, updated_at, run_id FROM scenes "
                "WHERE status IN ('failed', 'interrupted') ORDER BY updated_at DESC"
            )
        ]
        return {"scenes": by_status, "stages": by_stage, "failures": failures}


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _record(row: sqlite3.Row) -> SceneRecord:
    return SceneRecord(
        scene_id=row["scene_id"],
        group=row["grp"],
        datetime=row["datetime"],
        status=row["status"],
        stage=row["stage"],
        reason=row["reason"],
        config_hash=row["config_hash"],
        model_hash=row["model_hash"],
        run_id=row["run_id"],
        attempts=int(row["attempts"]),
        updated_at=row["updated_at"],
        done_at=row["done_at"],
        outputs=tuple(json.loads(row["outputs"])) if row["outputs"] else (),
        item=json.loads(row["item"]) if row["item"] else None,
    )


# ------------------------------------------------------------------------------------------------ status

_OUTPUT_KINDS = ("detections", "tiles", "counts")


def collect_status(out: Path, *, runs: int = 5) -> dict[str, Any]:
    """What ``fusarbatch status`` shows, as plain data (also its ``--json`` output): the lock, scene counts
    per status and stage, stage counts, failures with reasons, the latest runs, and the outputs on disk
    checked against the ledger (done scenes whose files are missing, done scenes whose Zarr group changed
    since their outputs were made (:mod:`fusarbatch.outputs.provenance`), leftovers of killed runs).

    :raises UsageError: no ledger in ``out``, or not a fusarbatch ledger.
    """
    out = Path(out)
    ledger = Ledger.open(out, readonly=True)
    try:
        held, holder = lock_state(out)
        counts = ledger.counts()
        recent = ledger.runs(runs)
        done = ledger.scenes(("done",))
        total = ledger.conn.execute("SELECT COUNT(*) FROM scenes").fetchone()[0]
        running = ledger.conn.execute("SELECT COUNT(*) FROM scenes WHERE status = 'running'").fetchone()[0]
    finally:
        ledger.close()
    for run in recent:
        run.pop("config", None)
        run["argv"] = json.loads(run["argv"]) if run.get("argv") else None
    missing = [(s.scene_id, p) for s in done for p in s.outputs if not (out / p).is_file()]
    from fusarbatch.outputs import group_attrs as _group_attrs

    out_of_step = [
        {"scene_id": s.scene_id, "reason": why, "action": "the next run redoes it"}
        for s in done
        if (why := outputs_out_of_step(_group_attrs(out / "tiles.zarr" / s.group) or {}))
    ]
    disk: dict[str, Any] = {}
    for kind in _OUTPUT_KINDS:
        files = [p for p in (out / kind).glob("date=*/*.parquet") if not p.name.startswith(".")]
        disk[kind] = {
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "dates": len({p.parent.name for p in files}),
        }
    pngs = [p for p in (out / "quicklooks").glob("*.png") if not p.name.startswith(".")]
    disk["quicklooks"] = {"files": len(pngs), "bytes": sum(p.stat().st_size for p in pngs)}
    from fusarbatch.outputs import group_attrs, missing_arrays, zarr_temp_files

    groups = {"complete": 0, "failed": 0, "incomplete": 0, "corrupt": 0}
    corrupt = []
    store = out / "tiles.zarr"
    leftovers = [str(p.relative_to(out)) for p in zarr_temp_files(store)]
    if store.is_dir():
        for g in store.iterdir():
            if g.name.startswith("."):
                leftovers.append(f"tiles.zarr/{g.name}")
                continue
            if not g.is_dir() or not (g / "zarr.json").is_file():
                continue
            attrs = group_attrs(g) or {}
            absent = missing_arrays(g, attrs)
            if absent:  # e.g. an array folder deleted by hand: the next run tiles the scene again
                groups["corrupt"] += 1
                corrupt.append({"group": g.name, "missing": absent})
            elif attrs.get("complete") is True:
                groups["complete"] += 1
            else:
                groups["failed" if attrs.get("status") == "failed" else "incomplete"] += 1
    for kind in (*_OUTPUT_KINDS, "quicklooks"):
        leftovers += [
            str(p.relative_to(out)) for p in (out / kind).rglob(".*") if p.is_file() and ".tmp" in p.name
        ]
    groups["bytes"] = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) if store.is_dir() else 0
    disk["tiles.zarr"] = groups
    return {
        "out": str(out),
        "ledger": str(out / LEDGER_NAME),
        "lock": {
            "held": held,
            "holder": None if holder is None or holder.pid is None else holder.__dict__,
            "stale": (not held) and holder is not None and holder.pid is not None,
            "unreadable": holder is not None and holder.pid is None,
        },
        "scenes_total": total,
        "running_without_run": 0 if held else running,
        "scenes": counts["scenes"],
        "stages": counts["stages"],
        "failures": counts["failures"],
        "runs": recent,
        "disk": disk,
        "missing_outputs": [{"scene_id": s, "path": p} for s, p in missing],
        "out_of_step": out_of_step,
        "corrupt_groups": sorted(corrupt, key=lambda c: c["group"]),
        "leftovers": sorted(leftovers),
    }
