"""Benchmark of issue 11: the cost follows the AOI; sea/land triage; the compact tile store.

Every input is GENERATED (synthetic SAR, ``benchmarks/tiling.py``'s generator: log-normal texture times
4.4-look gamma speckle, dB, dual-pol VV/VH, 10 m pixels, nodata swath wedges), described by a STAC item in a
stac-geoparquet catalog, and processed by ``fusarbatch run`` (CLI, subprocess) with the packaged tiny demo
model on the CPU (``--max-new-tokens 16``).

Parts (each optional, see ``--help``):

- ``iw``: a scene of real IW GRD size, 16,700 rows x 25,000 columns (tiled DEFLATE GeoTIFF, UTM 31N), and
  centred rectangular AOIs covering the given shares of it (default 1%), each run at the given tile
  overlaps (default 56 px, the default of ``run``, and 0): tiles inferred and wall time of ``run`` against
  the tiles of the whole scene and the minimum number of full-size tiles covering AOI intersect scene (two
  counts: without overlap, ``ceil(w/T) * ceil(h/T)``; and with the run's overlap, ``n(w) * n(h)`` with
  ``n(L) = ceil((L - T) / S) + 1``, ``S = T - overlap``).
- ``coast``: a 3,000 x 3,000 px scene placed over the real coastline of Marseille (UTM 31N; the values are
  generated, only the place is real), ``run --surface sea`` with an AOI covering it: tiles skipped, and a
  check with the land-mask package's own ``globe.is_ocean`` that no skipped tile has ocean within one mask
  cell (1/120 degree) of its footprint.
- ``store``: on the 10,000 x 10,000 px COG of ``benchmarks/tiling.py``: the read/write floor, and
  ``tile_scene`` with the old default (float32, uncompressed) and float16 with several codecs: MB/s,
  share of the floor, store bytes / float32 scene bytes; and how many rendered 8-bit pixels (what the
  model sees) float16 storage changes.

Usage: ``python benchmarks/aoi.py [--parts iw,coast,store] [--shares 0.01,0.1] [--overlaps 56,0]
[--no-write]``.
Results go to stdout and to ``benchmarks/RESULTS.md`` (section "AOI, triage and tile store (issue 11)").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiling as tiling_bench  # noqa: E402  (benchmarks/tiling.py: the generator and the floor)
from results_md import write_section  # noqa: E402  (benchmarks/results_md.py)

WORK = HERE / "_work"
RESULTS = HERE / "RESULTS.md"
SECTION = "## AOI, triage and tile store (issue 11)"
TILE = 504
IW_SHAPE = (16_700, 25_000)
COAST_ORIGIN = (680_000.0, 4_810_000.0)  # UTM 31N: 30 km x 30 km over Marseille and the sea south of it
CODECS = ("f32-none", "f16-none", "f16-zstd1", "f16-lz4", "f16-bzstd1")


def _python() -> list[str]:
    return [sys.executable]


# ------------------------------------------------------------------------------------------ inputs


def item_for(path: Path, item_id: str) -> dict:
    """A STAC item (dict) for a generated dual-pol dB GeoTIFF."""
    import rasterio
    import shapely
    from rasterio.warp import transform_geom

    with rasterio.open(path) as src:
        frame = shapely.box(*src.bounds).segmentize(max(src.res) * 500)
        geometry = transform_geom(src.crs, "EPSG:4326", shapely.geometry.mapping(frame))
        shape, transform, epsg = list(src.shape), list(src.transform)[:6], src.crs.to_epsg()
    bbox = list(shapely.geometry.shape(geometry).bounds)
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": item_id,
        "geometry": geometry,
        "bbox": bbox,
        "properties": {
            "datetime": "2024-06-01T17:30:00Z",
            "platform": "sentinel-1",
            "sar:instrument_mode": "IW",
            "sar:product_type": "GRD",
            "sar:polarizations": ["VV", "VH"],
            "proj:code": f"EPSG:{epsg}",
            "proj:shape": shape,
            "proj:transform": transform,
        },
        "links": [],
        "assets": {
            "sigma0": {
                "href": str(path),
                "type": "image/tiff; application=geotiff",
                "title": "GENERATED VV and VH sigma0, dB",
                "sar:polarizations": ["VV", "VH"],
                "raster:bands": [{"data_type": "float32", "unit": "dB"}] * 2,
                "roles": ["data"],
            }
        },
    }


def write_catalog(path: Path, items: list[dict]) -> Path:
    import stac_geoparquet.arrow as sga

    sga.to_parquet(sga.parse_stac_items_to_arrow(items), path)
    return path


def write_aoi(path: Path, scene: Path, share: float) -> tuple[float, float]:
    """A centred rectangle covering ``share`` of the scene's area (GeoJSON in the scene CRS); returns its
    width and height in pixels."""
    import rasterio
    import shapely

    with rasterio.open(scene) as src:
        h, w = src.shape
        t, epsg = src.transform, src.crs.to_epsg()
    k = math.sqrt(share)
    c0, c1 = w * (1 - k) / 2, w * (1 + k) / 2
    r0, r1 = h * (1 - k) / 2, h * (1 + k) / 2
    x0, y0 = t * (c0, r0)
    x1, y1 = t * (c1, r1)
    geometry = shapely.geometry.mapping(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    doc = {
        "type": "Feature",
        "properties": {"name": f"GENERATED AOI, {share:.0%} of {scene.name}"},
        "crs": {"type": "name", "properties": {"name": f"EPSG:{epsg}"}},
        "geometry": geometry,
    }
    path.write_text(json.dumps(doc))
    return c1 - c0, r1 - r0


def _axis_min(length: float, overlap: int) -> int:
    """Fewest full-size tiles along one axis covering ``length`` px with neighbours overlapping by at least
    ``overlap`` px."""
    length = math.ceil(length)
    if length <= TILE:
        return 1
    return math.ceil((length - TILE) / (TILE - overlap)) + 1


def run_fusarbatch(catalog: Path, aoi: Path, out: Path, *extra: str) -> dict:
    """``fusarbatch run`` in a subprocess; wall time, tiles stored / inferred / skipped."""
    from fusarbatch.outputs.geoparquet import read_dataset

    shutil.rmtree(out, ignore_errors=True)
    argv = [
        *_python(),
        "-m",
        "fusarbatch.cli",
        "run",
        "--catalog",
        str(catalog),
        "--aoi",
        str(aoi),
        "--start",
        "2024-06",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--max-new-tokens",
        "16",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    tiles = read_dataset(out, "tiles")
    return {
        "seconds": seconds,
        "tiles": len(tiles),
        "inferred": int((tiles.status == "ok").sum()),
        "skipped": int((tiles.status == "skipped").sum()),
        "tiles_frame": tiles,
    }


# ------------------------------------------------------------------------------------------ parts


def part_iw(shares: list[float], overlaps: list[int]) -> list[dict]:
    from fusarbatch.tiling.grid import tile_grid

    path = WORK / "generated_iw_grd_16700x25000.tif"
    t0 = time.perf_counter()
    tiling_bench.generate(path, IW_SHAPE[0], width=IW_SHAPE[1], cog=False, seed=11)
    print(f"{path.name}: {path.stat().st_size / 1e9:.2f} GB (ready in {time.perf_counter() - t0:.0f} s)")
    catalog = write_catalog(WORK / "generated_iw.parquet", [item_for(path, "generated-iw-grd")])
    rows = []
    for share in shares:
        aoi = WORK / f"generated_iw_aoi_{share:g}.geojson"
        w, h = write_aoi(aoi, path, share)
        for overlap in overlaps:
            out = WORK / f"out_iw_{share:g}_{overlap}"
            res = run_fusarbatch(catalog, aoi, out, "--overlap", str(overlap))
            res.pop("tiles_frame")
            row = {
                "share": share,
                "overlap": overlap,
                "aoi_px": (round(w), round(h)),
                "whole_tiles": tile_grid(*IW_SHAPE, TILE, overlap).n_tiles,
                "min_no_overlap": _axis_min(w, 0) * _axis_min(h, 0),
                "min_overlap": _axis_min(w, overlap) * _axis_min(h, overlap),
                **res,
            }
            rows.append(row)
            print(json.dumps(row))
    return rows


def part_coast() -> dict:
    import numpy as np

    path = WORK / "generated_coast_marseille_3000.tif"
    tiling_bench.generate(path, 3000, origin=COAST_ORIGIN, cog=False, seed=12)
    catalog = write_catalog(WORK / "generated_coast.parquet", [item_for(path, "generated-coast-marseille")])
    aoi = WORK / "generated_coast_aoi.geojson"
    write_aoi(aoi, path, 1.0)
    res = run_fusarbatch(catalog, aoi, WORK / "out_coast", "--surface", "sea")
    tiles = res.pop("tiles_frame")
    from global_land_mask import globe  # the package's own lookup (inflates the 933 MB mask: ~10 s)

    cell = 1 / 120
    wrong = 0
    for geom in tiles[tiles.status == "skipped"].geometry:
        lon0, lat0, lon1, lat1 = geom.bounds
        lons = np.arange(lon0 - cell, lon1 + cell + 1e-9, cell / 4)
        lats = np.arange(lat0 - cell, lat1 + cell + 1e-9, cell / 4)
        lo, la = np.meshgrid(lons, lats)
        wrong += int(globe.is_ocean(la.ravel(), lo.ravel()).any())
    out = {**res, "skipped_with_ocean_within_one_cell": wrong}
    out["reasons"] = sorted(set(tiles.reason.dropna()))
    print(json.dumps(out))
    return out


def _child_tile(path: str, store: str, spec: str) -> dict:
    import numpy as np
    import zarr

    import fusarbatch.tiling.store as tiling_store

    dtype, codec = spec.split("-")
    tiling_store.BACKSCATTER_DTYPE = {"f32": np.float32, "f16": np.float16}[dtype]
    tiling_store.BACKSCATTER_COMPRESSORS = {
        "none": None,
        "zstd1": (zarr.codecs.ZstdCodec(level=1),),
        "lz4": (zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),),
        "bzstd1": (zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
    }[codec]
    return tiling_bench.time_tiling(path, store)


def _run_child(path: Path, spec: str) -> dict:
    target = WORK / "tiles_issue11.zarr"
    shutil.rmtree(target, ignore_errors=True)
    os.sync()
    proc = subprocess.run(
        [*_python(), __file__, "--child", str(path), str(target), spec],
        capture_output=True,
        text=True,
        check=False,
    )
    shutil.rmtree(target, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{spec} failed:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    out["mb_s"] = out["bytes"] / out["seconds"] / 1e6
    return out


def render_changes(path: Path, n: int = 24) -> dict:
    """Share of rendered 8-bit pixels (grey and false-colour, what the model sees) that differ between a
    float32 tile and the same tile stored as float16, on ``n`` tiles of the generated scene."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from fusarbatch.render import render

    rng = np.random.default_rng(0)
    changed = total = 0
    worst = 0
    with rasterio.open(path) as src:
        for _ in range(n):
            r, c = (int(v) for v in rng.integers(0, src.height - TILE, 2))
            tile = src.read(window=Window(c, r, TILE, TILE)).astype(np.float32)
            tile[tile == tiling_bench.NODATA] = np.nan
            for mode in ("grey", "false-colour"):
                a = np.asarray(render(tile, ["VV", "VH"], mode=mode)).astype(int)
                b = np.asarray(render(tile.astype(np.float16), ["VV", "VH"], mode=mode)).astype(int)
                changed += int((a != b).sum())
                total += a.size
                worst = max(worst, int(np.abs(a - b).max()))
    return {"changed_share": changed / total, "max_level_change": worst, "tiles": n}


