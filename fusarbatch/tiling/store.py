"""The Zarr v3 tile store (DESIGN 3.2): scenes -> ``<out>/tiles.zarr/<Scene.safe_id>/``.

One group per scene, named :attr:`Scene.safe_id`, holding (``n`` tiles, ``p`` polarisations, ``T`` tile
size):

============== ==================== ======= =========================================================
array          dims                 dtype   content
============== ==================== ======= =========================================================
backscatter    (tile, pol, y, x)    float16 backscatter in dB (``units`` attr; ``dn`` for uncalibrated
                                            scenes, then float32), NaN = nodata or padding; chunks
                                            ``(1, p, T, T)``, zstd level 1 (:data:`BACKSCATTER_DTYPE`);
                                            ``dtype`` attr; stores written as float32 read the same
transform      (tile, coef)         float64 tile affine ``(a, b, c, d, e, f)`` in the scene CRS:
                                            ``x = a*col + b*row + c``, ``y = d*col + e*row + f``
row_off        (tile,)              int64   first row of the tile in the scene grid
col_off        (tile,)              int64   first column of the tile in the scene grid
valid_fraction (tile,)              float32 share of the T x T pixels where every polarisation is finite
============== ==================== ======= =========================================================

Tiles are row-major (see :mod:`fusarbatch.tiling.grid`). Group attributes: ``crs`` (WKT2), ``item_id``,
``datetime`` (ISO 8601, UTC), ``pols``, ``quantity``, ``scale_in`` (declared or detected),
``scale_detected`` (``null``, or why an undeclared scale was taken), ``calibration`` (``null``, or how
digital numbers were calibrated), ``units``, ``tile_size``,
``overlap``, ``min_valid``, ``n_tiles``, ``n_inferable``, ``source_hrefs``, ``scene_shape`` ``[H, W]``,
``clip`` (``null`` for a whole scene; else ``aoi_digest``, ``aoi_bounds_px`` ``[c0, r0, c1, r1]`` of AOI
intersect scene in pixels, ``grid_tiles`` of the whole scene: :mod:`fusarbatch.tiling.clip`), ``dtype``,
``scene_transform`` (6 floats), ``warp`` (``null`` or how GCP-only / off-grid files were warped),
``tiling_id`` (new for every write), ``status`` and ``complete``; ``run`` adds ``outputs_made_from`` once a
scene's GeoParquet is written (:mod:`fusarbatch.outputs.provenance`).
``xarray.open_zarr(store, group=safe_id, consolidated=False)`` opens a group.

**Crash safety.** A scene is written to ``tiles.zarr/.<safe_id>.partial-<pid>``; ``complete`` is set to
true last; then the directory is renamed to ``<safe_id>``, replacing an older group (the older one is first
renamed aside, then deleted). Readers only trust groups with ``complete == true``. A scene that fails
leaves no partial group, and never replaces a complete group of an earlier attempt (a transient failure,
such as a full disk during a ``--force`` redo, keeps the last good tiles; the ledger records the failure).
Without a complete group, its group becomes a marker with no arrays and attributes ``{"complete": false,
"status": "failed", "error": ...}``. A failure for lack of space says ``disk full``
(:func:`~fusarbatch.errors.disk_full`), not that a source raster is bad.

**Bounds.** A raster whose header claims more than ``max_tiles`` tiles (e.g. a VRT of 1e9 x 1e9 pixels) is
refused from its header, before any task is built. On a ``dask.distributed`` cluster, tiling waits for
the cluster with a deadline: when no worker is alive for ``timeout_s`` (the only worker died),
:class:`~fusarbatch.errors.NoWorkerError` is raised instead of waiting for ever.
Leftovers of a killed run (``.<safe_id>.partial-<pid>`` / ``.<safe_id>.old-<pid>`` of a dead process) are
removed the next time that scene is tiled.

**Memory.** The work is one dask graph per scene with one independent task per group of neighbouring
tiles of a tile row (:func:`build_tiles`): read the group's window, convert to dB, cut the tiles; then
the Zarr write and the valid fractions, computed in the same pass. The tasks do not depend on each
other, so dask runs them in tile order and frees each group once written: peak memory is a few windows
per thread plus GDAL's block cache (capped at :data:`GDAL_CACHE_BYTES` while a scene is read), whatever
the scene size. (A graph of shared block-aligned read chunks, one task per tile, decoded each block once
but dask ordered it so that chunk rows piled up: peak memory grew with the scene, 0.68 -> 1.64 GB from a
10k to a 20k px scene.) The threaded scheduler (:data:`THREADS`) is used unless a ``dask.distributed``
client is active.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import rasterio
import zarr
from dask.highlevelgraph import HighLevelGraph
from dask.task_spec import DataNode, Task, TaskRef
from pyproj import CRS as ProjCRS
from shapely.geometry.base import BaseGeometry

from fusarbatch import __version__
from fusarbatch.catalog.scene import Scene
from fusarbatch.errors import FusarbatchError, NoWorkerError, SceneError, disk_full
from fusarbatch.tiling.clip import aoi_digest, aoi_pixels, select_tiles
from fusarbatch.tiling.grid import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE_SIZE,
    TileGrid,
    tile_count,
    tile_grid,
    tile_transforms,
    validate_tiling,
)
from fusarbatch.tiling.scaling import check_scale, output_units, prepare_radiometry, to_db
from fusarbatch.tiling.source import SourceRaster, WindowReader, open_scene

log = logging.getLogger(__name__)

#: Default ``min_valid``: tiles with a smaller valid fraction are stored but not inferred.
DEFAULT_MIN_VALID = 0.05
#: Stored dtype of ``backscatter`` in dB: float16 (10-bit mantissa: steps of 1/64 dB between 16 and 32 dB
#: in magnitude, 1/128 dB below 16; the 8-bit render the model sees has steps of 30/255 = 0.12 dB).
#: Uncalibrated digital numbers (``units = dn``) stay float32 (float16 ends at 65504). Readers take both.
BACKSCATTER_DTYPE: Any = np.float16
#: Compression of ``backscatter`` chunks, chosen by measurement (benchmarks/RESULTS.md, "Tile store
#: (issue 11)"): zstd level 1.
BACKSCATTER_COMPRESSORS: Any = (zarr.codecs.ZstdCodec(level=1),)
#: Threads of the threaded scheduler; ``None`` = one per CPU plus one: reads of a file are serialised on
#: its handle, and the extra thread keeps the CPUs busy while one waits (on 2 cores, 3 threads were 5-10%
#: faster than 2, and 4 no faster than 3). ``dask.config.set(num_workers=n)`` wins.
THREADS: int | None = None
#: GDAL block cache while a scene is read, in bytes (GDAL reads values >= 100000 as bytes).
GDAL_CACHE_BYTES = 256 * 2**20
#: GDAL threads decoding the compressed blocks of one window read (GDAL >= 3.6 GTiff multi-threaded
#: decoding). Reads of a file are serialised on its one handle (tiling/source.py), so its decoding is the
#: critical path: ``ALL_CPUS`` made tiling 5-10% faster on 2 cores (benchmarks/RESULTS.md, issue 11).
#: ``GDAL_NUM_THREADS`` in the environment wins.
GDAL_DECODE_THREADS = "ALL_CPUS"
#: Default ``max_tiles``: the most tiles one scene may have (a Sentinel-1 IW GRD scene has about 2,000 at
#: the default tile size; 100,000 tiles are 25 billion pixels).
DEFAULT_MAX_TILES = 100_000
#: Seconds between two looks at a cluster's workers while tiling waits for it.
_WORKER_POLL_S = 1.0


@dataclass(frozen=True)
class TileResult:
    """What tiling one scene did (printed by :func:`fusarbatch.report.print_tiling`)."""

    scene_id: str
    """The scene's STAC item id."""
    status: Literal["ok", "failed"]
    n_tiles: int
    """Tiles stored (0 when failed)."""
    n_inferable: int
    """Tiles with ``valid_fraction >= min_valid`` (those the model will see)."""
    error: str | None
    """One-line reason when failed, else ``None``."""
    group: str
    """Path of the scene's group inside the store (= :attr:`Scene.safe_id`), for
    ``xarray.open_zarr(store, group=group)``."""
    seconds: float
    """Wall time spent on the scene."""


