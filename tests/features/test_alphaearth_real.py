"""The AEF reader on REAL AlphaEarth data: a 10 x 10 px window of the 2024 layer, UTM 13N, stored bottom-up
(tests/data/aef_real, CC BY 4.0: "The AlphaEarth Foundations Satellite Embedding dataset is produced by
Google and Google DeepMind"; see its SOURCE.txt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from pyproj import Transformer

from fusarbatch.features.alphaearth import COGIndexSource, load_index

WINDOW = Path(__file__).resolve().parents[1] / "data" / "aef_real" / "aef_2024_13N_window.tif"
#: The window's geotransform (read once from the file, written here by hand): origin 418080 E, 4423680 N,
#: 10 m pixels, y pixel size POSITIVE: file row 0 is the SOUTHERN row.
ORIGIN_X, ORIGIN_Y, RES = 418_080.0, 4_423_680.0, 10.0
#: Raw int8 values of bands A00..A03 at known file pixels (row, col), read by hand with rasterio.
KNOWN_RAW = {
    (0, 0): (24, -58, 14, 41),  # south-west pixel
    (9, 0): (37, -58, -25, 34),  # north-west pixel
    (0, 9): (23, -59, -35, 32),  # south-east pixel
    (9, 9): (23, -59, -34, 26),  # north-east pixel
}


def _dequantised_by_hand(v: int) -> float:
    """Google's formula, written out: ((v / 127.5) ** 2) * sign(v)."""
    return (v / 127.5) ** 2 * (1 if v > 0 else -1 if v < 0 else 0)


@pytest.fixture(scope="module")
def real_source(tmp_path_factory) -> COGIndexSource:
    """An index (CSV, UTM bounds) listing the real window as the 2024 layer of zone 13N."""
    folder = tmp_path_factory.mktemp("aef_real_index")
    index = folder / "aef_index.csv"
    pd.DataFrame(
        {
            "path": [str(WINDOW)],
            "crs": ["EPSG:32613"],
            "year": [2024],
            "utm_zone": ["13N"],
            "utm_west": [ORIGIN_X],
            "utm_south": [ORIGIN_Y],
            "utm_east": [ORIGIN_X + 10 * RES],
            "utm_north": [ORIGIN_Y + 10 * RES],
        }
    ).to_csv(index, index=False)
    assert len(load_index(index)) == 1
    return COGIndexSource(str(index), max_workers=1)


def _lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return Transformer.from_crs("EPSG:32613", "EPSG:4326", always_xy=True).transform(x, y)


def test_fixture_is_the_committed_real_window():
    with rasterio.open(WINDOW) as src:
        assert (src.count, src.height, src.width, src.dtypes[0]) == (64, 10, 10, "int8")
        assert src.crs.to_epsg() == 32613 and src.nodata == -128
        assert tuple(src.transform)[:6] == (RES, 0.0, ORIGIN_X, 0.0, RES, ORIGIN_Y)  # bottom-up
        raw = src.read()
    for (row, col), values in KNOWN_RAW.items():
        assert tuple(int(v) for v in raw[:4, row, col]) == values


def test_every_pixel_is_a_unit_vector_equal_to_the_raw_pixel_by_hand(real_source):
    with rasterio.open(WINDOW) as src:
        raw = src.read().astype(np.int64)  # (64, row, col), row 0 = south
    rows, cols = np.meshgrid(np.arange(10), np.arange(10), indexing="ij")
    # pixel centres in map coordinates from the hand-written geotransform (y grows with the row)
    x = ORIGIN_X + (cols.ravel() + 0.5) * RES
    y = ORIGIN_Y + (rows.ravel() + 0.5) * RES
    lon, lat = _lonlat(x, y)
    features, mask = real_source.sample(lon, lat, 2024)
    assert mask.all()
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    assert norms.min() >= 0.99 and norms.max() <= 1.01
    expected = np.array(
        [
            [_dequantised_by_hand(int(v)) for v in raw[:, r, c]]
            for r, c in zip(rows.ravel(), cols.ravel(), strict=True)
        ]
    )
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-6)


def test_pixel_order_of_the_bottom_up_window(real_source):
    """The northernmost point reads the file's LAST row, the southernmost its FIRST (a reader that ignores
    the positive y pixel size would swap them)."""
    north = (ORIGIN_X + 0.5 * RES, ORIGIN_Y + 9.5 * RES)
    south = (ORIGIN_X + 0.5 * RES, ORIGIN_Y + 0.5 * RES)
    north_east = (ORIGIN_X + 9.5 * RES, ORIGIN_Y + 9.5 * RES)
    lon, lat = _lonlat(*zip(north, south, north_east, strict=True))
    assert lat[0] > lat[1]
    features, mask = real_source.sample(lon, lat, 2024)
    assert mask.all()
    for k, (row, col) in enumerate([(9, 0), (0, 0), (9, 9)]):
        by_hand = [_dequantised_by_hand(v) for v in KNOWN_RAW[(row, col)]]
        np.testing.assert_allclose(features[k, :4], by_hand, rtol=0, atol=1e-7)
    assert not np.allclose(features[0, :4], features[1, :4])  # north and south really differ


def test_points_outside_the_window_and_other_years(real_source):
    lon, lat = _lonlat(
        np.array([ORIGIN_X - 50.0, ORIGIN_X + 5.0]), np.array([ORIGIN_Y + 5.0, ORIGIN_Y - 50.0])
    )
    features, mask = real_source.sample(lon, lat, 2024)
    assert not mask.any() and not features.any()
    # the only layer is 2024: an acquisition in 2019 or 2030 reads it (clamped)
    inside_lon, inside_lat = _lonlat(np.array([ORIGIN_X + 5.0]), np.array([ORIGIN_Y + 5.0]))
    for year in (2019, 2030):
        assert real_source.layer_year(year) == 2024
        _, ok = real_source.sample(inside_lon, inside_lat, year)
        assert ok.all()
