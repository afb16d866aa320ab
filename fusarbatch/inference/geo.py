"""Pixel boxes -> map polygons, tile ownership and cross-tile de-duplication (DESIGN 3.5).

The model answers on a ``grid`` x ``grid`` (504) input. A box ``[x1, y1, x2, y2]`` on that grid is clipped to
the grid, scaled per axis to the tile's pixels (``x * W / grid``, ``y * H / grid``), placed in the scene
with the tile's affine (rasterio order a..f, scene CRS) and reprojected to EPSG:4326.

Overlapping tiles see the same target twice. Each detection is first *owned* by the tile whose core
contains its centre: cores partition the scene, the boundary between two neighbouring tiles lying in the
middle of their overlap. What survives goes through a per-label IoU non-maximum suppression (NMS) over
spatial neighbours found with a shapely STRtree, keeping the higher score (then the smaller id, so the
result never depends on input order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import Polygon


class PixelBox(Protocol):
    """Anything with a label and ``x1, y1, x2, y2`` on the model's input grid (pixels, origin top-left)."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class TileGeometry:
    """Where a tile sits: its affine, offsets and size in the scene grid."""

    transform: Affine
    """Tile affine in the scene CRS (pixel (col, row) -> map (x, y))."""
    row_off: int
    col_off: int
    height: int
    """Tile height in scene pixels (the tile size)."""
    width: int


@dataclass(frozen=True)
class Detection:
    """One detected object, in map and geographic coordinates."""

    detection_id: str
    scene_id: str
    tile_id: int
    label: str
    score: float | None
    geometry: Polygon
    """Box polygon, EPSG:4326 (lon, lat)."""
    geometry_map: Polygon = field(repr=False)
    """Same box in the scene CRS."""
    center_px: tuple[float, float] = field(repr=False)
    """Box centre (row, col) in scene pixels: used for tile ownership."""
    model_label: str | None = None
    """The label the model wrote for this box, where it differs from :attr:`label` (the label asked for)
    or is otherwise known; None when not recorded."""


def axis_cores(origins: Sequence[int], tile: int) -> list[tuple[float, float]]:
    """Core interval ``[lo, hi)`` (scene pixels) of each tile along one axis.

    Cores partition the axis: the boundary between tiles starting at ``o[i]`` and ``o[i+1]`` is the middle
    of their overlap, ``(o[i+1] + o[i] + tile) / 2``; the first core starts at -inf, the last ends at +inf.

    :param origins: sorted tile origins along the axis (pixels).
    :param tile: tile size along the axis (pixels).
    """
    bounds = (
        [-np.inf] + [(origins[i + 1] + origins[i] + tile) / 2 for i in range(len(origins) - 1)] + [np.inf]
    )
    return [(bounds[i], bounds[i + 1]) for i in range(len(origins))]


def boxes_to_polygons(
    boxes: Iterable[PixelBox], tile: TileGeometry, *, grid: int = 504
) -> list[tuple[str, Polygon, tuple[float, float]]]:
    """Model boxes -> (label, polygon in the scene CRS, centre (row, col) in scene pixels).

    Boxes are clipped to ``[0, grid]`` first (model output is untrusted and the training ground truth
    itself runs past the edge); boxes with no area after clipping are dropped.
    """
    out = []
    for box in boxes:
        placed = _box_polygon(box, tile, grid)
        if placed is not None:
            out.append((str(box.label), *placed))
    return out


def _box_polygon(box: PixelBox, tile: TileGeometry, grid: int) -> tuple[Polygon, tuple[float, float]] | None:
    """One box -> (polygon in the scene CRS, centre (row, col) in scene pixels), None if it has no area."""
    x1, x2 = sorted((float(np.clip(box.x1, 0, grid)), float(np.clip(box.x2, 0, grid))))
    y1, y2 = sorted((float(np.clip(box.y1, 0, grid)), float(np.clip(box.y2, 0, grid))))
    if not (x2 > x1 and y2 > y1) or not all(np.isfinite((x1, x2, y1, y2))):
        return None
    sx, sy = tile.width / grid, tile.height / grid
    c1, c2, r1, r2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
    corners = [tile.transform @ (c, r) for c, r in ((c1, r1), (c2, r1), (c2, r2), (c1, r2))]
    return Polygon(corners), (tile.row_off + (r1 + r2) / 2, tile.col_off + (c1 + c2) / 2)


def detection_id(scene_id: str, label: str, lon: float, lat: float) -> str:
    """Deterministic id: SHA-1 of ``scene_id;label;lon;lat`` with the centre rounded to 1e-5 degree
    (about 1 m), first 16 hex digits. Reruns give the same ids, so rewriting a scene never duplicates."""
    key = f"{scene_id};{label};{lon:.5f};{lat:.5f}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