def tile_scenes(scenes: Iterable[Scene], store: Path | str, **kwargs: Any) -> list[TileResult]:
    """Tile scenes one after the other into ``store`` (``<out>/tiles.zarr``); see :func:`tile_scene`.

    A scene that fails is recorded as failed and the others go on. Two different item ids that map to the
    same group name (:attr:`Scene.safe_id`) would overwrite each other: the second one fails instead.

    :param kwargs: ``tile_size``, ``overlap``, ``min_valid``, ``aoi``, ``max_tiles``, ``timeout_s``, passed
        to :func:`tile_scene`.
    :returns: one :class:`TileResult` per scene, in input order.
    :raises ValueError: invalid ``tile_size`` / ``overlap`` / ``min_valid`` (before any scene is read).
    """
    _check_params(
        kwargs.get("tile_size", DEFAULT_TILE_SIZE),
        kwargs.get("overlap", DEFAULT_OVERLAP),
        kwargs.get("min_valid", DEFAULT_MIN_VALID),
    )
    results: list[TileResult] = []
    owners: dict[str, str] = {}
    for scene in scenes:
        owner = owners.setdefault(scene.safe_id, scene.item_id)
        if owner != scene.item_id:
            results.append(
                TileResult(
                    scene_id=scene.item_id,
                    status="failed",
                    n_tiles=0,
                    n_inferable=0,
                    error=f"group name {scene.safe_id!r} is already used by scene {owner!r} in this run",
                    group=scene.safe_id,
                    seconds=0.0,
                )
            )
            continue
        results.append(tile_scene(scene, store, **kwargs))
    return results