def part_store(repeat: int) -> dict:
    path = WORK / f"generated_s1_dualpol_{tiling_bench.BASE}.tif"
    tiling_bench.generate(path, tiling_bench.BASE)
    floors, results = [], {spec: [] for spec in CODECS}
    for _ in range(repeat):
        floors.append(tiling_bench.run_case("floor", path))
        for spec in CODECS:
            results[spec].append(_run_child(path, spec))
    floor = min(floors, key=lambda r: r["seconds"])
    rows = {}
    for spec, runs in results.items():
        best = min(runs, key=lambda r: r["seconds"])
        rows[spec] = {
            **best,
            "share_of_floor": best["mb_s"] / floor["mb_s"],
            "store_ratio": best["store_bytes"] / best["bytes"],
            "all_seconds": [round(r["seconds"], 2) for r in runs],
        }
        print(spec, json.dumps(rows[spec]))
    render_diff = render_changes(path)
    print("render", json.dumps(render_diff))
    return {
        "floor": floor,
        "codecs": rows,
        "render": render_diff,
        "floor_runs": [round(f["seconds"], 2) for f in floors],
    }


# ------------------------------------------------------------------------------------------ report


PARTS_FILE = WORK / "aoi_parts.json"
"""The latest result of each part (``--parts`` runs only some; the report shows every part's latest)."""


