"""Human-readable summaries printed by the CLI: rich tables on a terminal, tab-separated lines otherwise
(so that cron logs and pipes keep whole item ids)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

log = logging.getLogger("fusarbatch")

if TYPE_CHECKING:
    from fusarbatch.catalog import SearchResult
    from fusarbatch.pipeline import RunSummary
    from fusarbatch.tiling import TileResult


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table on a terminal; a title line, a header line and tab-separated rows otherwise."""
    if console.is_terminal:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, no_wrap=column in ("id", "scene"), overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:
        console.print(title, highlight=False, soft_wrap=True)
        for line in (columns, *rows):
            console.print("\t".join(line), highlight=False, soft_wrap=True, markup=False)


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
        console.print(f"scenes saved to {result.saved}", highlight=False, soft_wrap=True)


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
    console.print(
        f"{len(results) - failed} scene(s) tiled, {failed} failed; store: {store}",
        highlight=False,
        soft_wrap=True,
    )


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
    """End-of-run summary: scenes, tiles, detections per label, failures, output paths."""
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
    lines = [
        f"scenes: {len(summary.scenes)} ({len(summary.failed)} failed); "
        f"tiles: {n_tiles} ({n_inferred} inferred)",
        f"detections per label: {per_label}",
        f"wall time {summary.seconds:.1f} s, generate {summary.generate_seconds:.1f} s "
        f"({summary.prompts} prompts; {100 * outside:.0f}% of the time outside generate)",
        f"outputs: {summary.out}/detections, {summary.out}/tiles, {summary.out}/counts (GeoParquet), "
        f"{summary.out}/quicklooks (PNG), {summary.out}/tiles.zarr, {summary.out}/scenes.parquet",
    ]
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


class RunProgress:
    """Progress of ``run``: a rich progress bar over scenes on a terminal, one log line per event otherwise.

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
                TextColumn("{task.description}"),
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
                self._task = self._progress.add_task("scenes", total=fields["total"])
            elif event == "stage" and self._task is not None:
                self._progress.update(self._task, description=f"{fields['stage']}: {fields['scene'][:48]}")
            elif event == "scene_done" and self._task is not None:
                self._progress.advance(self._task)
            return
        details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and k != "scene")
        scene = fields.get("scene", "")
        log.info("%s %s %s", event, scene, details)