def tile_scene(
    scene: Scene,
    store: Path | str,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    overlap: int = DEFAULT_OVERLAP,
    min_valid: float = DEFAULT_MIN_VALID,
    aoi: BaseGeometry | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    timeout_s: float | None = None,
) -> TileResult:
    """Tile one scene into the group ``<store>/<scene.safe_id>`` (layout: module docstring).

    :param store: the ``tiles.zarr`` directory (created as a Zarr v3 group if missing).
    :param tile_size: tile edge ``T`` in pixels.
    :param overlap: minimum overlap between neighbouring tiles in pixels.
    :param min_valid: tiles with ``valid_fraction >= min_valid`` count as inferable.
    :param aoi: AOI in EPSG:4326: only the tiles of the scene grid it needs are stored
        (:mod:`fusarbatch.tiling.clip`; possibly none); ``None``: the whole scene.
    :param max_tiles: a scene whose header gives more tiles fails before any task is built.
    :param timeout_s: on a ``dask.distributed`` client, seconds without any live worker after which the
        tiling gives up (``None``: wait as long as it takes).
    :returns: a :class:`TileResult`; ``status="failed"`` with a one-line ``error`` when the scene cannot
        be read or written (nothing is raised for per-scene problems).
    :raises ValueError: invalid ``tile_size`` / ``overlap`` / ``min_valid``.
    :raises NoWorkerError: the cluster had no live worker for ``timeout_s`` (not the scene's fault: no
        failure marker is written).
    """
    _check_params(tile_size, overlap, min_valid)
    started = time.perf_counter()
    store = Path(store)
    name = scene.safe_id
    partial = f".{name}.partial-{os.getpid()}"
    try:
        root = _open_root(store)
        _remove_stale(store, name)
        with _gdal_env():  # from the open: GDAL's GTiff driver takes its decoding threads when it opens
            n_tiles, n_inferable = _write_scene(
                root, partial, scene, tile_size, overlap, min_valid, aoi, max_tiles, timeout_s
            )
        _publish(store, partial, name)
    except NoWorkerError:
        shutil.rmtree(store / partial, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(store / partial, ignore_errors=True)
        error = _error_line(exc, scene)
        if not isinstance(exc, FusarbatchError):
            log.debug("scene %s failed", scene.item_id, exc_info=True)
        if not group_complete(store / name):  # the last good tiles stay (a full disk is transient)
            with contextlib.suppress(Exception):
                _write_failure(store, scene, error)
        return TileResult(
            scene_id=scene.item_id,
            status="failed",
            n_tiles=0,
            n_inferable=0,
            error=error,
            group=name,
            seconds=time.perf_counter() - started,
        )
    return TileResult(
        scene_id=scene.item_id,
        status="ok",
        n_tiles=n_tiles,
        n_inferable=n_inferable,
        error=None,
        group=name,
        seconds=time.perf_counter() - started,
    )


def build_tiles(
    source: SourceRaster,
    grid: TileGrid,
    scale: str,
    select: np.ndarray | None = None,
    dtype: Any = np.float32,
) -> da.Array:
    """The tiles of a scene as a lazy ``(tile, pol, T, T)`` dask array of backscatter in dB (``dtype``,
    float32 by default; cast while the tiles are cut, no extra pass).

    Tiles are processed in groups of neighbours of one tile row: each group is one task that reads the
    window covering its tiles (``T`` rows, about ``source.chunks[1]`` columns) in one call per file,
    converts it to dB and cuts the tiles out (NaN past the scene edge). Tasks do not depend on each other,
    so dask runs them in tile order and each group's memory is freed once stored: the peak memory is a
    few windows per thread, whatever the scene size. Overlapping rows and columns are read again by the
    next group; GDAL's block cache (see :func:`tile_scene`) serves them without decoding twice.

    :param source: the opened scene (:func:`~fusarbatch.tiling.source.open_scene`).
    :param grid: tile grid of ``source`` (``grid.height, grid.width == source.height, source.width``).
    :param scale: scale of the stored values (``db``, ``power``, ``amplitude``, ``dn``).
    :param select: row-major indices of the grid's tiles to build, ascending (an AOI clip,
        :func:`fusarbatch.tiling.clip.select_tiles`); ``None``: every tile. Only their windows are read.
    :param dtype: dtype of the tiles (float32 or float16; the dB values are computed in float32).
    :returns: ``(len(select) or grid.n_tiles, pol, T, T)``, row-major tile order, one chunk per group
        along ``tile``.
    """
    if (source.height, source.width) != (grid.height, grid.width):
        raise ValueError(f"source shape {(source.height, source.width)} does not match the grid")
    scale = check_scale(scale)
    size = grid.tile_size
    npol = len(source.pols)
    stride = size - grid.overlap
    per_group = max(1, round((source.chunks[1] - grid.overlap) / stride))
    name = f"fusarbatch-tiles-{uuid.uuid4().hex}"
    reader_key = f"fusarbatch-reader-{uuid.uuid4().hex}"
    dsk: dict[Any, Any] = {reader_key: DataNode(reader_key, source.reader)}
    sizes = []
    ncols = len(grid.cols)
    chosen = np.arange(grid.n_tiles) if select is None else np.asarray(select, dtype=np.int64)
    for i, row in enumerate(grid.rows):
        js = chosen[(chosen >= i * ncols) & (chosen < (i + 1) * ncols)] - i * ncols
        # runs of neighbouring columns (a clipped row may have gaps), each cut into groups
        for run in np.split(js, np.flatnonzero(np.diff(js) > 1) + 1) if len(js) else []:
            for part in np.array_split(run, math.ceil(len(run) / per_group)):
                cols = tuple(int(grid.cols[j]) for j in part)
                key = (name, len(sizes), 0, 0, 0)
                dsk[key] = Task(key, _read_group, TaskRef(reader_key), row, cols, size, scale, dtype)
                sizes.append(len(cols))
    if not sizes:  # an AOI that needs no tile of this scene
        return da.zeros((0, npol, size, size), dtype=dtype, chunks=(1, npol, size, size))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks=(tuple(sizes), (npol,), (size,), (size,)), dtype=dtype)


