"""Human-readable summaries printed by the CLI: rich tables on a terminal, tab-separated lines otherwise
(so that cron logs and pipes keep whole item ids)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fusarbatch.catalog import SearchResult
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
