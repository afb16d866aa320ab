"""Benchmark of the tiling stage (issue 2): throughput and peak memory of ``tile_scene`` on big scenes.

The input is GENERATED (synthetic SAR, no real scene of this size is shipped): a dual-polarisation
(VV, VH) float32 Cloud-Optimized GeoTIFF made with GDAL's COG driver (512 x 512 blocks, DEFLATE with the
floating-point predictor, internal overviews, like Sentinel-1 RTC COGs), EPSG:32631, 10 m pixels. Values
are sigma0 in dB: a smooth log-normal backscatter texture (VV around -12 dB, VH around -19 dB) times
4.4-look gamma-distributed speckle (the equivalent number of looks of Sentinel-1 IW GRD), converted to dB,
with a nodata (-9999) wedge along the left and right edges like a swath border.

Cases, each in a fresh subprocess so peak memory (``ru_maxrss``) is comparable:

- ``floor``: read the file once with rasterio, block window by block window (one thread), and write its
  bytes once to a raw file: the I/O + decode floor on this machine.
- ``tile``: ``fusarbatch.tiling.tile_scene`` (default tile 504, overlap 56) into a fresh ``tiles.zarr``.
- ``codec``: the same with another ``backscatter`` compressor (none, zstd level 1, blosc-lz4 + byte
  shuffle), to choose the default.

MB/s is the scene's uncompressed size (H x W x 2 pols x 4 bytes) over the wall time. Output is removed and
the page cache flushed (``sync``) before every case; the input stays in the page cache (warm) for all.

Usage: ``python benchmarks/tiling.py [--quick] [--no-scale4] [--repeat N]``; ``--quick`` skips the
20,000 x 20,000 scene (which needs ~4.5 GB of disk for the input and ~4 GB for the output).
Results go to stdout and to ``benchmarks/RESULTS.md`` (section "Tiling (issue 2)").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Tiling (issue 2)"
BASE = 10_000
NODATA = -9999.0
TARGET_FLOOR_SHARE = 0.60
TARGET_RSS_MB = 1536
TARGET_RSS_GROWTH = 0.20


def generate(
    path: Path,
    size: int,
    seed: int = 0,
    *,
    width: int | None = None,
    origin: tuple[float, float] = (500_000.0, 5_000_000.0),
    crs: str = "EPSG:32631",
    cog: bool = True,
) -> None:
    """Write the GENERATED dual-pol dB COG (see the module docstring), strip by strip (bounded memory).

    ``size`` rows and ``width`` (default ``size``) columns, upper-left corner ``origin`` in ``crs``; with
    ``cog=False`` a tiled DEFLATE GeoTIFF without overviews (faster to make: benchmarks/aoi.py)."""
    height, size = size, width or size
    import numpy as np
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.exists():
        return
    rng = np.random.default_rng(seed)
    looks = 4.4
    mean_db = np.array([-12.0, -19.0], dtype=np.float32)[:, None, None]
    coarse = 64  # texture cell in pixels
    texture = rng.normal(0.0, 2.5, size=(2, height // coarse + 2, size // coarse + 2)).astype(np.float32)
    tmp = path.with_suffix(".strips.tif")  # renamed or converted at the end: a killed run leaves no `path`
    profile = dict(
        driver="GTiff",
        height=height,
        width=size,
        count=2,
        dtype="float32",
        crs=crs,
        transform=from_origin(origin[0], origin[1], 10.0, 10.0),
        nodata=NODATA,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        BIGTIFF="YES",
        **({} if cog else {"compress": "DEFLATE", "predictor": 3}),
    )
    strip = 512
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.descriptions = ("VV", "VH")
        for r0 in range(0, height, strip):
            h = min(strip, height - r0)
            rows = (np.arange(r0, r0 + h) // coarse)[:, None]
            cols = (np.arange(size) // coarse)[None, :]
            field_db = mean_db + texture[:, rows, cols]
            speckle = rng.gamma(looks, 1.0 / looks, size=(2, h, size)).astype(np.float32)
            sigma0_db = 10.0 * np.log10(speckle * 10.0 ** (field_db / 10.0))
            # nodata wedges: swath borders slanting across the scene (about 6% of the pixels)
            y = np.arange(r0, r0 + h)[:, None]
            x = np.arange(size)[None, :]
            border = (x < 0.02 * size + 0.06 * y) | (x > size - 0.08 * size + 0.06 * y)
            sigma0_db[:, border] = NODATA
            dst.write(sigma0_db.astype(np.float32), window=Window(0, r0, size, h))
    if not cog:
        os.replace(tmp, path)
        return
    rasterio.shutil.copy(
        tmp,
        path,
        driver="COG",
        compress="DEFLATE",
        predictor="YES",
        blocksize=512,
        overview_resampling="average",
        num_threads="ALL_CPUS",
        BIGTIFF="YES",
    )
    tmp.unlink()


# ---------------------------------------------------------------- cases (run in a child process)


def _case_floor(path: str, raw: str) -> dict:
    import rasterio

    start = time.perf_counter()
    nbytes = 0
    with rasterio.open(path) as src, open(raw, "wb") as out:
        for _, window in src.block_windows(1):
            block = src.read(window=window)
            out.write(block.tobytes())
            nbytes += block.nbytes
    return {"seconds": time.perf_counter() - start, "bytes": nbytes}


def _case_tile(path: str, store: str, codec: str | None) -> dict:
    import zarr

    import fusarbatch.tiling.store as tiling_store

    if codec is not None:
        tiling_store.BACKSCATTER_COMPRESSORS = {
            "none": None,
            "zstd1": zarr.codecs.ZstdCodec(level=1),
            "lz4": zarr.codecs.BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"),
        }[codec]
    return time_tiling(path, store)


def time_tiling(path: str, store: str) -> dict:
    """Tile the generated dual-pol scene ``path`` into ``store`` with the store's current settings: wall
    time, raw float32 bytes, tiles and store bytes."""
    import rasterio
    import shapely

    import fusarbatch.tiling.store as tiling_store
    from fusarbatch.catalog.scene import BandRef, Scene

    with rasterio.open(path) as src:
        height, width = src.shape
    scene = Scene(
        item_id="bench-generated",
        datetime=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        footprint=shapely.box(3.0, 45.0, 3.1, 45.1),
        bands={"VV": BandRef(path, 1), "VH": BandRef(path, 2)},
        scale="db",
        crs="EPSG:32631",
    )
    start = time.perf_counter()
    result = tiling_store.tile_scene(scene, Path(store))
    seconds = time.perf_counter() - start
    if result.status != "ok":
        raise SystemExit(f"tiling failed: {result.error}")
    return {
        "seconds": seconds,
        "bytes": height * width * 2 * 4,
        "tiles": result.n_tiles,
        "store_bytes": sum(f.stat().st_size for f in Path(store).rglob("*") if f.is_file()),
    }


def _child(argv: list[str]) -> None:
    import resource

    kind = argv[0]
    out = _case_floor(argv[1], argv[2]) if kind == "floor" else _case_tile(argv[1], argv[2], argv[3] or None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["maxrss_mb"] = usage.ru_maxrss / 1024
    out["cpu_s"] = usage.ru_utime + usage.ru_stime
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------- driver


def run_case(kind: str, path: Path, codec: str = "") -> dict:
    target = WORK / ("floor.raw" if kind == "floor" else "tiles.zarr")
    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    os.sync()  # start every case with no dirty pages from the previous one
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path), str(target), codec],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{kind} case failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["mb_s"] = out["bytes"] / out["seconds"] / 1e6
    if "tiles" in out:
        out["tiles_s"] = out["tiles"] / out["seconds"]
    shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    return out


def best_of(cases: list[tuple[str, str]], path: Path, repeat: int) -> list[dict]:
    """Run the ``(kind, codec)`` cases ``repeat`` times, interleaved (a, b, a, b, ...) so that load from other
    processes hits them alike; per case the fastest run, with the largest peak RSS seen (conservative)."""
    runs: list[list[dict]] = [[] for _ in cases]
    for _ in range(repeat):
        for i, (kind, codec) in enumerate(cases):
            runs[i].append(run_case(kind, path, codec))
    out = []
    for case_runs in runs:
        fastest = dict(min(case_runs, key=lambda r: r["seconds"]))
        fastest["maxrss_mb"] = max(r["maxrss_mb"] for r in case_runs)
        fastest["all_seconds"] = [round(r["seconds"], 2) for r in case_runs]
        out.append(fastest)
    return out


def compare_codecs(path: Path, repeat: int) -> list:
    """Each ``backscatter`` compressor, interleaved; fastest run per compressor."""
    names = ("none", "zstd1", "lz4")
    results = best_of([("tile", name) for name in names], path, repeat)
    for name, res in zip(names, results, strict=True):
        print(
            f"  codec {name}: {res['mb_s']:.0f} MB/s, store {res['store_bytes'] / 1e6:.0f} MB, "
            f"runs {res['all_seconds']} s"
        )
    return list(zip(names, results, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="skip the 4x (20,000 x 20,000) scene")
    parser.add_argument("--scale4", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is reported")
    parser.add_argument("--no-codecs", action="store_true", help="skip the compressor comparison")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    scale4 = args.scale4 and not args.quick
    WORK.mkdir(parents=True, exist_ok=True)
    print("Input is GENERATED synthetic SAR (gamma speckle on a log-normal texture, dB, dual-pol COG).")
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    sizes = [BASE, 2 * BASE] if scale4 else [BASE]
    rows = []
    codecs = []
    for size in sizes:
        path = WORK / f"generated_s1_dualpol_{size}.tif"
        t0 = time.perf_counter()
        generate(path, size)
        print(
            f"{path.name}: {path.stat().st_size / 1e6:.0f} MB on disk "
            f"(ready in {time.perf_counter() - t0:.0f} s)"
        )
        floor, tile = best_of([("floor", ""), ("tile", "")], path, args.repeat)
        rows.append((size, floor, tile))
        print(
            f"{size}: floor {floor['mb_s']:.0f} MB/s, tile {tile['mb_s']:.0f} MB/s "
            f"({tile['tiles_s']:.1f} tiles/s), peak RSS {tile['maxrss_mb']:.0f} MB"
        )
        if size == BASE and not args.no_codecs:
            codecs = compare_codecs(path, max(args.repeat, 3))
    table = render(rows, codecs, time.perf_counter() - started, (load_start, os.getloadavg()[0]))
    print(table)
    if not args.no_write:
        write_results(table)
        print(f"written to {RESULTS}")


def render(rows: list, codecs: list, seconds: float, load: tuple[float, float]) -> str:
    import zarr

    import fusarbatch.tiling.store as tiling_store

    lines = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python benchmarks/tiling.py`; machine: "
        f"{os.cpu_count()} cores, {_ram_gb():.0f} GB RAM, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, zarr {zarr.__version__}; benchmark wall time {seconds:.0f} s; "
        f"1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (the machine is shared: "
        "other processes add noise, hence the best of several runs).",
        "Input: GENERATED dual-pol float32 dB COG (GDAL COG driver, 512 px blocks, DEFLATE + predictor 3, "
        "overviews), ~6% nodata border. Tiles 504 px, overlap 56 px. MB/s = uncompressed scene bytes / wall "
        "time; fastest of the runs listed, peak RSS the largest; each run in a fresh process.",
        "",
        "| scene | floor MB/s | tile_scene MB/s | share of floor | tiles | tiles/s | peak RSS (MB) "
        "| tile runs (s) | process CPU s (floor / tile) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, floor, tile in rows:
        lines.append(
            f"| {size:,} x {size:,} x 2 | {floor['mb_s']:.0f} | {tile['mb_s']:.0f} | "
            f"{tile['mb_s'] / floor['mb_s']:.0%} | {tile['tiles']} | {tile['tiles_s']:.1f} | "
            f"{tile['maxrss_mb']:.0f} | {tile['all_seconds']} | {floor['cpu_s']:.1f} / {tile['cpu_s']:.1f} |"
        )
    default = tiling_store.BACKSCATTER_COMPRESSORS
    if codecs:
        lines += [
            "",
            f"Compressor of `backscatter` at {BASE:,} px (default now: `{_codec_name(default)}`):",
            "",
            "| compressor | MB/s | store size (MB) | runs (s) |",
            "|---|---|---|---|",
        ]
        for codec, res in codecs:
            lines.append(
                f"| {codec} | {res['mb_s']:.0f} | {res['store_bytes'] / 1e6:.0f} | {res['all_seconds']} |"
            )
    lines += ["", "Targets:"]
    base_floor, base_tile = rows[0][1], rows[0][2]
    share = base_tile["mb_s"] / base_floor["mb_s"]
    lines.append(
        f"- throughput >= {TARGET_FLOOR_SHARE:.0%} of the floor: "
        f"{'met' if share >= TARGET_FLOOR_SHARE else 'MISSED'} ({share:.0%} at {BASE:,} px"
        + (f", {rows[1][2]['mb_s'] / rows[1][1]['mb_s']:.0%} at {2 * BASE:,} px)" if len(rows) > 1 else ")")
    )
    rss = max(r[2]["maxrss_mb"] for r in rows)
    lines.append(
        f"- peak RSS < {TARGET_RSS_MB} MB: {'met' if rss < TARGET_RSS_MB else 'MISSED'} (max {rss:.0f} MB)"
    )
    if len(rows) > 1:
        growth = rows[1][2]["maxrss_mb"] / base_tile["maxrss_mb"] - 1
        lines.append(
            f"- 4x scene peak RSS within {TARGET_RSS_GROWTH:.0%} of the 1x one: "
            f"{'met' if growth <= TARGET_RSS_GROWTH else 'MISSED'} ({growth:+.0%})"
        )
    else:
        lines.append("- 4x scene: not run (--quick)")
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES = """Notes:
- The floor reads every block once on one thread and writes the raw bytes once. `tile_scene` does more:
  nodata -> NaN, dB, the valid fraction, and it writes ~1.27x the scene's bytes (tiles overlap by 56 px,
  edge tiles are padded), on the 2 cores (threaded dask, 3 threads). Its reads of one file are
  serialised on one GDAL handle (which shares decoded blocks between overlapping windows); the rest runs
  in parallel. `backscatter` is stored uncompressed: the fastest in the comparison above.
