"""Bottom-up rasters (positive y pixel size, row 0 at the south edge): tiles are stored north-up (``e < 0``)
and pixel-exact against the source, for a GeoTIFF, a VRT and GCP-only input (issue 10).

Every raster here is generated (the names say so).
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from fusarbatch.catalog.scene import BandRef
from fusarbatch.tiling import open_scene, tile_scene

#: A bottom-up grid: origin at the SOUTH-west corner, y pixel size +10 m (rows run northwards).
BOTTOM_UP = Affine(10.0, 0.0, 500_000.0, 0.0, 10.0, 5_000_000.0)


def _generated_values(bands: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Distinct dB-like values (every pixel differs, so a flipped or shifted read cannot pass)."""
    rng = np.random.default_rng(seed)
    base = np.arange(height * width, dtype=np.float32).reshape(height, width) / (height * width)
    return np.stack([-25.0 + 20.0 * base + rng.normal(0, 0.01, base.shape) + b for b in range(bands)]).astype(
        np.float32
    )


def _north_up(transform: Affine, height: int) -> Affine:
    """The same grid with row 0 at the north edge: ``transform @ (0, H)`` becomes the origin."""
    return transform @ Affine.translation(0, height) @ Affine.scale(1, -1)


def _check_north_up_and_exact(store, group, source_path, bands, size):
    """Every stored tile has ``e < 0``, tile row 0 is its northern edge, and each tile pixel's value is the
    source pixel whose footprint holds that tile pixel's centre (mapped through the SOURCE's own affine)."""
    g = zarr.open_group(str(store), path=group, mode="r")
    assert g.attrs["complete"] is True
    tiles = g["backscatter"][:]
    transforms = g["transform"][:]
    scene_transform = Affine(*g.attrs["scene_transform"])
    assert scene_transform.e < 0 and scene_transform.a > 0
    with rasterio.open(source_path) as src:
        raw = src.read(bands).astype(np.float32)
        inverse = ~src.transform
        height, width = src.height, src.width
    assert g.attrs["scene_shape"] == [height, width]
    checked = 0
    for k in range(tiles.shape[0]):
        affine = Affine(*transforms[k])
        assert affine.e < 0, f"tile {k} is stored bottom-up: {affine}"
        # the tile's first row lies north of its last row
        assert (affine @ (0, 0))[1] > (affine @ (0, size - 1))[1]
        rows, cols = np.nonzero(np.isfinite(tiles[k, 0]))
        for r, c in zip(rows, cols, strict=True):
            x, y = affine @ (c + 0.5, r + 0.5)
            sc, sr = inverse @ (x, y)
            assert abs(sc - round(sc - 0.5) - 0.5) < 1e-6 and abs(sr - round(sr - 0.5) - 0.5) < 1e-6
            np.testing.assert_array_equal(tiles[k, :, r, c], raw[:, int(sr), int(sc)].astype(tiles.dtype))
            checked += 1
    assert checked >= height * width  # every source pixel seen at least once (tiles overlap)
    return g


def test_bottom_up_geotiff_tiles_are_north_up_and_exact(tmp_path, write_generated_tif, make_scene):
    data = _generated_values(2, 150, 130)
    path = write_generated_tif("generated_bottom_up.tif", data, transform=BOTTOM_UP)
    scene = make_scene("generated-bottom-up", {"VV": BandRef(str(path), 1), "VH": BandRef(str(path), 2)})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "ok", result.error
    g = _check_north_up_and_exact(tmp_path / "tiles.zarr", scene.safe_id, path, [1, 2], 64)
    # the scene grid is the source grid turned north-up: same footprint, origin at the north-west corner
    assert np.allclose(g.attrs["scene_transform"], tuple(_north_up(BOTTOM_UP, 150))[:6], rtol=0, atol=1e-9)
    # tile 0 (north-west) starts with the source's LAST row
    np.testing.assert_array_equal(g["backscatter"][0, :, 0, :64], data[:, -1, :64].astype(np.float16))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the VRT's plain source
