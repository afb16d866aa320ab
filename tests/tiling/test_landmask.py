"""Sea/land triage with the GLOBE 1 km land mask of global-land-mask (read from the package's own file)."""

from __future__ import annotations

import numpy as np
import pytest

from fusarbatch.tiling.landmask import CELLS_PER_DEG, SKIP_REASONS, classify_tiles, ocean_rows, surface_skips

PX = 0.0005  # degrees per pixel of the EPSG:4326 test grids (~50 m); a 100 px tile is ~5 km


def _tile(lon0, lat0, size_px=100, px=PX):
    """Affine (a, b, c, d, e, f) of a north-up EPSG:4326 tile whose upper-left corner is (lon0, lat0)."""
    return (px, 0.0, lon0, 0.0, -px, lat0)


def test_open_sea_inland_and_coast_hand_places():
    transforms = np.array(
        [
            _tile(3.0, 55.0),  # North Sea, 150 km from any coast
            _tile(2.5, 46.5),  # central France
            _tile(5.33, 43.31),  # Marseille harbour: across the coast
        ]
    )
    assert classify_tiles("EPSG:4326", transforms, 100) == ["sea", "land", "coast"]


def test_a_land_tile_within_one_mask_cell_of_the_coast_is_coast():
    # around Marseille, find a land cell with an ocean neighbour and one whose 3 x 3 neighbourhood is land
    i0 = int((90 - 43.6) * CELLS_PER_DEG)
    rows = ocean_rows(i0, i0 + 60)
    j0 = int((5.0 + 180) * CELLS_PER_DEG)
    near = far = None
    for i in range(1, 59):
        for j in range(j0, j0 + 80):
            if rows[i, j]:
                continue
            ring = rows[i - 1 : i + 2, j - 1 : j + 2]
            if ring.any() and near is None:
                near = (i, j)
            if not rows[i - 2 : i + 3, j - 2 : j + 3].any() and far is None:
                far = (i, j)
    assert near is not None and far is not None

    def inside_cell(i, j):  # a 10 x 10 px tile in the middle of mask cell (i0 + i, j)
        lat = 90 - (i0 + i + 0.3) / CELLS_PER_DEG
        lon = -180 + (j + 0.3) / CELLS_PER_DEG
        return _tile(lon, lat, px=0.0003)

    assert classify_tiles("EPSG:4326", np.array([inside_cell(*near), inside_cell(*far)]), 10) == [
        "coast",
        "land",
    ]


def test_surface_skips_and_reasons():
    transforms = np.array([_tile(3.0, 55.0), _tile(2.5, 46.5), _tile(5.33, 43.31)])
    assert surface_skips("any", "EPSG:4326", transforms, 100, [0, 1, 2]) == {}
    assert surface_skips("sea", "EPSG:4326", transforms, 100, [0, 1, 2]) == {1: SKIP_REASONS["sea"]}
    assert surface_skips("land", "EPSG:4326", transforms, 100, [0, 2]) == {0: SKIP_REASONS["land"]}


@pytest.mark.parametrize(("lat", "lon", "ocean"), [(0.0, -30.0, True), (48.85, 2.35, False)])
def test_mask_rows_follow_the_package_indexing(lat, lon, ocean):
    i = int((90 - lat) * CELLS_PER_DEG)
    j = int((lon + 180) * CELLS_PER_DEG)
    assert bool(ocean_rows(i, i + 1)[0, j]) is ocean
