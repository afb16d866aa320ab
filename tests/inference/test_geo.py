"""Pixel boxes -> EPSG:4326 polygons, tile ownership and cross-tile de-duplication."""

from dataclasses import dataclass

import numpy as np
import pytest
from affine import Affine
from pyproj import Transformer

from fusarbatch.inference.geo import (
    TileGeometry,
    axis_cores,
    boxes_to_polygons,
    deduplicate,
    detection_id,
    scene_detections,
)

UTM31 = "EPSG:32631"


@dataclass
class B:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float


def tile_at(row_off, col_off, size=504, res=10.0, x0=600000.0, y0=4830000.0):
    scene = Affine(res, 0, x0, 0, -res, y0)
    return TileGeometry(scene @ Affine.translation(col_off, row_off), row_off, col_off, size, size)


def test_box_maps_to_expected_lonlat_polygon():
    # A 1008-px tile seen at 504: model pixel x maps to tile pixel 2x.
    tile = tile_at(100, 200, size=1008)
    [(label, poly, centre)] = boxes_to_polygons([B("ship", 10, 20, 30, 60)], tile)
    assert label == "ship"
    # scene pixel (col, row) of the box corners, then map coordinates by hand
    c1, c2, r1, r2 = 200 + 20, 200 + 60, 100 + 40, 100 + 120
    xs = [600000 + 10 * c for c in (c1, c2, c2, c1)]
    ys = [4830000 - 10 * r for r in (r1, r1, r2, r2)]
    np.testing.assert_allclose(np.asarray(poly.exterior.coords)[:4], np.c_[xs, ys], atol=1e-6)
    assert centre == (100 + 80, 200 + 40)
    dets = scene_detections("S", UTM31, [tile], [[B("ship", 10, 20, 30, 60)]])
    to_ll = Transformer.from_crs(UTM31, "EPSG:4326", always_xy=True)
    lon, lat = to_ll.transform(xs, ys)
    np.testing.assert_allclose(np.asarray(dets[0].geometry.exterior.coords)[:4], np.c_[lon, lat], atol=1e-7)


def test_boxes_are_clipped_and_degenerate_dropped():
    tile = tile_at(0, 0)
    out = boxes_to_polygons([B("a", -50, -5, 600, 100), B("b", 10, 10, 10, 50), B("c", 520, 0, 560, 9)], tile)
    assert [o[0] for o in out] == ["a"]
    minx, miny, maxx, maxy = out[0][1].bounds
    assert (minx, maxx) == (600000.0, 600000.0 + 5040.0)  # clipped to the 504 grid = tile width
    assert (miny, maxy) == (4830000.0 - 1000.0, 4830000.0)


def test_axis_cores_partition_the_axis():
    cores = axis_cores([0, 448, 896, 996], 504)
    assert cores[0] == (-np.inf, 476.0)
    assert cores[1] == (476.0, 924.0)
    assert cores[2] == (924.0, 1198.0)
    assert cores[3] == (1198.0, np.inf)


def test_two_overlapping_tiles_seeing_one_target_give_one_detection():
    # Tiles of 504 px with overlap 56: tile B starts at column 448. A target at scene columns 460-480
    # (inside the overlap) appears in A at x=460..480 and in B at x=12..32.
    a, b = tile_at(0, 0), tile_at(0, 448)
    dets = scene_detections(
        "S", UTM31, [a, b], [[B("ship", 460, 100, 480, 120)], [B("ship", 12, 100, 32, 120)]]
    )
    assert len(dets) == 1
    assert dets[0].tile_id == 0  # centre column 470 < 476: owned by A
    # slightly different boxes whose centres fall in different cores are merged by NMS
    dets = scene_detections(
        "S", UTM31, [a, b], [[B("ship", 462, 100, 482, 120)], [B("ship", 17, 100, 37, 120)]]
    )
    assert len(dets) == 1


def test_nms_keeps_different_labels_and_far_boxes():
    a, b = tile_at(0, 0), tile_at(0, 448)
    dets = scene_detections(
        "S",
        UTM31,
        [a, b],
        [[B("ship", 460, 100, 480, 120), B("plane", 460, 100, 480, 120)], [B("ship", 300, 300, 320, 330)]],
    )
    assert sorted(d.label for d in dets) == ["plane", "ship", "ship"]