class MapProjector:
    """Scene CRS -> EPSG:4326 (lon, lat) for polygons; one pyproj Transformer reused."""

    def __init__(self, crs: str | CRS) -> None:
        self._t = Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True)

    def polygon(self, poly: Polygon) -> Polygon:
        xs, ys = np.asarray(poly.exterior.coords).T
        lon, lat = self._t.transform(xs, ys)
        return Polygon(zip(lon, lat, strict=True))

    def lonlat(self, xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Points of the scene CRS -> ``(lon, lat)`` arrays, degrees."""
        lon, lat = self._t.transform(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64))
        return np.asarray(lon), np.asarray(lat)


def pixel_size_m(transform: Affine, project: MapProjector, col: float, row: float) -> tuple[float, float]:
    """Ground size of one pixel of a grid, metres: ``(along columns, along rows)``.

    The distances on the WGS84 ellipsoid (``pyproj.Geod.inv``) from the centre of the pixel at
    ``(col, row)`` to the centres of its right and lower neighbours, so it holds for any CRS: projected
    (metres or feet; ground distance, not grid distance) or geographic (degrees).

    :param transform: the grid's affine (pixel (col, row) -> scene CRS).
    :param project: scene CRS -> EPSG:4326.
    :raises ValueError: a size that is not finite and positive (a degenerate affine, or a CRS pyproj
        cannot place on the ellipsoid).
    """
    from fusarbatch.catalog.aoi import GEOD

    pts = [transform @ xy for xy in ((col + 0.5, row + 0.5), (col + 1.5, row + 0.5), (col + 0.5, row + 1.5))]
    lon, lat = project.lonlat([p[0] for p in pts], [p[1] for p in pts])
    _, _, dx = GEOD.inv(lon[0], lat[0], lon[1], lat[1])
    _, _, dy = GEOD.inv(lon[0], lat[0], lon[2], lat[2])
    if not (np.isfinite(dx) and np.isfinite(dy) and dx > 0 and dy > 0):
        raise ValueError(f"pixel size {dx!r} x {dy!r} m: the tile's affine or CRS does not place it on Earth")
    return float(dx), float(dy)


def deduplicate(detections: Sequence[Detection], *, iou_threshold: float = 0.5) -> list[Detection]:
    """Per-label IoU NMS over map polygons (scene CRS) with a shapely STRtree.

    Order of precedence: higher score (``None`` counts as lowest), then smaller ``detection_id``. Output is
    sorted by (label, detection_id).
    """
    kept: list[Detection] = []
    by_label: dict[str, list[Detection]] = {}
    for det in detections:
        by_label.setdefault(det.label, []).append(det)
    for _label, dets in sorted(by_label.items()):
        order = sorted(
            range(len(dets)),
            key=lambda i: (-(dets[i].score if dets[i].score is not None else -np.inf), dets[i].detection_id),
        )
        geoms = [d.geometry_map for d in dets]
        tree = shapely.STRtree(geoms)
        suppressed = np.zeros(len(dets), bool)
        for i in order:
            if suppressed[i]:
                continue
            kept.append(dets[i])
            for j in tree.query(geoms[i], predicate="intersects"):
                if j == i or suppressed[j]:
                    continue
                inter = geoms[i].intersection(geoms[j]).area
                union = geoms[i].area + geoms[j].area - inter
                if union > 0 and inter / union >= iou_threshold:
                    suppressed[j] = True
    return sorted(kept, key=lambda d: (d.label, d.detection_id))


def scene_detections(
    scene_id: str,
    crs: str | CRS,
    tiles: Sequence[TileGeometry],
    boxes_per_tile: Sequence[Sequence[PixelBox]],
    scores_per_tile: Sequence[Sequence[float | None]] | None = None,
    model_labels_per_tile: Sequence[Sequence[str | None]] | None = None,
    *,
    grid: int = 504,
    iou_threshold: float = 0.5,
) -> list[Detection]:
    """All detections of one scene: polygons, ownership by tile core, NMS, EPSG:4326 geometry and ids.

    :param tiles: every tile of the scene (tile id = index), all of one size.
    :param boxes_per_tile: parsed model boxes per tile (on the ``grid`` input), same order as ``tiles``;
        ``box.label`` is the detection's label (NMS and ids are per label).
    :param scores_per_tile: optional score per box (sequence probability) or ``None``.
    :param model_labels_per_tile: optional label the model itself wrote, per box (kept as
        :attr:`Detection.model_label`).
    """
    if not tiles:
        return []
    rows = sorted({t.row_off for t in tiles})
    cols = sorted({t.col_off for t in tiles})
    row_cores = dict(zip(rows, axis_cores(rows, tiles[0].height), strict=True))
    col_cores = dict(zip(cols, axis_cores(cols, tiles[0].width), strict=True))
    project = MapProjector(crs)
    found: list[Detection] = []
    for tile_id, (tile, boxes) in enumerate(zip(tiles, boxes_per_tile, strict=True)):
        none = [None] * len(boxes)
        scores = list(scores_per_tile[tile_id]) if scores_per_tile is not None else none
        model_labels = list(model_labels_per_tile[tile_id]) if model_labels_per_tile is not None else none
        r_lo, r_hi = row_cores[tile.row_off]
        c_lo, c_hi = col_cores[tile.col_off]
        for box, score, model_label in zip(boxes, scores, model_labels, strict=True):
            placed = _box_polygon(box, tile, grid)  # per box: scores stay aligned when one is dropped
            if placed is None:
                continue
            poly_map, (cr, cc) = placed
            label = str(box.label)
            if not (r_lo <= cr < r_hi and c_lo <= cc < c_hi):
                continue  # owned by a neighbouring tile
            poly_ll = project.polygon(poly_map)
            centre = poly_ll.centroid
            found.append(
                Detection(
                    detection_id=detection_id(scene_id, label, centre.x, centre.y),
                    scene_id=scene_id,
                    tile_id=tile_id,
                    label=label,
                    score=score,
                    geometry=poly_ll,
                    geometry_map=poly_map,
                    center_px=(cr, cc),
                    model_label=model_label,
                )
            )
    return deduplicate(found, iou_threshold=iou_threshold)
