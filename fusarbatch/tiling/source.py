"""Open a :class:`~fusarbatch.catalog.scene.Scene` lazily on one grid and read windows of it.

:func:`open_scene` reads only the headers; it returns a :class:`SourceRaster` whose
:class:`WindowReader` reads ``(pol, h, w)`` float32 windows on demand (and whose ``data`` is the same as a
dask array). Reading goes through ``rioxarray.open_rasterio`` (lazy, ``cache=False``):

- **Handles.** A file read as stored has one GDAL handle per process, guarded by its own lock: GDAL's block
  cache belongs to a handle, and the tiler's windows overlap (tiles overlap, and windows are not
  block-aligned), so a shared handle decodes every compressed block once, where per-thread handles
  (``lock=False``) decoded blocks up to 2-3 times and were slower overall (benchmarks/tiling.py). A warped
  file (below) uses one handle per thread (``lock=False``): warping is CPU-bound and runs in parallel.
- **Grid.** The scene grid is that of its first polarisation's file, always north-up: a file stored
  bottom-up (positive y pixel size, row 0 at the south edge, as some mirrors and GDAL-written products
  have) or right-to-left (negative x pixel size) gets the same grid with row 0 at the north (west) edge,
  ``transform @ translation(0, H) @ scale(1, -1)``, and is read with its rows (columns) reversed: the
  values are the stored pixels, unresampled. (Rotated or sheared geotransforms are kept as they are.) A
  file without a CRS/geotransform but
  with GCPs (Sentinel-1 GRD as distributed by ESA and most archives) is warped, lazily, to the UTM zone of
  the scene centre (WGS 84, EPSG 326xx north / 327xx south, zone from the centre of the GCPs' lon/lat
  bounding box; the Norway/Svalbard zone exceptions are not applied) on the grid GDAL suggests
  (``GDALAutoCreateWarpedVRT``, what ``gdalwarp -t_srs`` picks). Polarisations in separate files on
  another grid are warped onto the scene grid; separate GCP-only files must share their GCPs (rasterio
  1.4 cannot warp GCPs onto an explicit grid), else the scene fails with that reason. Warps use
  ``rasterio.vrt.WarpedVRT``: bilinear, nodata-aware, float32, GDAL's default transformer tolerance
  (:data:`WARP_TOLERANCE`; values do not depend on the window read). Bilinear interpolation runs on the
  stored values (dB for dB products), as ``gdalwarp`` would.
- **Nodata.** The raster's own nodata, the catalog's :attr:`BandRef.nodata` (also applied after a warp),
  and an internal mask band (per-dataset mask or alpha) all become NaN. Values are otherwise returned as
  stored, as float32: the conversion to dB is :mod:`fusarbatch.tiling.scaling`'s job.
- **Chunks** of ``data``: ``(pol, rows, cols)``, ``rows`` a multiple of the file's block height ``>=
  tile_size``, ``cols`` a multiple of the block width ``>= max(tile_size, 2048)`` (any width ``>=`` that
  for striped files). The tiler reads windows of one tile row and about ``cols`` columns
  (:func:`fusarbatch.tiling.store.build_tiles`), so no read grows with the scene.

Errors a user can cause (missing file, unreadable or corrupt raster, band index out of range, not
georeferenced) raise :class:`~fusarbatch.errors.SceneError` with one line naming the href.
"""

from __future__ import annotations

import math
import os
import uuid
import warnings
from dataclasses import dataclass, replace
from typing import Any

import dask.array as da
import numpy as np
import rasterio
import rioxarray
from affine import Affine
from dask.utils import SerializableLock
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_points

from fusarbatch.catalog.scene import BandRef, Scene
from fusarbatch.errors import SceneError
from fusarbatch.files import check_regular
from fusarbatch.tiling.calibration import LATTICE_STEP, LUT_NAMES, lattice