def valid_fractions(tiles: da.Array) -> da.Array:
    """``(tile,)`` float32: per tile, the share of its ``y x x`` pixels where every pol is finite.

    :param tiles: ``(tile, pol, y, x)`` dask array, any chunks along ``tile``, one chunk along the others.
    """
    if any(len(c) != 1 for c in tiles.chunks[1:]):
        raise ValueError("valid_fractions needs one chunk along pol, y and x")
    # One task per block (map_blocks with drop_axis would first concatenate, i.e. copy, every block).
    name = f"fusarbatch-valid-fraction-{uuid.uuid4().hex}"
    dsk = {}
    for i in range(len(tiles.chunks[0])):
        dsk[(name, i)] = Task((name, i), _valid_fraction_block, TaskRef((tiles.name, i, 0, 0, 0)))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[tiles])
    return da.Array(graph, name, chunks=(tiles.chunks[0],), dtype=np.float32)


def _read_group(
    reader: WindowReader, row: int, cols: tuple[int, ...], size: int, scale: str, dtype: Any = np.float32
) -> np.ndarray:
    """Tiles at ``(row, c) for c in cols`` as ``(len(cols), pol, size, size)`` dB (``dtype``), NaN-padded."""
    height, width = reader.shape[1:]
    row1 = min(row + size, height)
    col0, col1 = cols[0], min(cols[-1] + size, width)
    window = to_db(reader.read(row, row1, col0, col1), scale, overwrite=True)
    h = row1 - row
    out = np.empty((len(cols), window.shape[0], size, size), dtype=dtype)
    for t, col in enumerate(cols):
        w = min(size, width - col)
        out[t, :, :h, :w] = window[:, :, col - col0 : col - col0 + w]
        out[t, :, h:, :] = np.nan  # padding past the scene edge (no-op inside the scene)
        out[t, :, :h, w:] = np.nan
    return out


