"""The ``fusarbatch`` command line (Typer). Each command parses its arguments and calls one library
function; no logic lives here. Errors a user can cause print one line and exit non-zero
(:mod:`fusarbatch.errors`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fusarbatch import __version__
from fusarbatch.errors import FusarbatchError

app = typer.Typer(
    name="fusarbatch",
    help="Batch FUSAR-GPT over SAR archives: STAC search -> Zarr tiles -> AlphaEarth anchors -> GeoParquet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

# Options shared by several commands, defined once.
AoiOpt = Annotated[
    Path,
    typer.Option("--aoi", help="AOI GeoJSON file: Feature, FeatureCollection or bare geometry, any CRS."),
]
StartOpt = Annotated[
    str, typer.Option("--start", help="First day, UTC: YYYY-MM (whole month) or YYYY-MM-DD.")
]
EndOpt = Annotated[
    str | None, typer.Option("--end", help="Last day, inclusive, UTC: YYYY-MM or YYYY-MM-DD. Default: open.")
]
CatalogOpt = Annotated[
    str | None,
    typer.Option("--catalog", help="Catalog name (catalogs/*.toml), STAC API URL, catalog.json or .parquet."),
]
CollectionOpt = Annotated[
    list[str] | None, typer.Option("--collection", help="Collection id to search (repeatable).")
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most this many scenes.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"fusarbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """fusarbatch: FUSAR-GPT batch inference over SAR archives."""


@app.command()
def search(
    aoi: AoiOpt,
    start: StartOpt,
    end: EndOpt = None,
    catalog: CatalogOpt = None,
    collection: CollectionOpt = None,
    limit: LimitOpt = None,
    save: Annotated[
        Path | None, typer.Option("--save", help="Write the scenes as stac-geoparquet to this file.")
    ] = None,
) -> None:
    """Search a STAC catalog for SAR scenes over an AOI and print them."""
    from fusarbatch.catalog import search_scenes
    from fusarbatch.report import print_scenes

    result = search_scenes(
        aoi=aoi,
        start=start,
        end=end,
        catalog=catalog,
        collections=tuple(collection or ()),
        limit=limit,
        save=save,
    )
    print_scenes(console, result)


@app.command()
def tile(
    aoi: AoiOpt,
    start: StartOpt,
    out: Annotated[Path, typer.Option("--out", help="Output folder: scenes.parquet and tiles.zarr go here.")],
    end: EndOpt = None,
    catalog: CatalogOpt = None,
    collection: CollectionOpt = None,
    limit: LimitOpt = None,
    tile_size: Annotated[int, typer.Option("--tile-size", min=28, help="Tile edge in pixels.")] = 504,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Overlap between tiles in pixels.")] = 56,
) -> None:
    """Search, then tile every scene into <out>/tiles.zarr (DESIGN 3.2)."""
    from fusarbatch.catalog import search_scenes
    from fusarbatch.report import print_scenes, print_tiling
    from fusarbatch.tiling import tile_scenes

    result = search_scenes(
        aoi=aoi,
        start=start,
        end=end,
        catalog=catalog,
        collections=tuple(collection or ()),
        limit=limit,
        save=out / "scenes.parquet",
    )
    print_scenes(console, result)
    results = tile_scenes(result.scenes, out / "tiles.zarr", tile_size=tile_size, overlap=overlap)
    print_tiling(console, results, out / "tiles.zarr")
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


@app.command()
def run(
    aoi: AoiOpt,
    start: StartOpt,
    end: EndOpt = None,
    catalog: CatalogOpt = None,
    collection: CollectionOpt = None,
    limit: LimitOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("out"),
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: the packaged demo model).")
    ] = None,
    aef_index: Annotated[
        str | None,
        typer.Option("--aef-index", help="AlphaEarth index (GeoParquet/CSV), local or fsspec URL."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Object label to detect (repeatable).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Tiles per generate call.")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Dask scheduler address (default: a LocalCluster).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cuda or cpu (default: cuda if present).")
    ] = None,
    require_gpu: Annotated[
        bool, typer.Option("--require-gpu", help="Fail when no GPU is visible instead of using the CPU.")
    ] = False,
    tile_size: Annotated[int | None, typer.Option("--tile-size", min=28)] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", min=0)] = None,
) -> None:
    """Search, tile, attach AlphaEarth anchors, run FUSAR-GPT and write GeoParquet (DESIGN 1)."""
    from fusarbatch.config import load_config
    from fusarbatch.pipeline import run as run_pipeline
    from fusarbatch.report import RunProgress, print_run_summary

    cfg = load_config(
        None,
        {
            "aoi": aoi,
            "start": start,
            "end": end,
            "catalog": catalog,
            "collections": tuple(collection) if collection else None,
            "limit": limit,
            "out": out,
            "model": model,
            "aef_index": aef_index,
            "labels": tuple(label) if label else None,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "scheduler": scheduler,
            "device": device,
            "require_gpu": require_gpu or None,
            "tile_size": tile_size,
            "overlap": overlap,
        },
    )
    with RunProgress(console) as progress:
        summary = run_pipeline(cfg, progress)
    print_run_summary(console, summary)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def features(
    out: Annotated[Path, typer.Option("--out", help="Output folder holding tiles.zarr.")],
    aef_index: Annotated[
        str | None,
        typer.Option("--aef-index", help="AlphaEarth index (GeoParquet/CSV), local or fsspec URL."),
    ] = None,
    anchors: Annotated[int, typer.Option("--anchors", min=1, max=64, help="N for an N x N anchor grid.")] = 8,
) -> None:
    """Sample AlphaEarth anchors for every complete scene of <out>/tiles.zarr (DESIGN 3.3)."""
    from fusarbatch.features import compute_features, open_source
    from fusarbatch.pipeline import ANCHOR_GRID
    from fusarbatch.report import print_features

    results = compute_features(out / "tiles.zarr", open_source(aef_index), n=anchors, grid=ANCHOR_GRID)
    print_features(console, results)


def main() -> None:
    """Console-script entry point: runs the app, turning :class:`FusarbatchError` into one line."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("fusarbatch").addHandler(handler)
    logging.getLogger("fusarbatch").setLevel(logging.INFO)
    try:
        app()
    except FusarbatchError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