def test_bottom_up_vrt_tiles_are_north_up_and_exact(tmp_path, write_generated_tif, make_scene):
    data = _generated_values(1, 90, 110, seed=1)
    # the VRT flips nothing: it puts a positive y pixel size on plain pixels, as GDAL-written VRTs of
    # bottom-up products do
    tif = write_generated_tif("generated_plain.tif", data, transform=Affine.identity(), crs=None)
    vrt = tmp_path / "generated_bottom_up.vrt"
    vrt.write_text(
        f"""<VRTDataset rasterXSize="110" rasterYSize="90">
  <SRS>EPSG:32633</SRS>
  <GeoTransform>{BOTTOM_UP.c}, {BOTTOM_UP.a}, 0, {BOTTOM_UP.f}, 0, {BOTTOM_UP.e}</GeoTransform>
  <VRTRasterBand dataType="Float32" band="1">
    <SimpleSource>
      <SourceFilename relativeToVRT="1">{tif.name}</SourceFilename>
      <SourceBand>1</SourceBand>
      <SrcRect xOff="0" yOff="0" xSize="110" ySize="90"/>
      <DstRect xOff="0" yOff="0" xSize="110" ySize="90"/>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>
"""
    )
    with rasterio.open(vrt) as src:
        assert src.transform.e > 0  # the fixture really is bottom-up
    scene = make_scene("generated-bottom-up-vrt", {"VV": vrt})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=48, overlap=8)
    assert result.status == "ok", result.error
    _check_north_up_and_exact(tmp_path / "tiles.zarr", scene.safe_id, vrt, [1], 48)


def test_bottom_up_second_polarisation_is_flipped_exactly(tmp_path, write_generated_tif, make_scene):
    """VV north-up, VH the same grid stored bottom-up: VH is read flipped (exact), not resampled."""
    data = _generated_values(2, 70, 60, seed=2)
    vv = write_generated_tif("generated_vv_north_up.tif", data[:1], transform=_north_up(BOTTOM_UP, 70))
    vh = write_generated_tif("generated_vh_bottom_up.tif", data[1:, ::-1, :], transform=BOTTOM_UP)
    scene = make_scene("generated-mixed-orientation", {"VV": vv, "VH": vh})
    source = open_scene(scene, tile_size=32)
    assert source.warp is None  # nothing resampled
    np.testing.assert_array_equal(source.reader.read(0, 70, 0, 60), data)
    np.testing.assert_array_equal(source.reader.read(5, 17, 9, 40), data[:, 5:17, 9:40])


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gcp_raster_with_rows_running_north_is_warped_north_up(tmp_path, make_scene):
    """An ascending-pass GRD in radar geometry has row 0 at the south: the warp to UTM is north-up and
    equals GDAL's own warp of the file."""
    height, width = 80, 100
    data = _generated_values(1, height, width, seed=3)
    gcps = [
        GroundControlPoint(row=r, col=c, x=14.0 + c * 2e-4, y=45.0 + r * 1.5e-4)
        for r in (0, height / 2, height)
        for c in (0, width / 2, width)
    ]
    path = tmp_path / "generated_gcp_rows_north.tif"
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "float32"}
    with rasterio.open(path, "w", **profile, gcps=gcps, crs="EPSG:4326") as dst:
        dst.write(data)
    scene = make_scene("generated-gcp-rows-north", {"VV": path})
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "ok", result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    assert Affine(*g.attrs["scene_transform"]).e < 0
    assert all(Affine(*t).e < 0 for t in g["transform"][:])
    with (
        rasterio.open(path) as src,
        WarpedVRT(
            src,
            crs="EPSG:32633",
            resampling=Resampling.bilinear,
            tolerance=0.125,
            nodata=float("nan"),
            dtype="float32",
        ) as vrt,
    ):
        reference = vrt.read(1)
        assert vrt.transform.e < 0
    tiles = g["backscatter"][:]
    for k, (r0, c0) in enumerate(zip(g["row_off"][:], g["col_off"][:], strict=True)):
        h, w = min(64, reference.shape[0] - r0), min(64, reference.shape[1] - c0)
        np.testing.assert_array_equal(
            tiles[k, 0, :h, :w], reference[r0 : r0 + h, c0 : c0 + w].astype(tiles.dtype)
        )
    # north is up: the warped grid's first rows hold the source's LAST rows (the largest values)
    top = np.nanmean(reference[: reference.shape[0] // 4])
    bottom = np.nanmean(reference[-reference.shape[0] // 4 :])
    assert top > bottom
