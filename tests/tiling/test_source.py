"""Opening scenes lazily: grids, chunks, GCP warps, masks."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS

from fusarbatch.catalog.scene import BandRef
from fusarbatch.errors import SceneError
from fusarbatch.tiling import open_scene, tile_scene, utm_crs
from fusarbatch.tiling.source import gcp_centre_lonlat


@pytest.mark.parametrize(
    ("lon", "lat", "epsg"),
    [
        (4.5, 43.6, 32631),
        (33.6, -18.2, 32736),
        (-180.0, 10.0, 32601),
        (179.99, -1.0, 32760),
        (0.0, 0.0, 32631),
        (-0.01, -0.01, 32730),
        (360.0 + 3.0, 50.0, 32631),
    ],
)
def test_utm_zone(lon, lat, epsg):
    assert utm_crs(lon, lat) == CRS.from_epsg(epsg)


def test_gcp_centre_across_the_antimeridian():
    gcps = [
        GroundControlPoint(row=r, col=c, x=x, y=y)
        for r, c, x, y in [
            (0, 0, 179.0, -16.0),
            (0, 9, -179.4, -16.2),
            (9, 0, 179.2, -17.0),
            (9, 9, -179.2, -17.1),
        ]
    ]
    lon, lat = gcp_centre_lonlat(gcps, CRS.from_epsg(4326))
    assert lon == pytest.approx(179.9) and lat == pytest.approx(-16.55)
    assert utm_crs(lon, lat) == CRS.from_epsg(32760)


def test_gcp_centre_of_projected_gcps():
    gcps = [
        GroundControlPoint(row=0, col=0, x=500_000.0, y=0.0),
        GroundControlPoint(row=1, col=1, x=500_000.0, y=0.0),
    ]
    lon, lat = gcp_centre_lonlat(gcps, CRS.from_epsg(32633))  # UTM 33N origin: (15 E, 0 N)
    assert lon == pytest.approx(15.0) and lat == pytest.approx(0.0, abs=1e-9)


def test_open_is_lazy_and_chunks_follow_blocks(tmp_path, write_generated_tif, make_scene):
    data = np.random.default_rng(0).normal(size=(2, 700, 5000)).astype(np.float32)
    path = write_generated_tif("generated_blocks.tif", data, tiled=True, blockxsize=256, blockysize=256)
    scene = make_scene("generated-blocks", {"VV": BandRef(str(path), 1), "VH": BandRef(str(path), 2)})
    src = open_scene(scene, tile_size=300)
    assert isinstance(src.data, da.Array) and src.data.dtype == np.float32
    assert src.data.shape == (2, 700, 5000)
    # rows: whole blocks >= tile size (512); cols: whole blocks >= 2048 -> 2048
    assert src.data.chunks[0] == (2,) and src.data.chunks[1] == (512, 188)
    assert src.data.chunks[2] == (2048, 2048, 904)
    np.testing.assert_array_equal(src.data[:, 500:520, 2040:2060].compute(), data[:, 500:520, 2040:2060])


def test_strips_are_read_in_fixed_width_windows(tmp_path, write_generated_tif, make_scene):
    data = np.random.default_rng(4).normal(size=(1, 300, 3000)).astype(np.float32)
    path = write_generated_tif("generated_strips.tif", data, compress="deflate", blockysize=16)
    src = open_scene(make_scene("generated-strips", {"VV": path}), tile_size=100)
    assert src.data.chunks[1][0] == 112 and src.data.chunks[2] == (2048, 952)
    np.testing.assert_array_equal(src.data.compute(), data)


def test_internal_mask_band_is_nodata(tmp_path, make_scene):
    path = tmp_path / "generated_masked.tif"
    data = np.full((1, 40, 60), -11.0, dtype=np.float32)
    profile = dict(
        driver="GTiff",
        width=60,
        height=40,
        count=1,
        dtype="float32",
        crs="EPSG:32633",
        transform=Affine(10, 0, 0, 0, -10, 0),
    )
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        mask = np.full((40, 60), 255, dtype=np.uint8)
        mask[:, :15] = 0
        dst.write_mask(mask)
    src = open_scene(make_scene("generated-masked", {"VV": path}), tile_size=32)
    out = src.data.compute()
    assert np.isnan(out[0, :, :15]).all() and (out[0, :, 15:] == -11.0).all()


def _write_gcp_tif(path, data, gcps):
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype=data.dtype.name,
        nodata=0,
    )
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.gcps = (gcps, CRS.from_epsg(4326))
    return path


def _gcps(lon0, lat0, h, w, dlon=1e-3, dlat=-9e-4):
    return [
        GroundControlPoint(row=r, col=c, x=lon0 + c * dlon + r * 1e-4, y=lat0 + r * dlat + c * 5e-5)
        for r in (0, h / 2, h)
        for c in (0, w / 2, w)
    ]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gcp_pols_in_separate_files_sharing_gcps(tmp_path, make_scene):
    rng = np.random.default_rng(2)
    vv = rng.integers(1, 200, size=(1, 120, 90)).astype(np.uint16)
    vh = rng.integers(1, 200, size=(1, 120, 90)).astype(np.uint16)
    gcps = _gcps(-70.3, -33.4, 120, 90)
    p_vv = _write_gcp_tif(tmp_path / "generated_gcp_vv.tif", vv, gcps)
    p_vh = _write_gcp_tif(tmp_path / "generated_gcp_vh.tif", vh, gcps)
    scene = make_scene("generated-gcp-pair", {"VV": p_vv, "VH": p_vh}, scale="amplitude")
    src = open_scene(scene, tile_size=64)
    assert src.crs == CRS.from_epsg(32719)  # 70.3 W, 33.4 S
    assert src.warp is not None and [f["from"] for f in src.warp["files"]] == ["gcps", "gcps"]
    out = src.data.compute()
    assert np.isfinite(out).mean() > 0.5
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "ok" and result.n_tiles > 1


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gcp_pols_in_separate_files_on_different_grids_fail_clearly(tmp_path, make_scene):
    data = np.ones((1, 120, 90), dtype=np.uint16)
    p_vv = _write_gcp_tif(tmp_path / "generated_gcp_a.tif", data, _gcps(-70.3, -33.4, 120, 90))
    p_vh = _write_gcp_tif(tmp_path / "generated_gcp_b.tif", data, _gcps(-70.2, -33.3, 120, 90))
    scene = make_scene("generated-gcp-mismatch", {"VV": p_vv, "VH": p_vh}, scale="amplitude")
    with pytest.raises(SceneError, match="GCP-only file whose GCPs give another grid") as info:
        open_scene(scene, tile_size=64)
    assert str(p_vh) in str(info.value)
