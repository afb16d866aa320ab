"""Human-readable summaries printed by the CLI: rich tables on a terminal, tab-separated lines otherwise
(so that cron logs and pipes keep whole item ids)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fusarbatch.errors import UsageError

log = logging.getLogger("fusarbatch")

if TYPE_CHECKING:
    from fusarbatch.catalog import SearchResult
    from fusarbatch.pipeline import RunSummary
    from fusarbatch.tiling import TileResult


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """``value`` as text that a terminal or a tab-separated log line shows as it is: control characters
    (ESC sequences, CR, BEL, tabs, newlines), which untrusted item ids, paths, catalog fields and model
    output may hold, become ``\\xNN`` escapes. Rich markup is not interpreted by the callers below."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


class PlainFormatter(logging.Formatter):
    """Log lines for a person (terminal): the message with control characters escaped
    (:func:`printable`); a traceback, when there is one, follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal; a title line, a header line and tab-separated rows otherwise. Cells are
    shown literally: no rich markup, control characters escaped (:func:`printable`)."""
    if console.is_terminal:
        table = Table(title=Text(printable(title)), title_justify="left")
        for column in columns:
            table.add_column(column, no_wrap=column in ("id", "scene"), overflow="fold")
        for row in rows:
            table.add_row(*(Text(printable(cell)) for cell in row))
        console.print(table)
    else:  # written as they are: rich would expand the tabs into spaces
        console.file.write(printable(title) + "\n")
        for line in (columns, *rows):
            console.file.write("\t".join(map(printable, line)) + "\n")
        console.file.flush()


def print_line(console: Console, line: str, **style: Any) -> None:
    """One line of text, literally (no markup, no highlighting; control characters escaped)."""
    console.print(printable(line), highlight=False, soft_wrap=True, markup=False, **style)


def print_scenes(console: Console, result: SearchResult) -> None:
    """Found scenes: id, datetime (UTC), platform, polarisations, share of the AOI covered."""
    rows = [
        (
            scene.item_id,
            scene.datetime.strftime("%Y-%m-%d %H:%M:%S"),
            scene.platform or "-",
            "/".join(scene.pols),
            f"{100 * result.coverage.get(scene.item_id, 0.0):.1f}%",
        )
        for scene in result.scenes
    ]
    title = f"{len(result.scenes)} scene(s) from catalog {result.spec.name!r}"
    print_table(console, title, ("id", "datetime (UTC)", "platform", "pols", "AOI covered"), rows)
    if result.saved is not None:
        print_line(console, f"scenes saved to {result.saved}")


def print_tiling(console: Console, results: Sequence[TileResult], store: Path) -> None:
    """Tiling results per scene, then the store path."""
    rows = [
        (r.scene_id, r.status, str(r.n_tiles), str(r.n_inferable), f"{r.seconds:.2f}", r.error or "")
        for r in results
    ]
    print_table(
        console, f"tiling into {store}", ("scene", "status", "tiles", "to infer", "seconds", "error"), rows
    )
    failed = sum(r.status == "failed" for r in results)
    print_line(console, f"{len(results) - failed} scene(s) tiled, {failed} failed; store: {store}")


def print_features(console: Console, results: Sequence[Any]) -> None:
    """AlphaEarth anchors written per scene group."""
    rows = [
        (
            r.scene_id,
            str(r.n_tiles),
            str(r.n_anchors),
            str(r.aef_year or "-"),
            f"{100 * r.coverage:.1f}%",
            r.error or "",
        )
        for r in results
    ]
    print_table(
        console, "AlphaEarth anchors", ("scene", "tiles", "anchors", "AEF year", "coverage", "error"), rows
    )