#: Resampling of every warp (GCP -> UTM, and aligning a polarisation onto the scene grid).
WARP_RESAMPLING = Resampling.bilinear
#: Transformer error tolerance of every warp, in source pixels: GDAL's default (1/8 px). A warped VRT
#: warps its own fixed blocks, so values do not depend on the window read: on a 5000 x 5000 GCP raster the
#: tiles equalled a whole-raster read on all 30 million pixels. The exact transformer (0) took 2x longer
#: there, and rasterio 1.4.4 cannot build a WarpedVRT onto an explicit grid with tolerance 0 at all.
WARP_TOLERANCE = 0.125
#: Preferred minimum chunk width in pixels (rounded up to whole blocks).
CHUNK_COLS = 2048


class _Locate:
    """Scene-grid map coordinates -> fractional (row, col) of a warped file (corner-based, as GDAL's):
    through its GCPs (GDAL's GCP transformer, as the warp) or its own geotransform. Picklable."""

    def __init__(
        self, grid_crs: CRS, src_crs: CRS, *, gcps: tuple[Any, ...] = (), transform: Affine | None = None
    ) -> None:
        self.grid_crs, self.src_crs, self.gcps, self.transform = grid_crs, src_crs, gcps, transform

    def __call__(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.src_crs != self.grid_crs:
            xs, ys = (np.asarray(v) for v in warp_points(self.grid_crs, self.src_crs, xs, ys))
        if self.gcps:
            from rasterio.transform import GCPTransformer

            rows, cols = GCPTransformer(list(self.gcps)).rowcol(xs, ys, op=lambda v: v)
            return np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
        inv = ~self.transform
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        return inv.d * xs + inv.e * ys + inv.f, inv.a * xs + inv.b * ys + inv.c


@dataclass(frozen=True)
class _Run:
    """Consecutive polarisations read from one file."""

    array: Any
    """Lazy ``xarray.DataArray (k, H, W)``: the file as stored, or warped onto the scene grid."""
    nodata: tuple[tuple[float, ...], ...]
    """Nodata values per band."""
    pols: tuple[str, ...]
    flips: tuple[bool, bool] = (False, False)
    """Reverse rows / columns to put a file read as stored on the north-up scene grid."""
    file_shape: tuple[int, int] = (0, 0)
    """(rows, cols) of the file itself."""
    locate: _Locate | None = None
    """For a warped file: where scene pixels come from in it (for calibration); None when read as stored."""
    luts: tuple[Any, ...] = ()
    """Per band, a :class:`~fusarbatch.tiling.calibration.CalibrationLUT` (or None); empty: values as
    stored."""

    def calibrate(
        self,
        block: np.ndarray,
        grid_transform: Affine,
        shape: tuple[int, int],
        window: tuple[int, int, int, int],
    ) -> None:
        """Calibrate ``block`` (this run's bands of the scene ``window``) in place with :attr:`luts`."""
        row0, row1, col0, col1 = window
        if self.locate is not None:
            nodes = lattice(self.locate, grid_transform, row0, row1, col0, col1)
            for i, lut in enumerate(self.luts):
                if lut is not None:
                    block[i] = lut.calibrate_warped(block[i], nodes)
            return
        lines, pixels = np.arange(row0, row1), np.arange(col0, col1)
        if self.flips[0]:
            lines = shape[0] - 1 - lines
        if self.flips[1]:
            pixels = shape[1] - 1 - pixels
        for i, lut in enumerate(self.luts):
            if lut is not None:
                block[i] = lut.calibrate(block[i], lines, pixels)


class WindowReader:
    """Reads windows of a scene on its grid: ``read(row0, row1, col0, col1)`` -> ``(pol, h, w)`` float32,
    NaN where nodata. Thread-safe (a locked shared handle per file, or one handle per thread for warped
    files) and picklable (for distributed workers). Also array-like (``shape``, ``dtype``, ``ndim``,
    ``__getitem__`` with a tuple of three slices) so that ``dask.array.from_array`` can wrap it."""

    def __init__(self, runs: list[_Run], shape: tuple[int, int, int], transform: Affine | None = None):
        self._runs = runs
        self.shape = shape
        # the scene grid's affine: where warped calibrated files find each pixel's (line, pixel)
        self.transform = transform or Affine.identity()
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def read(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        """Pixels ``[row0:row1, col0:col1]`` of every polarisation: ``(pol, row1 - row0, col1 - col0)``
        float32 as stored (not yet in dB; calibrated to linear intensity where a LUT is attached, see
        :meth:`SourceRaster.calibrated`), NaN = nodata. A fresh array the caller owns. Rows of a file
        stored bottom-up are read from its other end and reversed (columns likewise)."""
        height, width = self.shape[1:]
        pieces = []
        for run in self._runs:
            flip_rows, flip_cols = run.flips
            r0, r1 = (height - row1, height - row0) if flip_rows else (row0, row1)
            c0, c1 = (width - col1, width - col0) if flip_cols else (col0, col1)
            block = np.asarray(run.array[:, r0:r1, c0:c1].values)
            if flip_rows or flip_cols:
                block = np.ascontiguousarray(block[:, :: -1 if flip_rows else 1, :: -1 if flip_cols else 1])
            block = _mask_nodata(block, run.nodata)
            if any(lut is not None for lut in run.luts) and block.size:
                run.calibrate(block, self.transform, (height, width), (row0, row1, col0, col1))
            pieces.append(block)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)

    def with_luts(self, luts: dict[str, Any]) -> WindowReader:
        """A reader that calibrates the polarisations ``luts`` names (pol -> CalibrationLUT)."""
        runs = [replace(run, luts=tuple(luts.get(pol) for pol in run.pols)) for run in self._runs]
        return WindowReader(runs, self.shape, self.transform)

    def file_shapes(self) -> dict[str, tuple[int, int]]:
        """Polarisation -> (rows, cols) of the file it is read from."""
        return {pol: run.file_shape for run in self._runs for pol in run.pols}

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, slice) for k in key)):
            raise TypeError(f"WindowReader takes a tuple of three slices, got {key!r}")
        bands, rows, cols = key
        r0, r1, _ = rows.indices(self.shape[1])
        c0, c1, _ = cols.indices(self.shape[2])
        return self.read(r0, r1, c0, c1)[bands]


