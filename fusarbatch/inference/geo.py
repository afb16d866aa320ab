"""Pixel boxes -> map polygons, tile ownership and cross-tile de-duplication (DESIGN 3.5).

The model answers on a ``grid`` x ``grid`` input, its own ``image_size`` (``tlm_config.json``; 504 for
FUSAR-GPT). A box ``[x1, y1, x2, y2]`` on that grid is clipped to the grid, scaled per axis to the tile's
pixels (``x * W / grid``, ``y * H / grid``), placed in the scene with the tile's affine (rasterio order
a..f, scene CRS) and reprojected to EPSG:4326. Callers must pass the model's grid: placing a 336 px model's
boxes on 504 would shrink them toward the tile origin by 2/3. Boxes scored below ``min_score`` are dropped
before anything else (:func:`scene_detections`).

Overlapping tiles see the same target more than once, each copy a little off (a model's box moves by a
pixel or two with the context), and a target longer than the overlap is seen by no tile whole: each sees
the part inside it, cut at its edge. :func:`scene_detections` therefore works in scene pixels:

1. **Within a tile**, a per-label IoU non-maximum suppression (NMS) at ``iou_threshold``.
2. **Across tiles**, per label, copies are matched in the region the two tiles share: both boxes are
   clipped to the intersection of the two tile footprints (which removes the cut a tile edge makes), and
   they are one target when the clipped boxes agree side by side within ``match_px`` pixels of the model
   grid (the localisation noise between tiles; default 4 = +-2 px per copy) or have an IoU of at least
   ``iou_threshold``. Candidates come from a shapely STRtree. Starting from the highest score (then the
   lowest tile, then the box, so the result never depends on input order), a target collects every copy
   that matches one of its copies, at most one per tile.
3. **The merged box** takes each side from the copy whose tile sees that side farthest from the tile's
   own edge (a side at a tile edge is a cut, not the target's edge), so a long target gets its whole
   extent; its score and model label are those of the highest-scoring copy; its ``tile_id`` is the tile
   whose *core* holds the merged centre (cores partition the scene, the boundary between two
   neighbouring tiles lying in the middle of their overlap), so per-tile counts add up to the scene's.

This replaces DESIGN 3.5's "owned by the tile whose core contains its centre, then NMS": ownership by
centre loses a target whose two copies' centres fall on either side of the core boundary (each was owned
by the other tile) and doubles a target longer than the overlap (the cut copies hardly overlap). Over
thousands of generated targets with +-2 px jitter per copy, the rule above loses and doubles none
(tests/inference/test_geo_dedup_property.py).
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
    answer_score: float | None = None
    """Probability of the whole generated answer the box came from (shared by its boxes); None when not
    recorded. :attr:`score` is the box's own confidence."""


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


