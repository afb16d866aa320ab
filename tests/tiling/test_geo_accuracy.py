"""Geo-accuracy of the tile store: stored affines put every tile pixel where the source has it, and tile
values equal the source's (after the same dB conversion), for the real demo rasters and generated ones."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform as warp_points

from fusarbatch.catalog.scene import BandRef
from fusarbatch.tiling import tile_scene

SIZES = [pytest.param(128, 16, id="T128"), pytest.param(504, 56, id="T504")]


@pytest.mark.parametrize(("size", "overlap"), SIZES)
def test_demo_camargue_vv(tmp_path, demo_scenes, geo_check, read_ref, size, overlap):
    scene = demo_scenes["camargue"]
    path = scene.bands["VV"].href
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=size, overlap=overlap)
    assert result.status == "ok", result.error
    reference = read_ref(path, [1])  # raster nodata -99 -> NaN; already dB
    with rasterio.open(path) as src:
        n = geo_check(tmp_path / "tiles.zarr", scene.safe_id, reference, src.transform, src.crs)
    # 217 x 268 px: T=128/O=16 -> rows [0, 89], cols [0, 112, 140]; T=504 -> one padded tile
    assert n == result.n_tiles == (6 if size == 128 else 1)


@pytest.mark.parametrize(("size", "overlap"), SIZES)
def test_demo_sen12ms_dual_pol(tmp_path, demo_scenes, geo_check, read_ref, size, overlap):
    scene = demo_scenes["sen12ms"]
    assert scene.pols == ("VV", "VH")
    path = scene.bands["VV"].href
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=size, overlap=overlap)
    assert result.status == "ok", result.error
    reference = read_ref(path, [1, 2])
    with rasterio.open(path) as src:
        n = geo_check(tmp_path / "tiles.zarr", scene.safe_id, reference, src.transform, src.crs)
    assert n == (9 if size == 128 else 1)  # 256 x 256: origins [0, 112, 128] per axis at T=128


@pytest.mark.parametrize(("size", "overlap"), SIZES)
def test_demo_gcp_quicklook_warped_to_utm(tmp_path, demo_scenes, geo_check, size, overlap):
    scene = demo_scenes["quicklook"]
    path = scene.bands["VV"].href
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=size, overlap=overlap)
    assert result.status == "ok", result.error
    # The reference: the same warp, read directly with rasterio. Scene centre ~ (33.6 E, 18.2 S): UTM 36S.
    with rasterio.open(path) as src:
        gcps, gcps_crs = src.gcps
        assert src.crs is None and gcps
        with WarpedVRT(
            src,
            crs="EPSG:32736",
            resampling=Resampling.bilinear,
            tolerance=0.125,
            src_nodata=0,
            nodata=float("nan"),
            dtype="float32",
        ) as vrt:
            reference = vrt.read([1, 2])
            transform, crs = vrt.transform, vrt.crs
    reference[reference == 0] = np.nan  # the catalog's nodata (DN 0) applies to warped values too
    assert np.isnan(reference).mean() > 0.2  # the warped swath has empty corners, and DN 0 is nodata
    n = geo_check(tmp_path / "tiles.zarr", scene.safe_id, reference, transform, crs)
    assert n == result.n_tiles
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["units"] == "dn" and g.attrs["scale_in"] == "dn" and g.attrs["quantity"] == "dn"
    assert g.attrs["warp"]["files"][0]["from"] == "gcps"
    assert g.attrs["pols"] == ["VV", "VH"]
    # The warped grid covers the GCPs: each GCP's (lon, lat) lands inside the scene, near its GCP pixel
    # position scaled to the warped grid (within a few warped pixels: the warp is smooth, not identity).
    h, w = g.attrs["scene_shape"]
    xs, ys = warp_points(gcps_crs, "EPSG:32736", [p.x for p in gcps], [p.y for p in gcps])
    inverse = ~Affine(*g.attrs["scene_transform"])
    cols, rows = zip(*(inverse @ (x, y) for x, y in zip(xs, ys, strict=True)), strict=True)
    assert min(cols) >= -1 and max(cols) <= w + 1 and min(rows) >= -1 and max(rows) <= h + 1


def test_generated_power_dual_pol_converted_to_db(
    tmp_path, write_generated_tif, make_scene, geo_check, db_ref
):
    rng = np.random.default_rng(7)
    power = rng.gamma(4.4, 0.05 / 4.4, size=(2, 300, 260)).astype(np.float32)
    power[0, 5:9, 7:30] = 0.0  # zero power: no logarithm -> NaN
    power[1, 100, 100:140] = -1e-3  # negative (noise-subtracted) power -> NaN
    path = write_generated_tif(
        "generated_power.tif", power, tiled=True, blockxsize=64, blockysize=64, compress="deflate"
    )
    scene = make_scene(
        "generated-power", {"VV": BandRef(str(path), 1), "VH": BandRef(str(path), 2)}, scale="power"
    )
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok", result.error
    reference = db_ref(power, "power")
    assert -20 < np.nanmean(reference) < -10  # realistic sigma0 in dB
    with rasterio.open(path) as src:
        n = geo_check(tmp_path / "tiles.zarr", scene.safe_id, reference, src.transform, src.crs)
    assert n == 9
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["units"] == "dB" and g.attrs["scale_in"] == "power"
    assert g["backscatter"].attrs["units"] == "dB"


def test_generated_amplitude_uint16_rotated_grid(
    tmp_path, write_generated_tif, make_scene, geo_check, db_ref
):
    rng = np.random.default_rng(3)
    amp = rng.integers(0, 4000, size=(1, 200, 333)).astype(np.uint16)  # GRD-like DN amplitudes, 0 = nodata
    rotated = Affine(9.8, 1.2, 400_000.0, 1.5, -9.9, 6_000_000.0)  # sheared/rotated geotransform
    path = write_generated_tif("generated_amplitude.tif", amp, transform=rotated, nodata=0, crs="EPSG:32610")
    scene = make_scene("generated-amplitude", {"VV": path}, scale="amplitude")
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=96, overlap=8)
    assert result.status == "ok", result.error
    reference = db_ref(amp, "amplitude")  # 0 -> NaN both as nodata and as log(0)
    n = geo_check(tmp_path / "tiles.zarr", scene.safe_id, reference, rotated, "EPSG:32610")
    assert n == 3 * 4


def test_generated_nan_and_nodata_values(tmp_path, write_generated_tif, make_scene, geo_check):
    rng = np.random.default_rng(11)
    db = rng.normal(-14.0, 4.0, size=(2, 150, 170)).astype(np.float32)
    db[0, :20, :] = -9999.0  # raster nodata
    db[1, 40:50, 60:90] = np.nan  # NaN
    db[0, 70, 10:20] = -32768.0  # catalog nodata (raster:bands nodata), different from the raster's
    db[1, 80, 5:8] = np.inf
    path = write_generated_tif("generated_nodata.tif", db, nodata=-9999.0)
    scene = make_scene(
        "generated-nodata",
        {"VV": BandRef(str(path), 1, nodata=-32768.0), "VH": BandRef(str(path), 2, nodata=-32768.0)},
    )
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "ok", result.error
    reference = db.copy()
    reference[(db == -9999.0) | (db == -32768.0) | np.isinf(db)] = np.nan
    with rasterio.open(path) as src:
        geo_check(tmp_path / "tiles.zarr", scene.safe_id, reference, src.transform, src.crs)
    # valid fraction = pixels where both pols are finite
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    valid = np.isfinite(reference).all(axis=0)
    for k in range(g["row_off"].shape[0]):
        r, c = int(g["row_off"][k]), int(g["col_off"][k])
        assert g["valid_fraction"][k] == pytest.approx(valid[r : r + 64, c : c + 64].mean(), abs=1e-6)
    assert g["valid_fraction"][0] < 0.7  # the first tile holds the nodata rows


def test_generated_smaller_than_tile_is_padded(tmp_path, write_generated_tif, make_scene, geo_check):
    data = np.arange(2 * 160 * 130, dtype=np.float32).reshape(2, 160, 130) / 1000 - 30
    path = write_generated_tif("generated_small.tif", data)
    scene = make_scene("generated-small", {"VV": BandRef(str(path), 1), "VH": BandRef(str(path), 2)})
    result = tile_scene(scene, tmp_path / "tiles.zarr", min_valid=0.05)
    assert result.status == "ok" and result.n_tiles == 1 and result.n_inferable == 1
    with rasterio.open(path) as src:
        geo_check(tmp_path / "tiles.zarr", scene.safe_id, data, src.transform, src.crs)
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g["backscatter"].shape == (1, 2, 504, 504)
    assert g["valid_fraction"][0] == pytest.approx(160 * 130 / 504**2)  # 0.082
    # below the threshold (160 * 130 / 800**2 = 0.0325): stored but not inferable
    result = tile_scene(scene, tmp_path / "tiles.zarr", min_valid=0.05, tile_size=800, overlap=56)
    assert result.n_tiles == 1 and result.n_inferable == 0


def test_generated_vv_vh_in_separate_files(tmp_path, write_generated_tif, make_scene, geo_check):
    rng = np.random.default_rng(5)
    vv = rng.normal(-12, 3, size=(1, 140, 200)).astype(np.float32)
    vh = rng.normal(-19, 3, size=(1, 140, 200)).astype(np.float32)
    p_vv = write_generated_tif("generated_vv.tif", vv, tiled=True, blockxsize=32, blockysize=32)
    p_vh = write_generated_tif("generated_vh.tif", vh)  # striped, same grid
    scene = make_scene("generated-separate", {"VV": p_vv, "VH": p_vh})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=10)
    assert result.status == "ok", result.error
    with rasterio.open(p_vv) as src:
        geo_check(tmp_path / "tiles.zarr", scene.safe_id, np.concatenate([vv, vh]), src.transform, src.crs)
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["source_hrefs"] == [str(p_vv), str(p_vh)]
    assert g.attrs["warp"] is None


def test_generated_vh_on_another_grid_is_warped_onto_vv(tmp_path, write_generated_tif, make_scene, geo_check):
    rng = np.random.default_rng(9)
    vv = rng.normal(-12, 3, size=(1, 120, 150)).astype(np.float32)
    vh = rng.normal(-19, 3, size=(1, 70, 90)).astype(np.float32)
    vv_transform = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_100_000.0)
    vh_transform = Affine(20.0, 0.0, 499_995.0, 0.0, -20.0, 5_100_005.0)  # coarser, shifted
    p_vv = write_generated_tif("generated_vv_grid.tif", vv, transform=vv_transform)
    p_vh = write_generated_tif("generated_vh_other_grid.tif", vh, transform=vh_transform, nodata=-9999.0)
    scene = make_scene("generated-two-grids", {"VV": p_vv, "VH": p_vh})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "ok", result.error
    with (
        rasterio.open(p_vh) as src,
        WarpedVRT(
            src,
            crs="EPSG:32633",
            transform=vv_transform,
            width=150,
            height=120,
            resampling=Resampling.bilinear,
            tolerance=0.125,
            nodata=float("nan"),
            dtype="float32",
        ) as vrt,
    ):
        vh_on_vv = vrt.read([1])
    assert np.isfinite(vh_on_vv).mean() > 0.9
    geo_check(
        tmp_path / "tiles.zarr", scene.safe_id, np.concatenate([vv, vh_on_vv]), vv_transform, "EPSG:32633"
    )
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert g.attrs["warp"]["files"] == [{"href": str(p_vh), "from": "grid"}]