def print_run_summary(console: Console, summary: RunSummary) -> None:
    """End-of-run summary: scenes, tiles, detections per label, failures, skipped scenes, output paths."""
    rows = [
        (
            s.scene_id,
            s.status,
            str(s.tiles),
            str(s.tiles_inferred),
            ", ".join(f"{k} {v}" for k, v in sorted(s.detections.items())) or "0",
            str(s.parse_failures),
            s.error or "",
        )
        for s in summary.scenes
    ]
    columns = ("scene", "status", "tiles", "inferred", "detections", "parse failures", "error")
    print_table(console, f"run {summary.run_id} with model {summary.model_id}", columns, rows)
    per_label = ", ".join(f"{k}: {v}" for k, v in sorted(summary.detections.items())) or "none"
    outside = 1 - summary.generate_seconds / summary.seconds if summary.seconds else 0.0
    n_tiles = sum(s.tiles for s in summary.scenes)
    n_inferred = sum(s.tiles_inferred for s in summary.scenes)
    first, last = summary.window
    window = (
        "ledger (--retry-failed)"
        if summary.mode == "retry-failed"
        else f"{_when(first)} .. {_when(last) if last else 'now'} ({summary.mode})"
    )
    lines = [
        f"scenes: {len(summary.scenes)} processed ({len(summary.failed)} failed), "
        f"{len(summary.skipped)} skipped as done; tiles: {n_tiles} ({n_inferred} inferred); window {window}",
        f"detections per label: {per_label}",
        f"wall time {summary.seconds:.1f} s, generate {summary.generate_seconds:.1f} s "
        f"({summary.prompts} prompts; {100 * outside:.0f}% of the time outside generate)"
        if summary.prompts
        else f"wall time {summary.seconds:.1f} s, {summary.model_id} {summary.generate_seconds:.1f} s "
        f"({100 * outside:.0f}% of the time outside it)",
        f"outputs: {_existing_outputs(Path(summary.out))}; "
        f"ledger {summary.out}/ledger.sqlite (fusarbatch status --out {summary.out})",
    ]
    for line in lines:
        print_line(console, line)


def _existing_outputs(out: Path) -> str:
    """The output paths of a run folder that exist (an empty first run has written none of them)."""
    kinds = [("detections", "GeoParquet"), ("tiles", "GeoParquet"), ("counts", "GeoParquet")]
    kinds += [("quicklooks", "PNG"), ("tiles.zarr", "Zarr"), ("scenes.parquet", "stac-geoparquet")]
    found = [f"{out / name} ({what})" for name, what in kinds if (out / name).exists()]
    return ", ".join(found) or "none written yet"


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else "-"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def print_status(console: Console, status: dict[str, Any]) -> None:
    """``fusarbatch status``: lock, scenes per status and stage, stages, failures, runs, outputs on disk."""
    lock = status["lock"]
    holder = lock["holder"] or {}
    who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}"
    if lock["held"]:
        lock_line = f"lock: held by a running run ({who}, run {holder.get('run_id')})"
    elif lock["stale"]:
        lock_line = f"lock: free; left by a run that died ({who}): the next run takes it over"
    elif lock.get("unreadable"):
        lock_line = f"lock: free; {status['out']}/run.lock holds unreadable content: the next run replaces it"
    else:
        lock_line = "lock: free"
    print_line(console, f"{status['ledger']}: {status['scenes_total']} scene(s); {lock_line}")
    if status.get("running_without_run"):
        print_line(
            console,
            f"{status['running_without_run']} scene(s) marked running, but no run holds the lock: their run "
            "died (interrupted); the next run redoes them",
        )
    print_table(
        console,
        "scenes by status and stage",
        ("status", "stage", "scenes"),
        [(r["status"], r["stage"] or "-", str(r["n"])) for r in status["scenes"]],
    )
    stages: dict[str, dict[str, int]] = {}
    for r in status["stages"]:
        stages.setdefault(r["stage"], {})[r["status"]] = r["n"]
    order = ("tile", "features", "infer", "write")
    kinds = ("done", "failed", "running", "interrupted")
    print_table(
        console,
        "stages (last attempt per scene)",
        ("stage", *kinds),
        [(st, *(str(stages.get(st, {}).get(k, 0)) for k in kinds)) for st in order],
    )
    print_table(
        console,
        f"failures ({len(status['failures'])})",
        ("scene", "status", "stage", "attempts", "last tried", "reason"),
        [
            (
                f["scene_id"],
                f["status"],
                f["stage"] or "-",
                str(f["attempts"]),
                f["updated_at"],
                f["reason"] or "",
            )
            for f in status["failures"]
        ],
    )
    print_table(
        console,
        "last runs",
        ("run", "started", "finished", "status", "exit", "found", "skipped", "done", "failed", "window"),
        [
            (
                r["run_id"],
                r["started_at"] or "-",
                r["finished_at"] or "-",
                r["status"],
                "-" if r["exit_code"] is None else str(r["exit_code"]),
                *("-" if r[k] is None else str(r[k]) for k in ("scenes_found", "scenes_skipped")),
                *("-" if r[k] is None else str(r[k]) for k in ("scenes_done", "scenes_failed")),
                f"{r['window_start'] or '-'} .. {r['window_end'] or 'now'} ({r['mode']})",
            )
            for r in status["runs"]
        ],
    )
    disk = status["disk"]
    rows = [
        (kind, str(d["files"]), str(d.get("dates", "-")), _size(d["bytes"]))
        for kind, d in disk.items()
        if kind != "tiles.zarr"
    ]
    print_table(console, f"outputs on disk under {status['out']}", ("kind", "files", "dates", "size"), rows)
    z = disk["tiles.zarr"]
    lines = [
        f"tiles.zarr: {z['complete']} complete scene group(s), {z['failed']} failure marker(s), "
        f"{z['incomplete']} incomplete, {z.get('corrupt', 0)} with arrays missing, "
        f"{_size(z.get('bytes', 0))} (--prune-tiles keeps only the tiles of scenes not yet done)",
        f"done scenes with missing output files: {len(status['missing_outputs'])}"
        + (
            f" (e.g. {status['missing_outputs'][0]['path']}; the next run redoes them)"
            if status["missing_outputs"]
            else ""
        ),
        f"leftovers of killed runs: {len(status['leftovers'])}"
        + (" (removed by the next run)" if status["leftovers"] else ""),
    ]
    stale = status.get("out_of_step", [])
    lines.append(f"done scenes whose tiles.zarr group changed since their outputs were made: {len(stale)}")
    lines += [f"  {s['scene_id']}: {s['reason']}; {s['action']}" for s in stale[:10]]
    for c in status.get("corrupt_groups", []):
        lines.append(
            f"tiles.zarr/{c['group']}: arrays missing ({', '.join(c['missing'])}); the next run tiles "
            "the scene again (or use --force)"
        )
    for line in lines:
        print_line(console, line)


