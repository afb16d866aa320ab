"""Radiometric calibration of GRD digital numbers with a REAL Sentinel-1 calibration annotation
(tests/data/s1_calibration, Apache-2.0, from xarray-sentinel's test data; see its SOURCE.txt) paired with
GENERATED digital-number rasters (their names say so). Expected values are computed by hand here: the LUT
parsed with ElementTree, bilinear interpolation written out, sigma0 = DN^2 / A^2."""

from __future__ import annotations

import dataclasses
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.enums import Resampling
from rasterio.transform import GCPTransformer
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_points
from rasterio.windows import Window

from fusarbatch.tiling import open_scene, tile_scene
from fusarbatch.tiling.scaling import prepare_radiometry

XML = (
    Path(__file__).resolve().parents[1]
    / "data"
    / "s1_calibration"
    / "calibration-s1b-iw1-slc-vv-20210401t052624-20210401t052649-026269-032297-004.xml"
)
#: The LUT's extent (read from the annotation by hand): lines -1042..14661, pixels 0..21631.
LINES, PIXELS = 14662, 21632
UTM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)


def _lut_by_hand(name: str = "sigmaNought") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    root = ET.parse(XML).getroot()
    lines, pixels, values = [], None, []
    for vector in root.iter("calibrationVector"):
        lines.append(int(vector.findtext("line")))
        pixels = np.array(vector.findtext("pixel").split(), dtype=float)
        values.append(np.array(vector.findtext(name).split(), dtype=float))
    return np.array(lines, dtype=float), pixels, np.array(values)


def _a_by_hand(line: float, pixel: float, lut=None) -> float:
    """Bilinear interpolation of the LUT at (line, pixel), written out."""
    lines, pixels, values = lut or _lut_by_hand()
    i = min(max(int(np.searchsorted(lines, line, side="right")) - 1, 0), len(lines) - 2)
    j = min(max(int(np.searchsorted(pixels, pixel, side="right")) - 1, 0), len(pixels) - 2)
    t = (line - lines[i]) / (lines[i + 1] - lines[i])
    u = (pixel - pixels[j]) / (pixels[j + 1] - pixels[j])
    return float(
        (1 - t) * (1 - u) * values[i, j]
        + t * (1 - u) * values[i + 1, j]
        + (1 - t) * u * values[i, j + 1]
        + t * u * values[i + 1, j + 1]
    )


