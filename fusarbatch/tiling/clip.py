"""AOI-clipped tiling (issue 11): the tiles of a scene's grid that an AOI needs, and what lies inside it.

A scene is tiled on its own grid (:func:`fusarbatch.tiling.grid.tile_grid`, which depends only on the
scene size, tile size and overlap); an AOI-clipped run keeps only the tiles of that grid that the AOI
needs, so two runs over overlapping AOIs produce identical tiles (same ``row_off``/``col_off``, same
values) where they overlap. GCP-only scenes are clipped after the warp: their grid is the warped UTM grid,
and only the windows of the kept tiles are read, so only those are warped.

**Which tiles.** The AOI (EPSG:4326) is projected to the scene's pixel space (``x`` = column, ``y`` = row,
corner-based: pixel ``(r, c)`` is the square ``[c, c+1] x [r, r+1]``) and intersected with the scene
rectangle (:func:`aoi_pixels`). Along each axis the kept tile rows (columns) are the shortest run of the
grid's origins that covers the pixel rows (columns) the AOI touches: from the last tile starting at or
before the first touched row, to the first tile ending at or after the last one. Of that rectangle of
tiles, those whose square does not meet the AOI with a positive area are dropped (a diagonal or
L-shaped AOI). Every pixel the AOI covers with a positive area stays covered: the tile of the rectangle
that covers it meets the AOI there.

**Inside the AOI.** A detection is inside when the centre of its map polygon (scene CRS) lies in the AOI
(:func:`centres_inside`); detections outside are not written, and the counts are those of the
detections inside.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from fusarbatch.tiling.grid import TileGrid

#: Longest AOI edge, in degrees, before it is projected to the scene CRS (a straight edge in lon/lat is
#: a curve in UTM): 0.005 deg is about 550 m, under 0.1 px of bend at 10 m pixels for 100 km edges.
MAX_SEGMENT_DEG = 0.005
#: Margin, in degrees, of the lon/lat box the AOI is first cut to around the scene (a huge AOI, e.g. an
#: ocean, is not projected whole: far from the scene's UTM zone the projection is undefined).
PRECLIP_MARGIN_DEG = 1.0


def aoi_digest(aoi: BaseGeometry | None) -> str | None:
    """16 hex digits identifying an AOI geometry (WKB of its 2D coordinates); ``None`` for no AOI (whole
    scenes). Recorded in the tile store and part of the config hash, so a changed AOI re-tiles a scene."""
    if aoi is None:
        return None
    wkb = shapely.to_wkb(shapely.normalize(aoi), output_dimension=2, byte_order=1)
    return hashlib.sha256(wkb).hexdigest()[:16]


def aoi_pixels(aoi: BaseGeometry, crs: CRS | str, transform: Affine, height: int, width: int) -> BaseGeometry:
    """AOI intersect scene, in the scene's pixel space (``x`` = column, ``y`` = row, corner-based).

    :param aoi: the AOI in EPSG:4326 (lon, lat), e.g. :attr:`fusarbatch.catalog.aoi.AOI.geometry` (split
        at the antimeridian).
    :param crs: the scene grid's CRS; ``transform``: its affine (pixel corner -> map, rasterio order).
    :returns: a (Multi)Polygon within ``[0, width] x [0, height]``; empty when the AOI misses the scene.
    """
    crs = CRS.from_user_input(crs)
    frame = box(0, 0, width, height)
    to_map = shapely.transform(frame.segmentize(max(height, width) / 64), lambda xy: _affine(transform, xy))
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform(*np.asarray(to_map.exterior.coords).T)
    finite = np.isfinite(lon) & np.isfinite(lat)
    area = aoi
    if finite.all() and np.ptp(lon) < 180:  # not across the antimeridian: cut the AOI near the scene first
        m = PRECLIP_MARGIN_DEG
        area = aoi.intersection(box(lon.min() - m, lat.min() - m, lon.max() + m, lat.max() + m))
    if area.is_empty:
        return Polygon()
    area = area.segmentize(MAX_SEGMENT_DEG)
    to_scene = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    inverse = ~transform

    def lonlat_to_px(xy: np.ndarray) -> np.ndarray:
        x, y = to_scene.transform(xy[:, 0], xy[:, 1])
        return _affine(inverse, np.column_stack([x, y]))

    px = shapely.transform(area, lonlat_to_px)
    if not shapely.is_valid(px):
        px = shapely.make_valid(px)
    out = px.intersection(frame)
    return out if out.area > 0 else Polygon()


def select_tiles(grid: TileGrid, region: BaseGeometry) -> np.ndarray:
    """Row-major indices (into ``grid``'s tiles, ascending) of the tiles the AOI needs (module docstring).

    :param region: the AOI in pixel space (:func:`aoi_pixels`); empty -> no tile.
    :returns: ``(k,)`` int64.
    """
    if region.is_empty or region.area <= 0:
        return np.zeros(0, dtype=np.int64)
    c0, r0, c1, r1 = region.bounds
    size = grid.tile_size
    rows = _covering_run(np.asarray(grid.rows), int(np.floor(r0)), int(np.ceil(r1)), size)
    cols = _covering_run(np.asarray(grid.cols), int(np.floor(c0)), int(np.ceil(c1)), size)
    ii, jj = np.meshgrid(rows, cols, indexing="ij")
    ii, jj = ii.ravel(), jj.ravel()
    squares = shapely.box(
        np.asarray(grid.cols)[jj], np.asarray(grid.rows)[ii], np.asarray(grid.cols)[jj] + size,
        np.asarray(grid.rows)[ii] + size,
    )  # fmt: skip
    shapely.prepare(region)
    meets = shapely.area(shapely.intersection(squares, region)) > 0
    return np.sort(ii[meets] * len(grid.cols) + jj[meets]).astype(np.int64)


def _covering_run(origins: np.ndarray, first: int, stop: int, size: int) -> np.ndarray:
    """Indices of the shortest run of tiles (``origins``, ascending) covering pixels ``[first, stop)``."""
    stop = max(stop, first + 1)
    k0 = int(np.searchsorted(origins, first, side="right")) - 1  # last tile starting at or before `first`
    k0 = max(k0, 0)
    ends = origins + size
    k1 = int(np.searchsorted(ends, stop, side="left"))  # first tile ending at or after `stop`
    k1 = min(k1, len(origins) - 1)
    return np.arange(k0, max(k0, k1) + 1)


def centres_inside(aoi: BaseGeometry, crs: CRS | str, polygons_map: Sequence[BaseGeometry]) -> np.ndarray:
    """``(n,)`` bool: whether the centre (centroid) of each map polygon (scene ``crs``) lies in the AOI
    (EPSG:4326, boundary included)."""
    if not len(polygons_map):
        return np.zeros(0, dtype=bool)
    centres = shapely.centroid(np.asarray(polygons_map, dtype=object))
    xy = shapely.get_coordinates(centres)
    lon, lat = Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True).transform(
        xy[:, 0], xy[:, 1]
    )
    shapely.prepare(aoi)
    return np.asarray(shapely.covers(aoi, shapely.points(lon, lat)), dtype=bool)


def aoi_in_map(aoi: BaseGeometry, crs: CRS | str, transform: Affine, height: int, width: int) -> BaseGeometry:
    """AOI intersect scene in the scene CRS (for drawing it: the quick-look)."""
    px = aoi_pixels(aoi, crs, transform, height, width)
    return shapely.transform(px, lambda xy: _affine(transform, xy))


def _affine(t: Affine, xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])