def _valid_fraction_block(block: np.ndarray) -> np.ndarray:
    if block.dtype == np.float16:
        # finite <=> exponent bits not all ones (IEEE 754 binary16): 2.5x faster than np.isfinite on float16
        exponent = block.view(np.uint16) & np.uint16(0x7C00)
        valid = (exponent != 0x7C00).all(axis=1)
    else:
        valid = np.isfinite(block).all(axis=1)
    pixels = valid.shape[1] * valid.shape[2]
    return (np.count_nonzero(valid.reshape(valid.shape[0], -1), axis=1) / pixels).astype(np.float32)


def _check_params(tile_size: int, overlap: int, min_valid: float) -> None:
    validate_tiling(tile_size, overlap)
    if not 0.0 <= float(min_valid) <= 1.0:
        raise ValueError(f"min_valid must be within [0, 1], got {min_valid!r}")


def _scheduler() -> dict[str, Any]:
    """``dask.compute`` arguments: the active ``dask.distributed`` client, else the threaded scheduler
    with :data:`THREADS` workers (``dask.config`` ``num_workers`` wins when set)."""
    try:
        from distributed import default_client

        return {"scheduler": default_client()}
    except (ImportError, ValueError):
        pass
    workers = dask.config.get("num_workers", None) or THREADS or (os.cpu_count() or 1) + 1
    return {"scheduler": "threads", "num_workers": int(workers)}