# ------------------------------------------------------------------------------------------------ logging

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_context: dict[str, Any] = {}
_json_handlers: list[logging.Handler] = []
_json_errors = False


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC), ``level``, ``logger``, ``message``, the run id, and any
    ``extra`` fields (``event``, ``scene``, ``stage``, ``status``, ``error``, ``seconds`` ...)."""

    def format(self, record: logging.LogRecord) -> str:
        created = dt.datetime.fromtimestamp(record.created, dt.UTC)
        data: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and value is not None:
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, ensure_ascii=False)


def _not_an_event(record: logging.LogRecord) -> bool:
    """On a terminal the progress bar shows the events: the stream handler drops them (not warnings)."""
    return getattr(record, "event", None) is None or record.levelno >= logging.WARNING


def setup_run_logging(*, json_lines: bool, log_file: Path | None = None) -> None:
    """Logging of ``fusarbatch run``: JSON lines on stderr when ``json_lines`` (no terminal: cron), human
    lines without the per-scene events otherwise (the progress bar shows them); ``log_file`` (appended)
    always gets JSON lines with every event. Python warnings are logged the same way.

    :raises UsageError: ``log_file`` cannot be opened for appending.
    """
    global _json_errors
    logger = logging.getLogger("fusarbatch")
    logger.setLevel(logging.INFO)
    streams = _stream_handlers()
    if json_lines:
        json_errors_from_start()
    else:
        _json_errors = False
        for handler in streams:
            handler.addFilter(_not_an_event)
    handlers = list(streams) if json_lines else []
    _json_handlers[:] = handlers
    if log_file is not None:
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            file_handler = _LogFileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--log-file {log_file}: cannot open it ({exc.strerror})") from None
        file_handler.setFormatter(JsonLinesFormatter())
        logger.addHandler(file_handler)
        handlers.append(file_handler)
        _json_handlers.append(file_handler)
    if handlers:
        logging.captureWarnings(True)
        warnings_logger = logging.getLogger("py.warnings")
        warnings_logger.propagate = False
        for handler in handlers:
            warnings_logger.addHandler(handler)


class _LogFileHandler(logging.FileHandler):
    """``--log-file``: when a write fails (disk full, file removed, ``/dev/full``), one warning on the
    run's other handlers, then the file gets nothing more; the run goes on (logging's default is a
    traceback on stderr for every record)."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        err = sys.exc_info()[1]
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        logging.getLogger("fusarbatch").removeHandler(self)
        if self in _json_handlers:
            _json_handlers.remove(self)
        logging.getLogger("fusarbatch").warning(
            "--log-file %s: cannot write (%s); logging there stops, the run goes on",
            self.baseFilename,
            reason,
        )


class _Forward(logging.Handler):
    """Hands records on to other handlers. Libraries get this, not the run's handlers themselves:
    ``distributed`` re-levels every ``StreamHandler`` on its loggers (``silence_logs``)."""

    def __init__(self, targets: Sequence[logging.Handler], level: int) -> None:
        super().__init__(level)
        self.targets = list(targets)

    def emit(self, record: logging.LogRecord) -> None:
        for handler in self.targets:
            if record.levelno >= handler.level:
                handler.handle(record)