def load_parts() -> dict:
    try:
        return json.loads(PARTS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def save_parts(saved: dict) -> None:
    tmp = PARTS_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1, default=str))
    tmp.replace(PARTS_FILE)


def _when(saved: dict, part: str) -> str:
    p = saved[part]
    return f"Measured {p['measured']} (1-min load average {p['load'][0]} -> {p['load'][1]}). "


def report(saved: dict, seconds: float, load: tuple) -> str:
    import platform

    iw = saved.get("iw", {}).get("result") or []
    coast = saved.get("coast", {}).get("result")
    store = saved.get("store", {}).get("result")

    lines = [
        SECTION,
        "",
        f"Written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python benchmarks/aoi.py` (each part "
        "below says when it was measured; `--parts` reruns some and keeps the others' latest results); "
        f"machine: {os.cpu_count()} cores (shared), Linux {platform.machine()}, Python "
        f"{platform.python_version()}; this invocation {seconds:.0f} s, 1-min load average {load[0]:.1f} at "
        f"the start, {load[1]:.1f} at the end. Every scene is GENERATED (benchmarks/tiling.py's "
        "generator); `run` is the CLI with the packaged tiny demo model on the CPU, `--max-new-tokens 16`, "
        "tiles 504 px, overlap 56 px unless the table says otherwise.",
        "",
    ]
    if iw:
        lines += [
            _when(saved, "iw")
            + f"AOI-clipped `run` on a GENERATED IW GRD-size scene ({IW_SHAPE[0]:,} x {IW_SHAPE[1]:,} px, "
            "dual-pol, 10 m, UTM 31N); centred rectangular AOIs:",
            "",
            "| AOI share | AOI (px) | `--overlap` (px) | whole-scene tiles | min tiles (no overlap / this "
            "overlap) | tiles inferred | inferred / min (no overlap / this overlap) | `run` wall time (s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in iw:
            lines.append(
                f"| {r['share']:.0%} | {r['aoi_px'][0]} x {r['aoi_px'][1]} | {r['overlap']} | "
                f"{r['whole_tiles']} | "
                f"{r['min_no_overlap']} / {r['min_overlap']} | {r['inferred']} | "
                f"{r['inferred'] / r['min_no_overlap']:.2f}x / {r['inferred'] / r['min_overlap']:.2f}x | "
                f"{r['seconds']:.0f} |"
            )
        lines.append("")
    if coast:
        lines += [
            _when(saved, "coast")
            + "`run --surface sea` on a GENERATED 3,000 x 3,000 px scene placed over the real coastline of "
            "Marseille (UTM 31N, 30 x 30 km; the values are synthetic, the place and the land mask are "
            f"real): {coast['tiles']} tiles, {coast['skipped']} skipped as land, {coast['inferred']} "
            f"inferred; skipped tiles with ocean within one mask cell of their footprint (checked with "
            f"global-land-mask's own `globe.is_ocean` every 1/480 degree): "
            f"{coast['skipped_with_ocean_within_one_cell']}; wall time {coast['seconds']:.0f} s.",
            "",
        ]
    if store:
        f = store["floor"]
        lines += [
            _when(saved, "store")
            + f"Tile store on the {tiling_bench.BASE:,} x {tiling_bench.BASE:,} px GENERATED COG "
            f"(benchmarks/tiling.py): floor {f['mb_s']:.0f} MB/s (fastest of {store['floor_runs']}); "
            "`tile_scene`, fastest of the runs listed, each in a fresh process:",
            "",
            "| dtype-codec | MB/s | share of floor | store / float32 scene bytes | runs (s) |",
            "|---|---|---|---|---|",
        ]
        for spec, r in store["codecs"].items():
            lines.append(
                f"| {spec} | {r['mb_s']:.0f} | {r['share_of_floor']:.0%} | {r['store_ratio']:.2f}x | "
                f"{r['all_seconds']} |"
            )
        rd = store["render"]
        lines += [
            "",
            f"float16 vs float32 storage, rendered 8-bit (grey and false-colour) on {rd['tiles']} tiles: "
            f"{rd['changed_share']:.3%} of the pixel values differ, by at most "
            f"{rd['max_level_change']} level(s).",
            "",
        ]
    lines += _targets(iw, coast, store)
    return "\n".join(lines) + "\n"


def _targets(iw: list[dict], coast: dict | None, store: dict | None) -> list[str]:
    """The issue-11 targets, each met or not, from the results above."""

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = ["Targets (issue 11):"]
    for r in iw:
        ratio = r["inferred"] / r["min_overlap"]
        out.append(
            f"- {r['share']:.0%} AOI, overlap {r['overlap']} px: {r['inferred']} tiles inferred = "
            f"{ratio:.2f}x the fewest full-size tiles with that overlap covering AOI intersect scene "
            f"(target <= 1.2x: {met(ratio <= 1.2)}; {r['inferred'] / r['min_no_overlap']:.2f}x a cover "
            "with no overlap at all)."
        )
    if iw:
        out.append(
            "  The tile grid stays anchored to the scene (identical tiles where AOIs overlap), so at the "
            "default 56 px overlap the fair minimum is a cover with that overlap; at `--overlap 0` the "
            "clip itself adds at most one row and one column of tiles."
        )
    if coast:
        n = coast["skipped_with_ocean_within_one_cell"]
        out.append(
            f"- no tile with water within one mask cell skipped by `--surface sea`: {met(n == 0)} ({n})."
        )
    if store and store["codecs"].get("f16-zstd1"):
        d = store["codecs"]["f16-zstd1"]
        out += [
            f"- the default store (float16, zstd level 1): {d['store_ratio']:.2f}x the float32 scene bytes "
            f"(target <= 0.5x: {met(d['store_ratio'] <= 0.5)}); tiling at {d['share_of_floor']:.0%} of "
            f"the read/write floor (target >= 70%: {met(d['share_of_floor'] >= 0.7)}).",
            "  The floor reads the file on one thread and writes its bytes once; `tile_scene` also "
            "converts, casts, compresses and writes 1.27x the pixels (overlap, padding) on the 2 cores. "
            "Shares fall on a busy machine: the 2026-12-06 20:35 run (load 3-4.6), before the two changes "
            "that followed, measured 41% for this default. The changes: zarr no longer compares every "
            "chunk with the NaN fill value (`write_empty_chunks`), and GDAL decodes a window's blocks on "
            "all cores (`GDAL_NUM_THREADS`).",
        ]
    return out


def write_results(text: str) -> None:
    write_section(SECTION, text, RESULTS)


def _overlaps(text: str) -> list[int]:
    """``--overlaps``: comma-separated integers in ``[0, TILE)`` (checked before the scene is generated)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 56,0") from None
    bad = [v for v in values if not 0 <= v < TILE]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]} px: an overlap is >= 0 and < the tile size {TILE}")
    return values


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        import resource

        out = _child_tile(*sys.argv[2:5])
        out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(out))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="iw,coast,store")
    parser.add_argument("--shares", default="0.01", help="AOI shares of the IW scene, e.g. 0.01,0.1,1")
    parser.add_argument(
        "--overlaps", default="56,0", type=_overlaps, help="tile overlaps (px) of the IW runs, e.g. 56,0"
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    shares, overlaps = [float(s) for s in args.shares.split(",")], args.overlaps
    saved = load_parts()
    for part, run in (
        ("iw", lambda: part_iw(shares, overlaps)),
        ("coast", part_coast),
        ("store", lambda: part_store(args.repeat)),
    ):
        if part in parts:
            load = os.getloadavg()[0]
            result = run()
            saved[part] = {
                "measured": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
                "load": [round(load, 1), round(os.getloadavg()[0], 1)],
                "result": result,
            }
    save_parts(saved)
    text = report(saved, time.perf_counter() - started, (load0, os.getloadavg()[0]))
    print(text)
    if not args.no_write:
        write_results(text)


if __name__ == "__main__":
    main()