def _compute(stored: Any, fractions: da.Array, timeout_s: float | None) -> tuple[Any, Any]:
    """``dask.compute(stored, fractions)`` on :func:`_scheduler`. On a distributed client with
    ``timeout_s``, through futures, looking at the cluster every second: when it has had no worker for
    ``timeout_s`` s, the futures are cancelled and :class:`NoWorkerError` is raised."""
    scheduler = _scheduler()
    client = scheduler["scheduler"]
    if isinstance(client, str):
        # an own pool, shut down before returning or raising: when one task fails, the others still
        # running finish before the caller deletes the partial group (no write lands after that)
        with ThreadPoolExecutor(scheduler["num_workers"], thread_name_prefix="fusarbatch-tile") as pool:
            return dask.compute(stored, fractions, scheduler="threads", pool=pool)
    if timeout_s is None:
        return dask.compute(stored, fractions, **scheduler)
    from distributed import wait

    futures = client.compute([stored, fractions])
    alone_since: float | None = None
    try:
        while True:
            try:
                wait(futures, timeout=min(_WORKER_POLL_S, timeout_s))
                break
            except TimeoutError:
                pass
            if client.nthreads():
                alone_since = None
                continue
            now = time.monotonic()
            alone_since = alone_since or now
            if now - alone_since >= timeout_s:
                raise NoWorkerError(
                    f"the Dask cluster has had no live worker for {timeout_s:g} s (--task-timeout) while "
                    f"tiling; restart its workers (the remaining scenes are not tried)"
                )
        return tuple(client.gather(futures))  # type: ignore[return-value]
    except BaseException:
        client.cancel(futures)
        raise


def group_complete(path: Path) -> bool:
    """Whether ``path`` is a scene group whose ``zarr.json`` says ``complete: true`` (read capped; any
    unreadable or missing file: ``False``)."""
    import json

    from fusarbatch.files import MAX_JSON_BYTES, read_capped

    try:
        meta = json.loads(read_capped(path / "zarr.json", "zarr.json", FusarbatchError, MAX_JSON_BYTES))
        return meta.get("attributes", {}).get("complete") is True
    except (OSError, ValueError, AttributeError, FusarbatchError):
        return False


def _gdal_env() -> rasterio.Env:
    """GDAL settings for the read: multi-threaded block decoding (:data:`GDAL_DECODE_THREADS`) and a bounded
    block cache (:data:`GDAL_CACHE_BYTES`), each unless the user set it in the environment. The cache must
    hold the blocks that overlapping windows share (about one block row across the scene: 80 MB for a
    20,000 px wide dual-pol float32 scene); GDAL's
    default (5% of RAM, 1.2 GB here) only adds to the peak memory. GDAL's cache is process-wide: the
    setting applies while a scene is computed and is restored afterwards. Distributed workers keep their
    own settings."""
    options: dict[str, Any] = {}
    if "GDAL_CACHEMAX" not in os.environ:
        options["GDAL_CACHEMAX"] = GDAL_CACHE_BYTES
    if "GDAL_NUM_THREADS" not in os.environ:
        options["GDAL_NUM_THREADS"] = GDAL_DECODE_THREADS
    return rasterio.Env(**options)


def _open_root(store: Path) -> zarr.Group:
    try:
        return zarr.open_group(str(store), mode="a", zarr_format=3)
    except Exception as exc:
        raise FusarbatchError(
            f"{store}: cannot open or create the tile store ({' '.join(str(exc).split())})"
        ) from None


def _scene_attrs(scene: Scene) -> dict[str, Any]:
    when = scene.datetime.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return {
        "item_id": scene.item_id,
        "datetime": when,
        "pols": list(scene.pols),
        "quantity": scene.quantity,
        "scale_in": scene.scale,
        "fusarbatch_version": __version__,
    }