class _NoComputeFailed(logging.Filter):
    """Drops distributed's "Compute Failed" records (a task's traceback, with our file paths): the run
    records and prints each failure itself, once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def route_library_logs(names: Sequence[str] = ("distributed", "tornado", "transformers")) -> None:
    """After the libraries are imported (they install their own stderr handlers, with multi-line
    tracebacks): send their warnings and errors through the run's JSON handlers instead, one line each.
    Every other logger (``asyncio``'s "Future exception was never retrieved" at Dask shutdown, GDAL
    warnings ...) reaches them through the root logger, so stderr carries nothing but JSON lines.
    Nothing changes on a terminal without ``--log-file``."""
    worker_log = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _NoComputeFailed) for f in worker_log.filters):
        worker_log.addFilter(_NoComputeFailed())
    if not _json_handlers:
        return
    forward = _Forward(_json_handlers, logging.WARNING)
    if "transformers" in names and _json_errors:
        # transformers installs its stderr handler when it first logs (workers load it later): install
        # it now, and take it away again
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")
        hf_logging.disable_default_handler()
    root = logging.getLogger()
    if not any(isinstance(h, _Forward) for h in root.handlers):
        root.addHandler(forward)
    logging.getLogger("fusarbatch").propagate = False  # its records already reach the handlers
    for name in names:
        lib = logging.getLogger(name)
        if _json_errors:  # stderr is JSON: drop the library's own stderr handlers
            for handler in list(lib.handlers):
                if type(handler) is logging.StreamHandler:
                    lib.removeHandler(handler)
        lib.addHandler(forward)
        lib.propagate = False


def set_log_context(**fields: Any) -> None:
    """Fields added to every JSON log line (e.g. ``run_id``)."""
    _context.update({k: v for k, v in fields.items() if v is not None})


def json_errors_from_start() -> None:
    """``run`` off a terminal (cron): errors found before its logging is set up (options, --config) are
    JSON lines too, like everything else it writes to stderr."""
    global _json_errors
    streams = _stream_handlers()
    for handler in streams:
        handler.setFormatter(JsonLinesFormatter())
    _json_errors = bool(streams)


def _stream_handlers() -> list[logging.Handler]:
    """The stderr handlers of the ``fusarbatch`` logger (installed by ``cli.main``)."""
    return [h for h in logging.getLogger("fusarbatch").handlers if type(h) is logging.StreamHandler]


def print_error(console: Console, exc: BaseException, exit_code: int) -> None:
    """The one line a failing command ends with: a JSON log line when the run logs JSON, else text."""
    if _json_errors:
        record = logging.LogRecord("fusarbatch", logging.ERROR, "", 0, str(exc), None, None)
        record.event = "error"
        record.exit_code = exit_code
        for handler in logging.getLogger("fusarbatch").handlers:
            handler.handle(record)
        return
    # markup=False: the message holds user input (paths, ids) that may look like rich markup
    print_line(console, f"error: {exc}", style="bold red")
    for handler in logging.getLogger("fusarbatch").handlers:
        if isinstance(handler, logging.FileHandler):
            record = logging.LogRecord("fusarbatch", logging.ERROR, "", 0, str(exc), None, None)
            record.event, record.exit_code = "error", exit_code
            handler.handle(record)


class RunProgress:
    """Progress of ``run``: a rich progress bar over scenes on a terminal; one log record per event (JSON
    lines off a terminal, see :func:`setup_run_logging`), with the scene id in the ``scene`` field.

    Call it as ``progress(event, fields)`` (:data:`fusarbatch.pipeline.Progress`).
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> RunProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if self._progress is not None:
            if event == "scenes":
                self._task = self._progress.add_task("scenes", total=fields.get("to_do", fields["total"]))
            elif event == "stage" and self._task is not None:
                text = printable(f"{fields['stage']}: {fields['scene'][:48]}")
                self._progress.update(self._task, description=text)
            elif event == "scene_done" and self._task is not None:
                self._progress.advance(self._task)
        details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k != "scene")
        scene = fields.get("scene", "")
        level = logging.WARNING if event == "scene_done" and fields.get("status") != "ok" else logging.INFO
        extra = {"event": event, **{k: v for k, v in fields.items() if k not in _STANDARD_ATTRS}}
        log.log(level, "%s %s %s", event, scene, details, extra=extra)