@dataclass(frozen=True)
class SourceRaster:
    """A scene opened lazily on one grid: nothing is read until :meth:`WindowReader.read` or ``data``."""

    reader: WindowReader
    """Reads ``(pol, h, w)`` float32 windows (values as stored, NaN = nodata)."""
    pols: tuple[str, ...]
    """Polarisation of each index along ``pol``."""
    crs: CRS
    """CRS of the grid (the file's, or the UTM zone a GCP-only file was warped to)."""
    transform: Affine
    """Affine of the grid: pixel (col, row) upper-left corner -> map (x, y) in :attr:`crs`."""
    hrefs: tuple[str, ...]
    """Distinct asset hrefs read, in polarisation order."""
    warp: dict[str, Any] | None
    """``None`` when every file is read as stored; else how files were warped (for the store's attrs)."""
    chunks: tuple[int, int]
    """Preferred (rows, cols) of a read: whole blocks of the first file, at least one tile (see module)."""
    dtypes: tuple[str, ...] = ()
    """Data type of each polarisation's file as stored (e.g. ``uint16`` for GRD digital numbers)."""
    calibration: dict[str, Any] | None = None
    """``None``: values as stored; else what :meth:`calibrated` applied (for the store's attrs)."""

    def calibrated(self, luts: dict[str, Any]) -> SourceRaster:
        """The same scene read as linear intensity: each polarisation's DN calibrated with its LUT
        (:class:`~fusarbatch.tiling.calibration.CalibrationLUT`, see that module)."""
        first = next(iter(luts.values()))
        record = {
            "quantity": first.quantity,
            "formula": f"{first.quantity} = DN^2 / A^2, A = {LUT_NAMES[first.quantity]} LUT interpolated "
            "bilinearly over (line, pixel) (ESA-EOPG-CSCOP-TN-0002; xarray-sentinel calibrate_intensity)",
            "noise_removed": False,
            "luts": {pol: lut.record() for pol, lut in luts.items()},
        }
        if self.warp is not None:
            record["warped_lines_pixels"] = f"through the GCPs / geotransform every {LATTICE_STEP} px"
        return replace(self, reader=self.reader.with_luts(luts), calibration=record)

    def sample(self, per_axis: int = 3, size: int = 256) -> np.ndarray:
        """Values for statistics: ``per_axis``**2 windows of up to ``size`` px spread evenly over the
        scene (centred at 1/(2n), 3/(2n), ... of each axis), read as :meth:`WindowReader.read` does.
        Returns ``(pol, N)`` float32 (NaN = nodata)."""
        pieces = []
        for fy in (np.arange(per_axis) + 0.5) / per_axis:
            for fx in (np.arange(per_axis) + 0.5) / per_axis:
                r0 = max(0, min(self.height - size, int(fy * self.height) - size // 2))
                c0 = max(0, min(self.width - size, int(fx * self.width) - size // 2))
                window = self.reader.read(r0, min(r0 + size, self.height), c0, min(c0 + size, self.width))
                pieces.append(window.reshape(window.shape[0], -1))
        return np.concatenate(pieces, axis=1)

    @property
    def height(self) -> int:
        """Rows of the grid."""
        return int(self.reader.shape[1])

    @property
    def width(self) -> int:
        """Columns of the grid."""
        return int(self.reader.shape[2])

    @property
    def data(self) -> da.Array:
        """The scene as a lazy ``(pol, y, x)`` float32 dask array (values as stored, NaN = nodata), chunks
        ``(pol, *chunks)``."""
        return da.from_array(
            self.reader,
            chunks=(len(self.pols), *self.chunks),
            name=f"fusarbatch-source-{uuid.uuid4().hex}",
            lock=False,
            asarray=False,
            meta=np.empty((0, 0, 0), dtype=np.float32),
        )


@dataclass(frozen=True)
class _FileInfo:
    href: str
    count: int
    height: int
    width: int
    crs: CRS | None
    transform: Affine
    gcps: tuple[Any, ...]
    gcps_crs: CRS | None
    nodatavals: tuple[float | None, ...]
    has_mask: tuple[bool, ...]
    block_shape: tuple[int, int]
    dtype: str

    @property
    def has_geotransform(self) -> bool:
        return not self.transform.almost_equals(Affine.identity())

    @property
    def flips(self) -> tuple[bool, bool]:
        """(rows stored bottom-up, columns stored right-to-left) of an axis-aligned geotransform."""
        t = self.transform
        if not self.has_geotransform or t.b != 0 or t.d != 0:
            return False, False
        return t.e > 0, t.a < 0

    @property
    def north_up_transform(self) -> Affine:
        """The file's grid with row 0 at the north edge and column 0 at the west edge (see the module)."""
        t = self.transform
        flip_rows, flip_cols = self.flips
        if flip_rows:
            t = t @ Affine.translation(0, self.height) @ Affine.scale(1, -1)
        if flip_cols:
            t = t @ Affine.translation(self.width, 0) @ Affine.scale(-1, 1)
        return t


@dataclass(frozen=True)
class _Grid:
    crs: CRS
    transform: Affine
    height: int
    width: int


def utm_crs(lon: float, lat: float) -> CRS:
    """WGS 84 / UTM zone of a point (lon, lat in degrees): EPSG ``326zz`` (lat >= 0) or ``327zz``.

    Zone ``zz = floor((lon + 180) / 6) + 1``, lon wrapped to [-180, 180), clamped to 1..60; the
    Norway/Svalbard exceptions are not applied.
    """
    lon = (float(lon) + 180.0) % 360.0 - 180.0
    zone = min(max(math.floor((lon + 180.0) / 6.0) + 1, 1), 60)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def gcp_centre_lonlat(gcps: list[Any] | tuple[Any, ...], gcps_crs: CRS | None) -> tuple[float, float]:
    """Centre (lon, lat in degrees, EPSG:4326) of the bounding box of GCP map coordinates.

    GCPs in another CRS are transformed to EPSG:4326 first; a set spanning the antimeridian (longitude
    range over 180 degrees) is unwrapped so the centre falls inside it.
    """
    xs = [float(g.x) for g in gcps]
    ys = [float(g.y) for g in gcps]
    src_crs = gcps_crs or CRS.from_epsg(4326)
    if src_crs != CRS.from_epsg(4326):
        xs, ys = warp_points(src_crs, CRS.from_epsg(4326), xs, ys)
    lons = np.asarray(xs, dtype=np.float64)
    lats = np.asarray(ys, dtype=np.float64)
    if lons.max() - lons.min() > 180.0:
        lons = np.where(lons < 0, lons + 360.0, lons)
    lon = (lons.min() + lons.max()) / 2.0
    return float((lon + 180.0) % 360.0 - 180.0), float((lats.min() + lats.max()) / 2.0)


def open_scene(scene: Scene, *, tile_size: int = 504) -> SourceRaster:
    """Open every polarisation of ``scene`` lazily on the scene grid (see the module docstring).

    :param tile_size: the tile edge the array will be cut into; sets the chunk shape.
    :returns: a :class:`SourceRaster`; ``data`` is ``(len(scene.pols), H, W)`` float32, NaN = nodata.
    :raises SceneError: no polarisation, a missing / unreadable / corrupt file, a band index out of range,
        a complex or mixed-dtype raster, or a file that is not georeferenced (no CRS and geotransform, no
        GCPs).
    """
    if not scene.bands:
        raise SceneError(f"scene {scene.item_id!r}: no polarisation to read")
    runs = _runs(scene.bands)
    infos: dict[str, _FileInfo] = {}
    for href, refs in runs:
        if href not in infos:
            infos[href] = _inspect(href)
        info = infos[href]
        for _, ref in refs:
            if not 1 <= ref.band <= info.count:
                raise SceneError(
                    f"{href}: band {ref.band} requested but the raster has {info.count} band(s); "
                    f"fix the catalog's asset or band index"
                )
    first = infos[runs[0][0]]
    grid = _scene_grid(first, scene)
    pieces = []
    warps: list[dict[str, Any]] = []
    for href, refs in runs:
        run, warp = _open_run(infos[href], refs, grid, scene)
        pieces.append(run)
        if warp is not None:
            warps.append({"href": href, **warp})
    warp_attrs = None
    if warps:
        warp_attrs = {
            "resampling": WARP_RESAMPLING.name,
            "tolerance_px": WARP_TOLERANCE,
            "files": warps,
        }
    pols = tuple(pol for _, refs in runs for pol, _ in refs)
    return SourceRaster(
        reader=WindowReader(pieces, (len(pols), grid.height, grid.width), grid.transform),
        pols=pols,
        crs=grid.crs,
        transform=grid.transform,
        hrefs=tuple(dict.fromkeys(href for href, _ in runs)),
        warp=warp_attrs,
        chunks=_chunk_shape(first, grid, tile_size),
        dtypes=tuple(infos[href].dtype for href, refs in runs for _ in refs),
    )


def _runs(bands: dict[str, BandRef]) -> list[tuple[str, list[tuple[str, BandRef]]]]:
    """Consecutive polarisations in the same file, so each file is read once per window."""
    runs: list[tuple[str, list[tuple[str, BandRef]]]] = []
    for pol, ref in bands.items():
        if runs and runs[-1][0] == ref.href:
            runs[-1][1].append((pol, ref))
        else:
            runs.append((ref.href, [(pol, ref)]))
    return runs


def _local_path(href: str) -> str | None:
    if href.startswith("file://"):
        return href[len("file://") :]
    if "://" in href or href.startswith("/vsi"):
        return None
    return href


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _inspect(href: str) -> _FileInfo:
    """Read one file's header; every failure becomes a one-line SceneError naming the href."""
    path = _local_path(href)
    if path is not None:
        if not os.path.exists(path):
            raise SceneError(f"{href}: asset file not found")
        if os.path.isdir(path):
            raise SceneError(f"{href}: is a directory, not a raster file")
        check_regular(path, "asset", SceneError, "give a raster file")  # a FIFO or device would block GDAL
        if not os.access(path, os.R_OK):
            raise SceneError(f"{href}: permission denied (cannot read the file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(href) as src:
                gcps, gcps_crs = src.gcps
                flags = src.mask_flag_enums
                info = _FileInfo(
                    href=href,
                    count=src.count,
                    height=src.height,
                    width=src.width,
                    crs=src.crs,
                    transform=src.transform,
                    gcps=tuple(gcps),
                    gcps_crs=gcps_crs,
                    nodatavals=tuple(src.nodatavals),
                    has_mask=tuple(MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in flags),
                    block_shape=tuple(src.block_shapes[0]),
                    dtype=src.dtypes[0],
                )
                dtypes = set(src.dtypes)
    except rasterio.errors.RasterioError as exc:
        raise SceneError(f"{href}: cannot open as a raster ({_one_line(exc)})") from None
    if len(dtypes) > 1:
        raise SceneError(f"{href}: bands have different data types {sorted(dtypes)}; not supported")
    if np.issubdtype(np.dtype(info.dtype), np.complexfloating):
        raise SceneError(f"{href}: complex data ({info.dtype}, SLC?) is not supported; use detected GRD/RTC")
    return info


def _scene_grid(first: _FileInfo, scene: Scene) -> _Grid:
    if first.crs is not None and first.has_geotransform:
        return _Grid(first.crs, first.north_up_transform, first.height, first.width)
    if first.gcps:
        lon, lat = gcp_centre_lonlat(first.gcps, first.gcps_crs)
        dst = utm_crs(lon, lat)
        try:
            with rasterio.open(first.href) as src, WarpedVRT(src, **_warp_kwargs(first, dst)) as vrt:
                return _Grid(dst, vrt.transform, vrt.height, vrt.width)
        except rasterio.errors.RasterioError as exc:
            raise SceneError(f"{first.href}: cannot warp its GCPs to {dst} ({_one_line(exc)})") from None
    if first.has_geotransform and scene.crs:
        return _Grid(CRS.from_user_input(scene.crs), first.north_up_transform, first.height, first.width)
    raise SceneError(
        f"{first.href}: not georeferenced (no CRS and geotransform, no GCPs); cannot place its tiles"
    )


def _warp_kwargs(info: _FileInfo, dst: CRS, src_nodata: float | None = None) -> dict[str, Any]:
    """WarpedVRT arguments common to every warp. For a GCP-only file they are all: rasterio 1.4 can only
    warp GCPs onto the grid GDAL suggests (``GDALAutoCreateWarpedVRT``); with an explicit destination
    transform it uses the (identity) geotransform instead of the GCPs and fails. Aligning a georeferenced
    file adds ``transform``/``width``/``height``."""
    return {
        "crs": dst,
        "resampling": WARP_RESAMPLING,
        "tolerance": WARP_TOLERANCE,
        "src_nodata": src_nodata,
        "nodata": float("nan"),
        "dtype": "float32",
    }


def _on_grid(info: _FileInfo, grid: _Grid, scene: Scene) -> bool:
    if info.gcps and not info.has_geotransform:
        return False
    crs = info.crs or (CRS.from_user_input(scene.crs) if scene.crs and info.has_geotransform else None)
    return crs is not None and _same_grid(crs, info.north_up_transform, info.height, info.width, grid)


def _same_grid(crs: CRS, transform: Affine, height: int, width: int, grid: _Grid) -> bool:
    if crs != grid.crs or (height, width) != (grid.height, grid.width):
        return False
    pixel = max(abs(grid.transform.a), abs(grid.transform.e), 1e-12)
    return transform.almost_equals(grid.transform, precision=pixel * 1e-9)


def _chunk_shape(first: _FileInfo, grid: _Grid, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of a read: whole blocks, at least one tile, at least :data:`CHUNK_COLS` wide; the size
    does not depend on the scene size. Strips (a block as wide as the file) and warped files have no
    column blocks to align to; GDAL's block cache serves the strips that neighbouring windows share."""
    block_h, block_w = first.block_shape
    if not _on_grid_shape(first, grid):  # warped: no file blocks to align to
        block_h, block_w = 1, 1
    if block_w >= first.width:
        block_w = 1
    rows = block_h * math.ceil(tile_size / block_h)
    cols = block_w * math.ceil(max(tile_size, CHUNK_COLS) / block_w)
    return max(1, min(rows, grid.height)), max(1, min(cols, grid.width))


def _on_grid_shape(info: _FileInfo, grid: _Grid) -> bool:
    return not (info.gcps and not info.has_geotransform) and (info.height, info.width) == (
        grid.height,
        grid.width,
    )


def _open_run(
    info: _FileInfo, pol_refs: list[tuple[str, BandRef]], grid: _Grid, scene: Scene
) -> tuple[_Run, dict[str, Any] | None]:
    """The bands ``pol_refs`` of one file as a :class:`_Run` (a lazy ``(len(refs), H, W)``
    xarray.DataArray on ``grid``, or on it once its rows / columns are reversed; the nodata values of each
    band) and how the file is warped (``None``: read as stored)."""
    refs = [ref for _, ref in pol_refs]
    locate: _Locate | None = None
    indexes = [ref.band - 1 for ref in refs]
    nodata = tuple(
        tuple(
            float(v)
            for v in {info.nodatavals[ref.band - 1], ref.nodata}
            if v is not None and not math.isnan(float(v))
        )
        for ref in refs
    )
    warp: dict[str, Any] | None = None
    flips = (False, False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            if _on_grid(info, grid, scene):
                flips = info.flips  # bottom-up / right-to-left: read reversed (WindowReader.read)
                masked = any(info.has_mask[i] for i in indexes)
                # One shared handle per file and a lock: GDAL's block cache is per handle, so threads then
                # share decoded blocks (windows overlap) instead of each decoding them again.
                xarr = rioxarray.open_rasterio(
                    info.href, lock=SerializableLock(), cache=False, masked=masked, parse_coordinates=False
                )
            else:
                src_nodata = info.nodatavals[indexes[0]]
                if src_nodata is None:
                    src_nodata = refs[0].nodata
                gcp_only = bool(info.gcps) and not info.has_geotransform
                warp = {"from": "gcps" if gcp_only else "grid"}
                if gcp_only:
                    kwargs = _warp_kwargs(info, grid.crs, src_nodata)
                    locate = _Locate(grid.crs, info.gcps_crs or CRS.from_epsg(4326), gcps=info.gcps)
                else:
                    src_crs = None
                    if info.crs is None and info.has_geotransform and scene.crs:
                        src_crs = CRS.from_user_input(scene.crs)
                    locate = _Locate(grid.crs, src_crs or info.crs or grid.crs, transform=info.transform)
                    kwargs = {
                        **_warp_kwargs(info, grid.crs, src_nodata),
                        "src_crs": src_crs,
                        "transform": grid.transform,
                        "width": grid.width,
                        "height": grid.height,
                    }
                with rasterio.open(info.href) as src, WarpedVRT(src, **kwargs) as vrt:
                    if gcp_only and not _same_grid(vrt.crs, vrt.transform, vrt.height, vrt.width, grid):
                        raise SceneError(
                            f"{info.href}: GCP-only file whose GCPs give another grid than the scene's first "
                            f"polarisation; polarisations in separate GCP-only files must share their GCPs"
                        )
                    # Warping is CPU-bound: one handle per thread (no lock) so warps run in parallel.
                    xarr = rioxarray.open_rasterio(
                        vrt, lock=False, cache=False, masked=False, parse_coordinates=False
                    )
            array = xarr.isel(band=indexes)
    except SceneError:
        raise
    except Exception as exc:  # rasterio / rioxarray raise many types for unreadable files
        raise SceneError(f"{info.href}: cannot read ({_one_line(exc)})") from None
    run = _Run(
        array,
        nodata,
        tuple(pol for pol, _ in pol_refs),
        flips=flips,
        file_shape=(info.height, info.width),
        locate=locate,
    )
    return run, warp


def _mask_nodata(block: np.ndarray, nodata: tuple[tuple[float, ...], ...]) -> np.ndarray:
    """A ``(k, y, x)`` block as float32 with each band's nodata values set to NaN (compared in the block's
    own dtype, so integer nodata is matched exactly). A writeable float32 block is the fresh output of
    the reader and only used here: it is masked in place, saving a copy."""
    reuse = block.dtype == np.float32 and block.flags.writeable
    out = block if reuse else np.array(block, dtype=np.float32, copy=True)
    for i, values in enumerate(nodata):
        for value in values:
            typed = _as_dtype(value, block.dtype)
            if typed is not None:
                np.copyto(out[i], np.float32(np.nan), where=block[i] == typed)
    return out


def _as_dtype(value: float, dtype: np.dtype) -> Any:
    """``value`` in ``dtype``, or ``None`` when no pixel of that dtype can hold it."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if value != math.floor(value) or not limits.min <= value <= limits.max:
            return None
        return dtype.type(int(value))
    return dtype.type(value)