def _tile_box(box: PixelBox, tile: TileGeometry, grid: int) -> Box | None:
    """One model box -> ``(col1, row1, col2, row2)`` in tile pixels (clipped, scaled per axis), None if it
    has no area."""
    x1, x2 = sorted((float(np.clip(box.x1, 0, grid)), float(np.clip(box.x2, 0, grid))))
    y1, y2 = sorted((float(np.clip(box.y1, 0, grid)), float(np.clip(box.y2, 0, grid))))
    if not (x2 > x1 and y2 > y1) or not all(np.isfinite((x1, x2, y1, y2))):
        return None
    sx, sy = tile.width / grid, tile.height / grid
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def _box_polygon(box: PixelBox, tile: TileGeometry, grid: int) -> tuple[Polygon, tuple[float, float]] | None:
    """One box -> (polygon in the scene CRS, centre (row, col) in scene pixels), None if it has no area."""
    placed = _tile_box(box, tile, grid)
    if placed is None:
        return None
    c1, r1, c2, r2 = placed
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
    """Per-label IoU NMS over map polygons (scene CRS) with a shapely STRtree, for detections of one
    view (:func:`scene_detections` de-duplicates across tiles with its own rule, see the module).

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


Box = tuple[float, float, float, float]
"""``(col1, row1, col2, row2)`` in scene pixels."""


@dataclass(frozen=True)
class _Copy:
    """One box as one tile saw it, in scene pixels."""

    tile: int
    label: str
    box: Box
    score: float | None
    model_label: str | None
    answer_score: float | None = None

    @property
    def rank(self) -> tuple[float, int, Box]:
        """Sort key: higher score first (``None`` last), then lower tile, then the box."""
        return (-(self.score if self.score is not None else -np.inf), self.tile, self.box)


def _iou(a: Box, b: Box) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _clip(box: Box, region: Box) -> Box:
    """``box`` clamped into ``region`` (a box outside it becomes a degenerate box on its border)."""
    c1, c2 = (float(np.clip(v, region[0], region[2])) for v in (box[0], box[2]))
    r1, r2 = (float(np.clip(v, region[1], region[3])) for v in (box[1], box[3]))
    return c1, r1, c2, r2


def _footprint(tile: TileGeometry) -> Box:
    return tile.col_off, tile.row_off, tile.col_off + tile.width, tile.row_off + tile.height


def _same_target(a: _Copy, b: _Copy, tiles: Sequence[TileGeometry], tol: float, iou_threshold: float) -> bool:
    """Whether copies from two different tiles are one target: compared inside the region both tiles
    see (see the module docstring)."""
    fa, fb = _footprint(tiles[a.tile]), _footprint(tiles[b.tile])
    shared = (max(fa[0], fb[0]), max(fa[1], fb[1]), min(fa[2], fb[2]), min(fa[3], fb[3]))
    if shared[2] <= shared[0] or shared[3] <= shared[1]:
        return False
    ca, cb = _clip(a.box, shared), _clip(b.box, shared)
    if all(abs(u - v) <= tol for u, v in zip(ca, cb, strict=True)):
        return True
    return _iou(ca, cb) >= iou_threshold


def _merged_box(members: Sequence[_Copy], tiles: Sequence[TileGeometry]) -> Box:
    """Each side from the copy whose tile sees it farthest from that tile's own edge (ties: the earlier,
    better-ranked copy)."""
    sides = []
    for k in range(4):
        margins = []
        for c in members:
            f = _footprint(tiles[c.tile])
            margins.append(c.box[k] - f[k] if k < 2 else f[k] - c.box[k])
        sides.append(members[int(np.argmax(margins))].box[k])  # argmax: the first of equal margins
    return sides[0], sides[1], sides[2], sides[3]


def _nms_within_tiles(copies: list[_Copy], iou_threshold: float) -> list[_Copy]:
    kept: list[_Copy] = []
    groups: dict[tuple[int, str], list[_Copy]] = {}
    for c in copies:
        groups.setdefault((c.tile, c.label), []).append(c)
    for group in groups.values():
        mine: list[_Copy] = []
        for c in sorted(group, key=lambda c: c.rank):
            if all(_iou(c.box, k.box) < iou_threshold for k in mine):
                mine.append(c)
        kept += mine
    return kept


def _clusters(
    copies: list[_Copy], tiles: Sequence[TileGeometry], tol: float, iou_threshold: float
) -> list[list[_Copy]]:
    """Copies of one label grouped into targets (at most one copy per tile), best copy first."""
    copies = sorted(copies, key=lambda c: c.rank)
    tree = shapely.STRtree([shapely.box(*c.box).buffer(tol, join_style="mitre") for c in copies])
    taken = np.zeros(len(copies), bool)
    out = []
    for i in range(len(copies)):
        if taken[i]:
            continue
        taken[i] = True
        members, queue, seen_tiles = [copies[i]], [i], {copies[i].tile}
        while queue:
            m = queue.pop(0)
            near = tree.query(
                shapely.box(*copies[m].box).buffer(tol, join_style="mitre"), predicate="intersects"
            )
            for j in sorted(int(j) for j in near):  # sorted: best copies first (copies are in rank order)
                if taken[j] or copies[j].tile in seen_tiles:
                    continue
                if _same_target(copies[m], copies[j], tiles, tol, iou_threshold):
                    taken[j] = True
                    seen_tiles.add(copies[j].tile)
                    members.append(copies[j])
                    queue.append(j)
        out.append(members)
    return out


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
    match_px: float = 4.0,
    answer_scores_per_tile: Sequence[Sequence[float | None]] | None = None,
    min_score: float = 0.0,
) -> list[Detection]:
    """All detections of one scene: boxes scored below ``min_score`` dropped, the others placed in the
    scene, NMS within each tile, copies of one target in overlapping tiles merged (see the module
    docstring), EPSG:4326 geometry and ids.

    :param tiles: the tiles that were inferred (tile id = index), all of one size, on one scene grid.
    :param boxes_per_tile: parsed model boxes per tile (on the ``grid`` input), same order as ``tiles``;
        ``box.label`` is the detection's label (NMS and ids are per label).
    :param scores_per_tile: optional score per box in [0, 1] (the box's own confidence) or ``None``.
    :param model_labels_per_tile: optional label the model itself wrote, per box (kept as
        :attr:`Detection.model_label`).
    :param grid: side of the model's input in pixels (its ``image_size``): the boxes' grid.
    :param answer_scores_per_tile: optional probability of the answer each box came from (kept as
        :attr:`Detection.answer_score`, from the same copy as the score).
    :param min_score: boxes scored below it are dropped first (so they neither count, nor suppress or
        merge with another box); with ``min_score > 0`` a box without a score is dropped too.
    :param iou_threshold: IoU at or above which two boxes are one target (within a tile; across tiles,
        of the boxes clipped to the shared region).
    :param match_px: across tiles, clipped boxes whose four sides agree within this many pixels of the
        model grid are one target (the localisation noise between two views).
    :returns: detections sorted by (label, detection_id); ``center_px`` is the merged box's centre
        (row, col) in scene pixels.
    """
    if not tiles:
        return []
    rows = sorted({t.row_off for t in tiles})
    cols = sorted({t.col_off for t in tiles})
    row_cores = dict(zip(rows, axis_cores(rows, tiles[0].height), strict=True))
    col_cores = dict(zip(cols, axis_cores(cols, tiles[0].width), strict=True))
    at = {(t.row_off, t.col_off): k for k, t in enumerate(tiles)}
    tol = float(match_px) * max(tiles[0].width, tiles[0].height) / grid
    copies: list[_Copy] = []
    for tile_id, (tile, boxes) in enumerate(zip(tiles, boxes_per_tile, strict=True)):
        none = [None] * len(boxes)
        scores = list(scores_per_tile[tile_id]) if scores_per_tile is not None else none
        model_labels = list(model_labels_per_tile[tile_id]) if model_labels_per_tile is not None else none
        answer_scores = list(answer_scores_per_tile[tile_id]) if answer_scores_per_tile is not None else none
        for box, score, model_label, answer_score in zip(
            boxes, scores, model_labels, answer_scores, strict=True
        ):
            if min_score > 0 and (score is None or score < min_score):
                continue
            placed = _tile_box(box, tile, grid)  # per box: scores stay aligned when one is dropped
            if placed is None:
                continue
            c1, r1, c2, r2 = placed
            scene_box = (tile.col_off + c1, tile.row_off + r1, tile.col_off + c2, tile.row_off + r2)
            copies.append(_Copy(tile_id, str(box.label), scene_box, score, model_label, answer_score))
    copies = _nms_within_tiles(copies, iou_threshold)
    by_label: dict[str, list[_Copy]] = {}
    for c in copies:
        by_label.setdefault(c.label, []).append(c)
    project = MapProjector(crs)
    found: list[Detection] = []
    for label, group in sorted(by_label.items()):
        for members in _clusters(group, tiles, tol, iou_threshold):
            best = members[0]
            c1, r1, c2, r2 = _merged_box(members, tiles) if len(members) > 1 else best.box
            centre = ((r1 + r2) / 2, (c1 + c2) / 2)
            owner = _owner(centre, row_cores, col_cores, at, best.tile)
            tile = tiles[best.tile]
            corners = [
                tile.transform @ (c - tile.col_off, r - tile.row_off)
                for c, r in ((c1, r1), (c2, r1), (c2, r2), (c1, r2))
            ]
            poly_map = Polygon(corners)
            poly_ll = project.polygon(poly_map)
            ll = poly_ll.centroid
            found.append(
                Detection(
                    detection_id=detection_id(scene_id, label, ll.x, ll.y),
                    scene_id=scene_id,
                    tile_id=owner,
                    label=label,
                    score=best.score,
                    geometry=poly_ll,
                    geometry_map=poly_map,
                    center_px=centre,
                    model_label=best.model_label,
                    answer_score=best.answer_score,
                )
            )
    return sorted(found, key=lambda d: (d.label, d.detection_id))


def _owner(
    centre: tuple[float, float],
    row_cores: dict[int, tuple[float, float]],
    col_cores: dict[int, tuple[float, float]],
    at: dict[tuple[int, int], int],
    fallback: int,
) -> int:
    """The tile whose core holds ``centre`` (row, col); ``fallback`` when that tile is not in the list."""
    row = next(r for r, (lo, hi) in row_cores.items() if lo <= centre[0] < hi)
    col = next(c for c, (lo, hi) in col_cores.items() if lo <= centre[1] < hi)
    return at.get((row, col), fallback)