def test_detection_ids_are_deterministic_and_order_independent():
    a, b = tile_at(0, 0), tile_at(0, 448)
    boxes = [[B("ship", 10, 10, 30, 30), B("ship", 100, 100, 130, 140)], [B("ship", 200, 50, 220, 70)]]
    one = scene_detections("S", UTM31, [a, b], boxes)
    two = scene_detections("S", UTM31, [a, b], [list(reversed(boxes[0])), boxes[1]])
    assert [d.detection_id for d in one] == [d.detection_id for d in two]
    assert len({d.detection_id for d in one}) == 3
    assert detection_id("S", "ship", 4.5, 43.6) != detection_id("T", "ship", 4.5, 43.6)


def test_deduplicate_prefers_higher_score():
    a = tile_at(0, 0)
    dets = scene_detections(
        "S", UTM31, [a], [[B("ship", 10, 10, 50, 50), B("ship", 12, 10, 52, 50)]], [[0.2, 0.9]]
    )
    assert len(dets) == 1 and dets[0].score == pytest.approx(0.9)
    assert deduplicate([]) == []


def test_scores_and_model_labels_stay_with_their_box_when_a_box_is_dropped():
    # the first box has no area after clipping and is dropped: the next boxes keep their own score/label
    a = tile_at(0, 0)
    boxes = [[B("ship", 600, 10, 650, 50), B("ship", 10, 10, 50, 50), B("ship", 200, 200, 240, 240)]]
    dets = scene_detections("S", UTM31, [a], boxes, [[0.1, 0.5, 0.7]], [["x", "vessel", "boat"]])
    by_col = sorted(dets, key=lambda d: d.center_px[1])
    assert [(d.score, d.model_label, d.label) for d in by_col] == [
        (0.5, "vessel", "ship"),
        (0.7, "boat", "ship"),
    ]
    assert all(d.model_label is None for d in scene_detections("S", UTM31, [a], boxes))


def test_known_answer_text_gives_expected_lonlat_polygons():
    from fusarbatch.model.prompts import parse_detection

    text = 'Sure.\n```json\n[{"bbox_2d": [100, 50, 140, 90], "label": "ship"}, {"bbox_2d": [400, 300, 430, 3'
    parsed = parse_detection(text, default_label="ship")
    assert len(parsed.value) == 1  # the truncated second object is dropped
    tile = tile_at(1000, 2000, size=504, res=10.0)
    [det] = scene_detections("S1", UTM31, [tile], [parsed.value])
    xs = [600000 + 10 * (2000 + c) for c in (100, 140, 140, 100)]
    ys = [4830000 - 10 * (1000 + r) for r in (50, 50, 90, 90)]
    lon, lat = Transformer.from_crs(UTM31, "EPSG:4326", always_xy=True).transform(xs, ys)
    np.testing.assert_allclose(
        np.asarray(det.geometry.exterior.coords)[:4], np.c_[lon, lat], atol=1e-7, rtol=0
    )
    assert 3.0 < det.geometry.centroid.x < 5.0 and 43.0 < det.geometry.centroid.y < 44.0


def test_min_score_drops_low_boxes_before_nms_and_keeps_answer_scores():
    # box 2 (score 0.4) overlaps box 1 (0.3) by IoU 0.9: with min_score 0.35 box 1 is gone before NMS,
    # so box 2 survives; box 3 has no score and goes at any positive threshold
    a = tile_at(0, 0)
    boxes = [[B("ship", 10, 10, 50, 50), B("ship", 12, 10, 52, 50), B("ship", 200, 200, 240, 240)]]
    scores, answer = [[0.3, 0.4, None]], [[1e-9, 1e-9, 2e-9]]
    everything = scene_detections("S", UTM31, [a], boxes, scores, answer_scores_per_tile=answer)
    assert sorted((d.score or 0, d.answer_score) for d in everything) == [(0, 2e-9), (0.4, 1e-9)]
    kept = scene_detections("S", UTM31, [a], boxes, scores, answer_scores_per_tile=answer, min_score=0.35)
    assert [(d.score, d.answer_score, d.center_px) for d in kept] == [(0.4, 1e-9, (30.0, 32.0))]
    assert scene_detections("S", UTM31, [a], boxes, scores, min_score=0.5) == []


def test_boxes_on_a_336_grid_are_scaled_by_tile_over_336():
    tile = tile_at(0, 0, size=504)
    [(_, poly, centre)] = boxes_to_polygons([B("ship", 168, 0, 336, 84)], tile, grid=336)
    assert centre == (63.0, 378.0)  # rows 0..126, cols 252..504 of the tile
    np.testing.assert_allclose(
        poly.bounds, (600000 + 2520, 4830000 - 1260, 600000 + 5040, 4830000), atol=1e-6
    )