def _dn(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The generated digital numbers: 100..499, distinct along rows and columns."""
    return (100 + (rows * 7 + cols * 3) % 400).astype(np.uint16)


def _grd_scene(make_scene, path, *, item_id="generated-grd-dn", pols=("VV",), calibration=None, scale="dn"):
    scene = make_scene(item_id, {pol: path for pol in pols}, scale=scale, quantity="sigma0")
    cal = {pol: str(XML) for pol in pols} if calibration is None else calibration
    return dataclasses.replace(scene, calibration=cal)


#: Windows of the full-extent raster that hold digital numbers (rows, cols); the rest is never written.
WINDOWS = [(0, 0), (7000, 10000), (LINES - 512, PIXELS - 512)]


@pytest.fixture(scope="module")
def generated_full_extent_dn(tmp_path_factory) -> Path:
    """A sparse uint16 GeoTIFF of the LUT's full extent (14662 x 21632), DN written in three 512 px blocks."""
    path = tmp_path_factory.mktemp("grd") / "generated_grd_dn_full_extent.tif"
    profile = {
        "driver": "GTiff",
        "height": LINES,
        "width": PIXELS,
        "count": 1,
        "dtype": "uint16",
        "crs": "EPSG:32631",
        "transform": UTM,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "sparse_ok": True,
    }
    with rasterio.open(path, "w", **profile) as dst:
        for r0, c0 in WINDOWS:
            rows, cols = np.mgrid[r0 : r0 + 512, c0 : c0 + 512]
            dst.write(_dn(rows, cols)[None], window=Window(c0, r0, 512, 512))
    return path


def test_sigma0_of_a_full_extent_grd_against_hand_computation(generated_full_extent_dn, make_scene):
    scene = _grd_scene(make_scene, generated_full_extent_dn)
    radiometry = prepare_radiometry(scene, open_scene(scene))
    assert radiometry.scale == "power" and radiometry.quantity == "sigma0"
    reader = radiometry.source.reader
    lut = _lut_by_hand()
    # corners of the raster, points between LUT nodes in both directions, first lines (node at -1042)
    points = [(0, 0), (0, 511), (91, 40), (300, 45), (7100, 10001), (7511, 10511), (LINES - 1, PIXELS - 1)]
    points += [(LINES - 300, PIXELS - 21), (LINES - 512, PIXELS - 512)]
    for line, pixel in points:
        value = reader.read(line, line + 1, pixel, pixel + 1)[0, 0, 0]
        dn = float(_dn(np.array(line), np.array(pixel)))
        expected = dn**2 / _a_by_hand(line, pixel, lut) ** 2
        assert value == pytest.approx(expected, rel=1e-5), (line, pixel)
    # a whole window at once equals the point reads (the LUT is interpolated per row and column)
    window = reader.read(7000, 7040, 10000, 10030)[0]
    rows, cols = np.mgrid[7000:7040, 10000:10030]
    a = np.array([[_a_by_hand(r, c, lut) for c in range(10000, 10030)] for r in range(7000, 7040)])
    np.testing.assert_allclose(window, _dn(rows, cols).astype(float) ** 2 / a**2, rtol=1e-5)
    # sigma0 of DN 100..499 over A ~ 320 is -10..+4 dB (a generated raster, not a real scene)
    assert 10 * math.log10(float(np.min(window))) > -11 and 10 * math.log10(float(np.max(window))) < 5


def test_tiled_grd_is_stored_as_sigma0_db_with_its_calibration_recorded(
    tmp_path, write_generated_tif, make_scene
):
    rows, cols = np.mgrid[0:300, 0:400]
    path = write_generated_tif("generated_grd_dn_crop.tif", _dn(rows, cols), crs="EPSG:32631", transform=UTM)
    scene = _grd_scene(make_scene, path)
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok", result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert (g.attrs["quantity"], g.attrs["units"], g.attrs["scale_in"]) == ("sigma0", "dB", "dn")
    cal = g.attrs["calibration"]
    assert cal["luts"]["VV"]["href"] == str(XML) and cal["luts"]["VV"]["lut"] == "sigmaNought"
    assert cal["noise_removed"] is False and g.attrs["scale_detected"] is None
    tiles, row_off, col_off = g["backscatter"][:], g["row_off"][:], g["col_off"][:]
    lut = _lut_by_hand()
    for k, r, c in [(0, 5, 7), (1, 100, 3), (len(tiles) - 1, 127, 127)]:
        line, pixel = int(row_off[k]) + r, int(col_off[k]) + c
        expected = 10 * math.log10(
            float(_dn(np.array(line), np.array(pixel))) ** 2 / _a_by_hand(line, pixel, lut) ** 2
        )
        assert tiles[k, 0, r, c] == pytest.approx(expected, abs=1e-4)


def test_undeclared_integer_dn_with_annotation_are_detected_and_calibrated(
    tmp_path, write_generated_tif, make_scene
):
    rows, cols = np.mgrid[0:200, 0:260]
    path = write_generated_tif(
        "generated_grd_dn_undeclared.tif", _dn(rows, cols), crs="EPSG:32631", transform=UTM
    )
    scene = _grd_scene(make_scene, path, scale="")
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok", result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["scale_detected"]["scale"] == "dn"
    assert "digital numbers" in g.attrs["scale_detected"]["reason"]
    assert g.attrs["calibration"]["luts"]["VV"]["lut"] == "sigmaNought" and g.attrs["units"] == "dB"
    assert np.nanmax(g["backscatter"][:]) < 10  # sigma0 dB, not 20*log10(DN) = 40..54


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gcp_only_grd_is_calibrated_at_the_line_and_pixel_its_gcps_give(tmp_path, make_scene):
    height, width = 120, 160
    rows, cols = np.mgrid[0:height, 0:width]
    gcps = [
        GroundControlPoint(row=r, col=c, x=4.40 + c * 1.3e-4 + r * 2e-5, y=43.60 - r * 1.1e-4 + c * 1e-5)
        for r in (0, height / 2, height)
        for c in (0, width / 2, width)
    ]
    path = tmp_path / "generated_grd_dn_gcps.tif"
    profile = {
        "driver": "GTiff",
        "height": height,
        "width": width,
        "count": 1,
        "dtype": "uint16",
        "nodata": 0,
    }
    with rasterio.open(path, "w", **profile, gcps=gcps, crs="EPSG:4326") as dst:
        dst.write(_dn(rows, cols)[None])
    scene = _grd_scene(make_scene, path)
    source = open_scene(scene)
    radiometry = prepare_radiometry(scene, source)
    values = radiometry.source.reader.read(0, source.height, 0, source.width)[0]
    with (
        rasterio.open(path) as src,
        WarpedVRT(
            src,
            crs=source.crs,
            resampling=Resampling.bilinear,
            tolerance=0.125,
            src_nodata=0,
            nodata=float("nan"),
            dtype="float32",
        ) as vrt,
    ):
        warped_dn = vrt.read(1)
        assert vrt.transform.almost_equals(source.transform)
    to_gcp = GCPTransformer(gcps)
    lut = _lut_by_hand()
    checked = 0
    for r, c in [(10, 10), (40, 77), (source.height // 2, source.width // 2), (source.height - 20, 30)]:
        if not np.isfinite(warped_dn[r, c]):
            continue
        x, y = source.transform @ (c + 0.5, r + 0.5)
        lon, lat = warp_points(source.crs, "EPSG:4326", [x], [y])
        src_row, src_col = to_gcp.rowcol(lon, lat, op=lambda v: v)
        a = _a_by_hand(float(np.ravel(src_row)[0]) - 0.5, float(np.ravel(src_col)[0]) - 0.5, lut)
        assert values[r, c] == pytest.approx(float(warped_dn[r, c]) ** 2 / a**2, rel=1e-4), (r, c)
        checked += 1
    assert checked >= 3
    assert np.isnan(values[~np.isfinite(warped_dn)]).all()


def test_grd_dn_without_calibration_asset_fails_with_one_line(tmp_path, write_generated_tif, make_scene):
    rows, cols = np.mgrid[0:64, 0:64]
    path = write_generated_tif(
        "generated_grd_dn_no_cal.tif", _dn(rows, cols), crs="EPSG:32631", transform=UTM
    )
    scene = _grd_scene(make_scene, path, calibration={})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "failed"
    assert "\n" not in result.error
    assert "'generated-grd-dn'" in result.error and "'schema-calibration-vv'" in result.error
    assert 'quantity = "dn"' in result.error  # the way out


def test_calibration_annotation_of_another_polarisation_or_extent_fails(
    tmp_path, write_generated_tif, make_scene
):
    rows, cols = np.mgrid[0:64, 0:64]
    path = write_generated_tif("generated_grd_dn_vh.tif", _dn(rows, cols), crs="EPSG:32631", transform=UTM)
    scene = _grd_scene(make_scene, path, pols=("VH",))  # the annotation is VV's
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "failed" and "calibration annotation of VV, given for VH" in result.error
    wide = write_generated_tif(
        "generated_grd_dn_too_wide.tif",
        np.ones((1, 4, PIXELS + 10), np.uint16),
        crs="EPSG:32631",
        transform=UTM,
    )
    result = tile_scene(_grd_scene(make_scene, wide, item_id="generated-wide"), tmp_path / "tiles.zarr")
    assert result.status == "failed" and "pixels 0..21631" in result.error and "not its LUT" in result.error


def test_bottom_up_grd_is_calibrated_at_its_own_lines(tmp_path, write_generated_tif, make_scene):
    """Stored bottom-up, the scene's first row is the raster's LAST line: the LUT is read there."""
    rows, cols = np.mgrid[0:200, 0:150]
    bottom_up = Affine(10.0, 0.0, 500_000.0, 0.0, 10.0, 5_000_000.0)
    path = write_generated_tif(
        "generated_grd_dn_bottom_up.tif", _dn(rows, cols), crs="EPSG:32631", transform=bottom_up
    )
    scene = _grd_scene(make_scene, path)
    reader = prepare_radiometry(scene, open_scene(scene)).source.reader
    lut = _lut_by_hand()
    for r, c in [(0, 0), (0, 149), (57, 33), (199, 0)]:
        line = 199 - r  # north-up scene row r is raster line 199 - r
        expected = float(_dn(np.array(line), np.array(c))) ** 2 / _a_by_hand(line, c, lut) ** 2
        assert reader.read(r, r + 1, c, c + 1)[0, 0, 0] == pytest.approx(expected, rel=1e-5), (r, c)


def test_off_grid_file_locates_its_rows_through_its_geotransform():
    from rasterio.crs import CRS

    from fusarbatch.tiling.source import _Locate

    shifted = Affine(10.0, 0.0, 500_035.0, 0.0, -10.0, 4_999_980.0)
    locate = _Locate(CRS.from_epsg(32631), CRS.from_epsg(32631), transform=shifted)
    rows, cols = locate(
        np.array([500_035.0 + 5.0, 500_035.0 + 105.0]), np.array([4_999_980.0 - 5.0, 4_999_980.0 - 205.0])
    )
    np.testing.assert_allclose(rows, [0.5, 20.5])
    np.testing.assert_allclose(cols, [0.5, 10.5])
