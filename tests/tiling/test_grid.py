"""Tile grid math: origins per axis, grids, per-tile affines."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from fusarbatch.tiling.grid import tile_grid, tile_origins, tile_transform, tile_transforms


@pytest.mark.parametrize("length", [1, 100, 503])
def test_axis_shorter_than_tile_gives_one_padded_tile(length):
    assert tile_origins(length, 504, 56) == [0]


def test_axis_equal_to_tile_gives_one_tile():
    assert tile_origins(504, 504, 56) == [0]


def test_axis_one_longer_than_tile_gives_two_tiles_one_pixel_apart():
    # two full-size tiles covering 505 px cannot be further apart
    assert tile_origins(505, 504, 56) == [0, 1]


def test_large_axis_hand_values():
    # L - T = 9496, ceil(9496 / 448) = 22 steps of 9496 / 22 = 431.6 px: floor(k * 9496 / 22)
    origins = tile_origins(10_000, 504, 56)
    assert origins[:4] == [0, 431, 863, 1294]
    assert origins[-2:] == [9064, 9496]
    assert len(origins) == 23


def test_one_pixel_past_a_stride_multiple_is_spread_not_shifted():
    # L - T = 2S + 1: the old grid put the last tile 1 px from its neighbour (0, 448, 896, 897)
    assert tile_origins(504 + 2 * 448 + 1, 504, 56) == [0, 299, 598, 897]


def test_last_origin_equal_to_a_stride_multiple_is_not_duplicated():
    # L - T = 2 * S exactly
    assert tile_origins(504 + 2 * 448, 504, 56) == [0, 448, 896]


@pytest.mark.parametrize(
    ("length", "size", "overlap"),
    [(505, 504, 56), (1000, 128, 16), (12_345, 504, 56), (999, 100, 0), (130, 64, 63), (4096, 512, 0)],
)
def test_invariants(length, size, overlap):
    origins = tile_origins(length, size, overlap)
    assert origins == sorted(set(origins))
    assert origins[0] == 0
    assert origins[-1] + size == length  # the last tile ends exactly at L
    gaps = np.diff(origins)
    assert (gaps <= size - overlap).all()  # neighbours overlap by >= O
    assert (gaps > 0).all()


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(1, 60_000),
    size=st.integers(2, 1024),
    overlap_share=st.floats(0.0, 0.95),
)
def test_property_full_size_tiles_cover_every_pixel_and_are_half_a_stride_apart(length, size, overlap_share):
    overlap = min(size - 1, int(size * overlap_share))
    stride = size - overlap
    origins = np.asarray(tile_origins(length, size, overlap))
    if length <= size:
        assert origins.tolist() == [0]
        return
    assert origins[0] == 0 and origins[-1] == length - size  # every tile full size, inside the axis
    gaps = np.diff(origins)
    assert (gaps <= stride).all()  # overlap >= O, so every pixel is covered
    assert (gaps >= min(stride // 2, length - size)).all()  # no two neighbours closer than half a stride
    assert len(origins) == -(-(length - size) // stride) + 1  # the fewest tiles with overlap >= O
    covered = np.zeros(length, bool)
    for o in origins:
        covered[o : o + size] = True
    assert covered.all()


@pytest.mark.parametrize(("size", "overlap"), [(56, 56), (10, 20), (504, -1), (0, 0)])
def test_invalid_tile_size_or_overlap_raises(size, overlap):
    with pytest.raises(ValueError, match=r"overlap|tile size"):
        tile_origins(1000, size, overlap)


def test_invalid_length_raises():
    with pytest.raises(ValueError, match="length"):
        tile_origins(0, 504, 56)


def test_grid_offsets_are_row_major():
    grid = tile_grid(700, 1000, 504, 56)
    assert grid.rows == (0, 196)
    assert grid.cols == (0, 248, 496)
    assert grid.n_tiles == 6
    assert grid.row_offsets.tolist() == [0, 0, 0, 196, 196, 196]
    assert grid.col_offsets.tolist() == [0, 248, 496, 0, 248, 496]
    assert grid.row_offsets.dtype == np.int64


def test_tile_transform_hand_values():
    scene = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_100_000.0)
    t = tile_transform(scene, row_off=196, col_off=448)
    assert tuple(t)[:6] == (10.0, 0.0, 504_480.0, 0.0, -10.0, 5_098_040.0)


def test_tile_transform_rotated_maps_same_point():
    scene = Affine(8.0, 3.0, 1000.0, 2.0, -9.0, 2000.0)  # rotated / sheared
    t = tile_transform(scene, row_off=7, col_off=11)
    for col, row in [(0, 0), (5.5, 3.25), (503, 503)]:
        assert np.allclose(t @ (col, row), scene @ (col + 11, row + 7), rtol=0, atol=1e-9)


def test_tile_transforms_array():
    scene = Affine(20.0, 0.0, 620_048.241204, 0.0, -20.0, 4_830_114.70107)
    out = tile_transforms(scene, np.array([0, 89]), np.array([140, 0]))
    assert out.shape == (2, 6) and out.dtype == np.float64
    assert out[0].tolist() == [20.0, 0.0, 620_048.241204 + 2800.0, 0.0, -20.0, 4_830_114.70107]
    assert out[1].tolist() == [20.0, 0.0, 620_048.241204, 0.0, -20.0, 4_830_114.70107 - 1780.0]