def _write_scene(
    root: zarr.Group,
    partial: str,
    scene: Scene,
    tile_size: int,
    overlap: int,
    min_valid: float,
    aoi: BaseGeometry | None = None,
    max_tiles: int = DEFAULT_MAX_TILES,
    timeout_s: float | None = None,
) -> tuple[int, int]:
    radiometry = prepare_radiometry(scene, open_scene(scene, tile_size=tile_size))
    source, scale = radiometry.source, radiometry.scale
    count = tile_count(source.height, source.width, tile_size, overlap)
    if count > max_tiles:
        raise SceneError(
            f"{source.hrefs[0]}: its header claims {source.height} x {source.width} pixels, {count} tiles "
            f"of {tile_size} px, more than --max-tiles {max_tiles}; check the raster (a broken header?) or "
            f"raise --max-tiles"
        )
    grid = tile_grid(source.height, source.width, tile_size, overlap)
    select, clip_attrs = None, None
    if aoi is not None:
        region = aoi_pixels(aoi, source.crs.to_wkt(), source.transform, source.height, source.width)
        select = select_tiles(grid, region)
        c0, r0, c1, r1 = region.bounds if not region.is_empty else (0, 0, 0, 0)
        clip_attrs = {
            "aoi_digest": aoi_digest(aoi),
            "aoi_bounds_px": [c0, r0, c1, r1],
            "grid_tiles": grid.n_tiles,
        }
    dtype = np.dtype(np.float32 if scale == "dn" else BACKSCATTER_DTYPE)  # DN past 65504: float32
    tiles = build_tiles(source, grid, scale, select, dtype)
    fractions = valid_fractions(tiles)
    npol = len(source.pols)
    n = int(tiles.shape[0])
    row_offsets = grid.row_offsets if select is None else grid.row_offsets[select]
    col_offsets = grid.col_offsets if select is None else grid.col_offsets[select]
    attrs = {
        **_scene_attrs(scene),
        "pols": list(source.pols),
        "quantity": radiometry.quantity,
        "scale_in": radiometry.scale_in,
        **radiometry.attrs,
        "units": output_units(scale),
        "crs": ProjCRS.from_user_input(source.crs.to_wkt()).to_wkt(),
        "tile_size": tile_size,
        "overlap": overlap,
        "min_valid": float(min_valid),
        "n_tiles": n,
        "clip": clip_attrs,
        "dtype": dtype.name,
        "source_hrefs": list(source.hrefs),
        "scene_shape": [source.height, source.width],
        "scene_transform": list(tuple(source.transform)[:6]),
        "transform_order": "a,b,c,d,e,f (affine/rasterio): x = a*col + b*row + c, y = d*col + e*row + f",
        "warp": source.warp,
        "tiling_id": uuid.uuid4().hex,  # this write: outputs made from it record it (outputs.provenance)
        "status": "running",
        "complete": False,
    }
    group = root.create_group(partial, attributes=attrs, overwrite=True)
    backscatter = group.create_array(
        "backscatter",
        shape=(n, npol, tile_size, tile_size),
        chunks=(1, npol, tile_size, tile_size),
        dtype=dtype,
        fill_value=dtype.type(np.nan),
        compressors=BACKSCATTER_COMPRESSORS,
        # zarr's default compares every chunk with the NaN fill value to skip writing empty ones: ~1 ms a
        # chunk, 10% of the tiling CPU (benchmarks/aoi.py); an all-NaN tile is rare and compresses to ~1 kB
        config={"write_empty_chunks": True},
        dimension_names=["tile", "pol", "y", "x"],
        attributes={
            "units": attrs["units"],
            "long_name": f"{radiometry.quantity} backscatter" + ("" if attrs["units"] == "dn" else " (dB)"),
            "pols": list(source.pols),
            "dtype": dtype.name,
        },
    )
    transforms = tile_transforms(source.transform, row_offsets, col_offsets)
    small = {
        "transform": (transforms, ["tile", "coef"], {"order": attrs["transform_order"]}),
        "row_off": (row_offsets, ["tile"], {"units": "pixel"}),
        "col_off": (col_offsets, ["tile"], {"units": "pixel"}),
    }
    for array_name, (values, dims, array_attrs) in small.items():
        group.create_array(
            array_name,
            data=np.ascontiguousarray(values),
            chunks=tuple(max(1, v) for v in values.shape),
            dimension_names=dims,
            attributes=array_attrs,
            compressors=None,
        )
    vf = np.zeros(0, dtype=np.float32)
    if n:
        stored = da.store(tiles, backscatter, lock=False, compute=False)
        _, vf = _compute(stored, fractions, timeout_s)
    vf = np.asarray(vf, dtype=np.float32)
    group.create_array(
        "valid_fraction",
        data=vf,
        chunks=(max(1, len(vf)),),
        dimension_names=["tile"],
        attributes={"units": "1", "min_valid": float(min_valid)},
        compressors=None,
    )
    n_inferable = int(np.count_nonzero(vf >= min_valid))
    group.attrs.update({"n_inferable": n_inferable, "status": "ok"})
    group.attrs.update({"complete": True})  # last: the group is finished
    return n, n_inferable


