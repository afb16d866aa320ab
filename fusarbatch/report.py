"""Human-readable summaries printed by the CLI (rich tables on a terminal, plain text otherwise)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fusarbatch.catalog import SearchResult
    from fusarbatch.tiling import TileResult


def print_scenes(console: Console, result: SearchResult) -> None:
    """Table of found scenes: id, datetime (UTC), platform, polarisations, share of the AOI covered."""
    table = Table(title=f"{len(result.scenes)} scene(s) from catalog {result.spec.name!r}", title_justify="left")
    for column in ("id", "datetime (UTC)", "platform", "pols", "AOI covered"):
        table.add_column(column, overflow="fold")
    for scene in result.scenes:
        table.add_row(
            scene.item_id,
            scene.datetime.strftime("%Y-%m-%d %H:%M:%S"),
            scene.platform or "-",
            "/".join(scene.pols),
            f"{100 * result.coverage.get(scene.item_id, 0.0):.1f}%",
        )
    console.print(table)
    if result.saved is not None:
        console.print(f"scenes saved to {result.saved}")


def print_tiling(console: Console, results: list[TileResult], store: Path) -> None:
    """Table of tiling results per scene, then the store path."""
    table = Table(title=f"tiling into {store}", title_justify="left")
    for column in ("scene", "status", "tiles", "to infer", "seconds", "error"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(
            r.scene_id, r.status, str(r.n_tiles), str(r.n_inferable), f"{r.seconds:.2f}", r.error or ""
        )
    console.print(table)
    failed = sum(r.status == "failed" for r in results)
    console.print(f"{len(results) - failed} scene(s) tiled, {failed} failed; store: {store}")
