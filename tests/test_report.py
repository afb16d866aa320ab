"""Run logging (:mod:`fusarbatch.report`): off a terminal, stderr carries nothing but JSON lines, also for
records of other libraries (asyncio's "Future exception was never retrieved" at Dask shutdown once broke
a cron log) and for multi-line tracebacks."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusarbatch import report

LOGGERS = ("", "fusarbatch", "asyncio", "distributed", "tornado", "py.warnings", "rasterio")


@pytest.fixture
def stderr_lines() -> Iterator[io.StringIO]:
    """A StringIO as the ``fusarbatch`` logger's stream handler (what ``cli.main`` installs on stderr);
    every logger touched is restored afterwards."""
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in LOGGERS}
    saved_level = logging.getLogger("fusarbatch").level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("fusarbatch").addHandler(handler)
    try:
        yield stream
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        logging.getLogger("fusarbatch").setLevel(saved_level)
        report._json_handlers.clear()
        report._context.clear()


def parse(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_mode_routes_every_library_through_one_json_line_each(stderr_lines):
    report.setup_run_logging(json_lines=True)
    report.route_library_logs()
    report.set_log_context(run_id="r1")
    logging.getLogger("fusarbatch.pipeline").info("scene done", extra={"event": "scene_done", "scene": "s1"})
    try:
        raise ConnectionResetError("comm closed")
    except ConnectionResetError as exc:
        logging.getLogger("asyncio").error("Future exception was never retrieved", exc_info=exc)
    logging.getLogger("distributed.client").warning("worker lost")
    logging.getLogger("rasterio._env").warning("CPLE_AppDefined in TIFFReadDirectory")
    logging.getLogger("asyncio").info("below WARNING: dropped")
    rows = parse(stderr_lines)  # every line is JSON, the traceback inside one of them
    assert [(r["logger"], r["level"], r["message"]) for r in rows] == [
        ("fusarbatch.pipeline", "info", "scene done"),
        ("asyncio", "error", "Future exception was never retrieved"),
        ("distributed.client", "warning", "worker lost"),
        ("rasterio._env", "warning", "CPLE_AppDefined in TIFFReadDirectory"),
    ]
    assert rows[0]["scene"] == "s1" and rows[0]["event"] == "scene_done"
    assert all(r["run_id"] == "r1" for r in rows)
    assert "ConnectionResetError: comm closed" in rows[1]["exception"]
    report.route_library_logs()  # idempotent: still one line per record
    logging.getLogger("asyncio").warning("again")
    assert [r["message"] for r in parse(stderr_lines)[4:]] == ["again"]


def test_terminal_mode_leaves_library_logs_alone(stderr_lines):
    report.setup_run_logging(json_lines=False)
    report.route_library_logs()
    assert not any(isinstance(h, report._Forward) for h in logging.getLogger().handlers)
    logging.getLogger("fusarbatch").warning("plain text")
    assert stderr_lines.getvalue() == "plain text\n"


HOSTILE_ID = "S1A_\x1b[31m[bold]red[/bold]\tid\r\x07\nnext"


@pytest.mark.parametrize("terminal", [True, False], ids=["rich-table", "tab-separated"])
def test_tables_show_untrusted_ids_literally(terminal):
    """Item ids come from catalogs (untrusted): no terminal escape, no rich markup, no extra column/line."""
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, color_system=None, width=300)
    report.print_table(console, f"title [red]{HOSTILE_ID}", ("scene", "n"), [(HOSTILE_ID, "1")])
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    assert "S1A_\\x1b[31m[bold]red[/bold]\\x09id\\x0d\\x07\\x0anext" in text
    assert "[red]S1A_" in text  # the title is literal too (rich may wrap it)
    if not terminal:
        cells = text.splitlines()[2].split("\t")
        assert cells == ["S1A_\\x1b[31m[bold]red[/bold]\\x09id\\x0d\\x07\\x0anext", "1"]


def test_plain_log_lines_escape_control_characters_but_keep_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(report.PlainFormatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("fusarbatch.test_plain")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("scene %s failed", "a\x1b]0;pwned\x07b")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "ERROR: scene a\\x1b]0;pwned\\x07b failed"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom"


def test_a_log_file_that_cannot_be_written_warns_once_and_the_run_goes_on(stderr_lines, tmp_path):
    """--log-file on a full disk: one warning (JSON) instead of a traceback per record."""
    report.setup_run_logging(json_lines=True, log_file=Path("/dev/full"))
    log = logging.getLogger("fusarbatch.pipeline")
    for n in range(3):
        log.info("scene %d done", n, extra={"event": "scene_done"})
    rows = parse(stderr_lines)
    assert [r["message"] for r in rows if "--log-file" in r["message"]] == [
        "--log-file /dev/full: cannot write (No space left on device); logging there stops, the run goes on"
    ]
    assert [r["message"] for r in rows if r.get("event") == "scene_done"] == [
        f"scene {n} done" for n in range(3)
    ]