def _publish(store: Path, partial: str, name: str) -> None:
    """Rename ``partial`` to ``name``, replacing an older ``name`` (moved aside to ``.<name>.old-<pid>``,
    then deleted)."""
    final = store / name
    old = store / f".{name}.old-{os.getpid()}"
    for _ in range(5):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(final, old)
        try:
            os.replace(store / partial, final)
            break
        except OSError:  # another process published meanwhile: move it aside and retry
            continue
    else:
        raise FusarbatchError(f"{final}: could not replace the scene group (is another run writing it?)")
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(store: Path, name: str) -> None:
    """Delete ``.<name>.partial-<pid>`` / ``.<name>.old-<pid>`` left by processes that are gone (or by
    this one)."""
    for kind in ("partial", "old"):
        prefix = f".{name}.{kind}-"
        for path in store.glob(f"{_glob_escape(prefix)}*"):
            pid = path.name[len(prefix) :]
            if pid.isdigit() and left_by_gone_process(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _glob_escape(text: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in text)


def left_by_gone_process(pid: int) -> bool:
    """Whether a leftover named after process ``pid`` (``.<name>.partial-<pid>``, ``.<file>.tmp-<pid>``)
    can be removed: that process no longer exists, or it is this one (an earlier attempt or run in this
    process, which has finished with it)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def _error_line(exc: BaseException, scene: Scene) -> str:
    """One line: the message and the new detail of its causes (GDAL's detail is often a cause), then the
    file(s) concerned when the message does not give their full href."""
    if isinstance(exc, FusarbatchError):
        return " ".join(str(exc).split()) or type(exc).__name__
    full = disk_full(exc, "the tile store")
    if full is not None:  # writing the tiles failed: no source raster is to blame
        return full
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = " ".join(str(current).split())
        if message and not any(message in part for part in parts):
            # keep the outermost message; drop inner ones this more detailed message repeats
            parts = [part for i, part in enumerate(parts) if i == 0 or part not in message]
            parts.append(message)
        current = current.__cause__ or current.__context__
    text = f"{type(exc).__name__}: " + (" <- ".join(parts) or "no message")
    hrefs = list(dict.fromkeys(ref.href for ref in scene.bands.values()))
    if not any(h in text for h in hrefs):
        named = [h for h in hrefs if os.path.basename(h) and os.path.basename(h) in text]
        text = f"{text} (reading {', '.join(named or hrefs)})"
    return text


def _write_failure(store: Path, scene: Scene, error: str) -> None:
    """Replace the scene's group with a marker: no arrays, ``complete: false``, ``status: failed``."""
    root = _open_root(store)
    marker = f".{scene.safe_id}.partial-{os.getpid()}"
    root.create_group(
        marker,
        attributes={**_scene_attrs(scene), "status": "failed", "error": error, "complete": False},
        overwrite=True,
    )
    _publish(store, marker, scene.safe_id)


def scene_groups(store: Path | str) -> Sequence[str]:
    """Names of the scene groups in a tile store (finished or failed; partial ones excluded), sorted."""
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(
        p.name
        for p in store.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "zarr.json").exists()
    )