- Peak RSS = ~0.25 GB of Python, GDAL, dask and zarr, GDAL's block cache (capped at 256 MB while a scene
  is read), and a few windows per thread; none of it depends on the scene size.
- Design history, measured with this script: one task per tile cut from shared block-aligned read chunks
  (rioxarray chunks -> tiles -> `da.store`) decoded each block once, but dask's ordering kept rows of
  chunks alive: peak RSS 0.68 GB at 10,000 px and 1.64 GB at 20,000 px. Independent tasks, one per group
  of ~4 tiles of a tile row, fixed that. One GDAL handle per thread (`lock=False`) then decoded shared
  blocks 2-3 times and was ~15-20% slower than one locked handle per file.
- The machine is shared with other jobs: runs of the same case vary by up to 2x (see "runs"); a busy
  machine costs the multi-threaded `tile_scene` more than the 1-thread floor, so the share of the floor
  is a lower bound when the load average is high. A run at load ~2 (same design, 2 threads, 2026-11-29
  08:08 UTC) measured 79% of the floor at 10,000 px and 82% at 20,000 px, peak RSS 554 MB for both;
  runs at load 4-7 measured 49-67%."""


def _codec_name(codec: object) -> str:
    if codec is None:
        return "none"
    return (
        type(codec).__name__
        + "("
        + ", ".join(f"{k}={v}" for k, v in codec.to_dict()["configuration"].items())
        + ")"
    )


def _ram_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        return float("nan")


def write_results(table: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    body = f"{SECTION}\n\n{table}\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _m: body + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + body
    RESULTS.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
