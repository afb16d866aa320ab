"""The tile store: layout, several scenes, re-tiling, crash safety, bad inputs, xarray access."""

from __future__ import annotations

import datetime as dt
import os
import shutil

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr

from fusarbatch.catalog.scene import BandRef
from fusarbatch.tiling import scene_groups, tile_scene, tile_scenes


def _hidden_entries(store):
    return sorted(p.name for p in store.iterdir() if p.name.startswith("."))


def test_demo_scenes_and_dates_in_one_store(tmp_path, demo_scenes):
    store = tmp_path / "tiles.zarr"
    scenes = [demo_scenes["camargue"], demo_scenes["sen12ms"], demo_scenes["quicklook"]]
    results = tile_scenes(scenes, store, tile_size=128, overlap=16)
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    assert [r.n_tiles for r in results] == [6, 9, 24]  # quick-look warped grid: 457 x 586 px
    assert scene_groups(store) == sorted(s.safe_id for s in scenes)
    assert _hidden_entries(store) == []
    dates = []
    for scene, result in zip(scenes, results, strict=True):
        g = zarr.open_group(str(store), path=result.group, mode="r")
        assert g.attrs["complete"] is True and g.attrs["status"] == "ok"
        assert g.attrs["item_id"] == scene.item_id == result.scene_id
        assert g.attrs["tile_size"] == 128 and g.attrs["overlap"] == 16 and g.attrs["min_valid"] == 0.05
        assert g.attrs["n_tiles"] == result.n_tiles and g.attrs["n_inferable"] == result.n_inferable
        assert g.attrs["quantity"] == scene.quantity and g.attrs["source_hrefs"] == [scene.bands["VV"].href]
        assert g["backscatter"].chunks == (1, len(scene.pols), 128, 128)
        stored = np.float32 if g.attrs["units"] == "dn" else np.float16  # DN past 65504 stay float32
        assert g["backscatter"].dtype == stored and g["transform"].dtype == np.float64
        assert g.attrs["dtype"] == g["backscatter"].attrs["dtype"] == np.dtype(stored).name
        assert g["row_off"].dtype == np.int64 and g["valid_fraction"].dtype == np.float32
        assert g["backscatter"].metadata.dimension_names == ("tile", "pol", "y", "x")
        assert g["transform"].metadata.dimension_names == ("tile", "coef")
        assert result.n_inferable == int((g["valid_fraction"][:] >= 0.05).sum())
        dates.append(g.attrs["datetime"])
    assert dates == ["2015-03-09T17:30:17Z", "2017-03-01T00:00:00Z", "2021-01-19T03:16:53.799379Z"]


def test_xarray_opens_a_scene_group(tmp_path, demo_scenes):
    store = tmp_path / "tiles.zarr"
    scene = demo_scenes["sen12ms"]
    assert tile_scene(scene, store, tile_size=128, overlap=16).status == "ok"
    ds = xr.open_zarr(store, group=scene.safe_id, consolidated=False)
    assert ds["backscatter"].dims == ("tile", "pol", "y", "x")
    assert ds["backscatter"].shape == (9, 2, 128, 128)
    assert ds["transform"].dims == ("tile", "coef") and ds["valid_fraction"].dims == ("tile",)
    assert ds["row_off"].dtype == np.int64 and ds["row_off"].values.tolist() == [
        0,
        0,
        0,
        64,
        64,
        64,
        128,
        128,
        128,
    ]
    assert ds.attrs["pols"] == ["VV", "VH"] and ds["backscatter"].attrs["units"] == "dB"
    with rasterio.open(scene.bands["VV"].href) as src:
        window = src.read(window=((64, 192), (64, 192)))  # tile 4: spread origins 0, 64, 128
        np.testing.assert_array_equal(ds["backscatter"][4].values, window.astype(np.float16))


def test_retiling_replaces_the_group(tmp_path, write_generated_tif, make_scene):
    store = tmp_path / "tiles.zarr"
    data = np.full((1, 200, 200), -10.0, dtype=np.float32)
    path = write_generated_tif("generated_retile.tif", data)
    scene = make_scene("generated-retile", {"VV": path})
    first = tile_scene(scene, store, tile_size=64, overlap=8)
    assert first.n_tiles == 16
    data[:] = -20.0
    write_generated_tif("generated_retile.tif", data)
    second = tile_scene(scene, store, tile_size=128, overlap=16)
    assert second.status == "ok" and second.n_tiles == 4
    g = zarr.open_group(str(store), path=scene.safe_id, mode="r")
    assert g["backscatter"].shape == (4, 1, 128, 128)  # no tiles left from the first run
    assert set(np.unique(g["backscatter"][:])) == {-20.0}
    assert g.attrs["tile_size"] == 128
    assert scene_groups(store) == [scene.safe_id] and _hidden_entries(store) == []
    # the files of the old group are gone too (1 chunk per tile in backscatter/c/)
    assert len(list((store / scene.safe_id / "backscatter" / "c").rglob("*"))) - 4 * 3 == 4


def test_stale_partial_of_a_dead_process_is_removed_and_complete_is_false_there(
    tmp_path, write_generated_tif, make_scene
):
    store = tmp_path / "tiles.zarr"
    path = write_generated_tif("generated_stale.tif", np.zeros((1, 50, 50), dtype=np.float32))
    scene = make_scene("generated-stale", {"VV": path})
    assert tile_scene(scene, store, tile_size=32, overlap=4).status == "ok"
    # simulate a run killed while writing: a partial group of a process that no longer exists
    dead = 2**22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    shutil.copytree(store / scene.safe_id, store / f".{scene.safe_id}.partial-{dead}")
    shutil.copytree(store / scene.safe_id, store / f".{scene.safe_id}.old-{dead}")
    shutil.copytree(store / scene.safe_id, store / f".other.partial-{os.getpid()}")  # another scene's: kept
    zarr.open_group(str(store), path=f".{scene.safe_id}.partial-{dead}", mode="a").attrs["complete"] = False
    assert scene_groups(store) == [scene.safe_id]  # partial groups are not listed
    assert tile_scene(scene, store, tile_size=32, overlap=4).status == "ok"
    assert _hidden_entries(store) == [f".other.partial-{os.getpid()}"]


def _failed_with_good_neighbours(tmp_path, make_scene, write_generated_tif, bad_ref, needle):
    store = tmp_path / "tiles.zarr"
    good = write_generated_tif("generated_good.tif", np.full((2, 70, 90), -12.0, dtype=np.float32))
    scenes = [
        make_scene(
            "generated-good-1", {"VV": BandRef(str(good), 1)}, when=dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        ),
        make_scene("generated-bad", {"VV": BandRef(str(good), 1), "VH": bad_ref}),
        make_scene(
            "generated-good-2", {"VV": BandRef(str(good), 2)}, when=dt.datetime(2024, 2, 1, tzinfo=dt.UTC)
        ),
    ]
    results = tile_scenes(scenes, store, tile_size=64, overlap=8)
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    bad = results[1]
    assert bad.n_tiles == 0 and bad.error is not None
    assert "\n" not in bad.error
    assert bad_ref.href in bad.error, bad.error
    assert needle in bad.error, bad.error
    assert _hidden_entries(store) == []  # no partial group left behind
    marker = zarr.open_group(str(store), path="generated-bad", mode="r")
    assert marker.attrs["complete"] is False and marker.attrs["status"] == "failed"
    assert marker.attrs["error"] == bad.error
    assert list(marker.array_keys()) == []
    for r in (results[0], results[2]):
        g = zarr.open_group(str(store), path=r.group, mode="r")
        assert g.attrs["complete"] is True and r.n_tiles == 4
    return bad


def test_missing_file_fails_the_scene_only(tmp_path, make_scene, write_generated_tif):
    ref = BandRef(str(tmp_path / "nowhere" / "vh.tif"), 1)
    _failed_with_good_neighbours(tmp_path, make_scene, write_generated_tif, ref, "not found")


def test_corrupt_geotiff_fails_the_scene_only(tmp_path, make_scene, write_generated_tif):
    corrupt = tmp_path / "generated_corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + bytes(range(256)) * 40)  # TIFF magic, then garbage
    _failed_with_good_neighbours(
        tmp_path, make_scene, write_generated_tif, BandRef(str(corrupt), 1), "cannot"
    )


def test_truncated_geotiff_fails_while_reading_and_leaves_no_partial(
    tmp_path, make_scene, write_generated_tif
):
    rng = np.random.default_rng(0)
    path = write_generated_tif(
        "generated_truncated.tif",
        rng.normal(size=(1, 256, 256)).astype(np.float32),
        tiled=True,
        blockxsize=64,
        blockysize=64,
        compress="deflate",
    )
    size = path.stat().st_size
    with open(path, "r+b") as f:  # header and tile index intact, most tile data gone
        f.truncate(size // 3)
    with rasterio.open(path) as src:
        assert src.shape == (256, 256)  # the header still opens: the failure happens during the read
    bad = _failed_with_good_neighbours(
        tmp_path, make_scene, write_generated_tif, BandRef(str(path), 1), "Read failed"
    )
    assert bad.error.startswith("RasterioIOError: ")
    # GDAL's own cause follows: one decoding thread names the TIFF call, several the missing bytes
    assert "TIFFReadEncodedTile" in bad.error or "Cannot read" in bad.error, bad.error


def test_unreadable_file_fails_the_scene_only(tmp_path, make_scene, write_generated_tif):
    if os.geteuid() == 0:  # root reads chmod 000 files: use a path GDAL cannot read as a raster instead
        unreadable = tmp_path / "generated_dir.tif"
        unreadable.mkdir()
        needle = "directory"
    else:
        unreadable = write_generated_tif("generated_noperm.tif", np.zeros((1, 8, 8), dtype=np.float32))
        unreadable.chmod(0)
        needle = "permission denied"
    _failed_with_good_neighbours(
        tmp_path, make_scene, write_generated_tif, BandRef(str(unreadable), 1), needle
    )


def test_band_out_of_range_fails_the_scene_only(tmp_path, make_scene, write_generated_tif):
    one_band = write_generated_tif("generated_one_band.tif", np.zeros((1, 70, 90), dtype=np.float32))
    bad = _failed_with_good_neighbours(
        tmp_path, make_scene, write_generated_tif, BandRef(str(one_band), 2), "band 2"
    )
    assert "1 band" in bad.error


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_not_georeferenced_fails(tmp_path, make_scene):
    path = tmp_path / "generated_plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=1, dtype="float32") as dst:
        dst.write(np.zeros((1, 30, 40), dtype=np.float32))
    result = tile_scene(
        make_scene("generated-plain", {"VV": path}), tmp_path / "tiles.zarr", tile_size=32, overlap=4
    )
    assert result.status == "failed" and "not georeferenced" in result.error and str(path) in result.error


def test_ids_that_sanitise_alike_get_distinct_groups(tmp_path, make_scene, write_generated_tif):
    path = write_generated_tif("generated_collision.tif", np.zeros((1, 40, 40), dtype=np.float32))
    a = make_scene("S1/abc", {"VV": path})
    b = make_scene("S1:abc", {"VV": path})
    reserved = make_scene("zarr.json", {"VV": path})
    assert a.safe_id != b.safe_id and a.safe_id.startswith("S1_abc-") and b.safe_id.startswith("S1_abc-")
    assert reserved.safe_id.startswith("zarr.json-")
    results = tile_scenes([a, b, reserved], tmp_path / "tiles.zarr", tile_size=32, overlap=4)
    assert [r.status for r in results] == ["ok", "ok", "ok"]
    for scene in (a, b, reserved):
        g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
        assert g.attrs["item_id"] == scene.item_id and g.attrs["complete"] is True
    # the store's own metadata survived the item called "zarr.json"
    assert zarr.open_group(str(tmp_path / "tiles.zarr"), mode="r") is not None


def test_invalid_parameters_raise(tmp_path, demo_scenes):
    with pytest.raises(ValueError, match="must be smaller than --tile-size 32"):
        tile_scenes([demo_scenes["camargue"]], tmp_path / "tiles.zarr", tile_size=32, overlap=32)
    with pytest.raises(ValueError, match="min_valid"):
        tile_scene(demo_scenes["camargue"], tmp_path / "tiles.zarr", min_valid=1.5)
    assert not (tmp_path / "tiles.zarr").exists()


def test_runs_on_an_active_distributed_client(tmp_path, demo_scenes):
    distributed = pytest.importorskip("distributed")
    scene = demo_scenes["sen12ms"]
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster),
    ):
        result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok" and result.n_tiles == 9
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    with rasterio.open(scene.bands["VV"].href) as src:
        window = src.read(window=((128, 256), (128, 256)))
        np.testing.assert_array_equal(g["backscatter"][8], window.astype(np.float16))


# ---- bounds and lost outputs (issue 10) -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_header_with_absurd_dimensions_is_refused_before_any_task(tmp_path, write_generated_tif, make_scene):
    """A VRT whose header claims 1e9 x 1e9 pixels (over a real 64 x 64 GeoTIFF): refused from the header
    (5e12 tiles), before the grid, the arrays or any task exist."""
    small = write_generated_tif("generated_small.tif", np.zeros((1, 64, 64), dtype=np.float32))
    vrt = tmp_path / "generated_huge.vrt"
    vrt.write_text(
        f"""<VRTDataset rasterXSize="1000000000" rasterYSize="1000000000">
  <SRS>EPSG:32633</SRS>
  <GeoTransform>500000, 10, 0, 5100000, 0, -10</GeoTransform>
  <VRTRasterBand dataType="Float32" band="1">
    <SimpleSource><SourceFilename>{small}</SourceFilename><SourceBand>1</SourceBand>
      <SrcRect xOff="0" yOff="0" xSize="64" ySize="64"/><DstRect xOff="0" yOff="0" xSize="64" ySize="64"/>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>"""
    )
    store = tmp_path / "tiles.zarr"
    result = tile_scene(make_scene("generated-huge", {"VV": vrt}), store)
    assert result.status == "failed"
    assert result.error == (
        f"{vrt}: its header claims 1000000000 x 1000000000 pixels, 4982462372449 tiles of 504 px, more than "
        "--max-tiles 100000; check the raster (a broken header?) or raise --max-tiles"
    )
    assert _hidden_entries(store) == []


def test_max_tiles_is_the_exact_tile_count_and_overridable(tmp_path, write_generated_tif, make_scene):
    path = write_generated_tif("generated_300.tif", np.zeros((1, 300, 300), dtype=np.float32))
    scene = make_scene("generated-300", {"VV": path})
    refused = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8, max_tiles=35)
    assert refused.status == "failed" and "36 tiles of 64 px, more than --max-tiles 35" in refused.error
    done = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8, max_tiles=36)
    assert done.status == "ok" and done.n_tiles == 36


_RETILE_UNDER_FILE_LIMIT = """
import json, resource, sys
from fusarbatch.catalog.scene import BandRef, Scene
from fusarbatch.tiling import tile_scene
import datetime as dt, shapely
resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))  # a ~30 kB float16 chunk of noise cannot be
scene = Scene("generated-full", dt.datetime(2024, 1, 1, tzinfo=dt.UTC), shapely.box(14, 45, 15, 46),
              {"VV": BandRef(sys.argv[2])}, crs="EPSG:32633")
r = tile_scene(scene, sys.argv[1], tile_size=128, overlap=16)
print(json.dumps({"status": r.status, "error": r.error}))
"""


def test_a_failed_redo_keeps_the_complete_group_and_says_disk_full(tmp_path, write_generated_tif, make_scene):
    """The disk fills up (RLIMIT_FSIZE in a subprocess: writes fail with EFBIG, File too large) while a
    complete scene is tiled again: the failure says "disk full", and the complete group stays as it was
    (a failure marker replaced it before)."""
    import json
    import subprocess
    import sys

    # noise: its float16 + zstd chunks stay ~30 kB (a constant image would compress below the limit)
    noise = np.random.default_rng(0).normal(-15.0, 5.0, (1, 200, 200)).astype(np.float32)
    path = write_generated_tif("generated_full.tif", noise)
    store = tmp_path / "tiles.zarr"
    assert (
        tile_scene(make_scene("generated-full", {"VV": path}), store, tile_size=128, overlap=16).status
        == "ok"
    )
    before = zarr.open_group(str(store), path="generated-full", mode="r")["backscatter"][:]
    proc = subprocess.run(
        [sys.executable, "-c", _RETILE_UNDER_FILE_LIMIT, str(store), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "failed"
    assert result["error"] == (
        "disk full: file-size limit reached (File too large) while writing the tile store; free space, "
        "then rerun (earlier outputs are kept)"
    )
    g = zarr.open_group(str(store), path="generated-full", mode="r")
    assert g.attrs["complete"] is True and g.attrs["status"] == "ok"
    np.testing.assert_array_equal(g["backscatter"][:], before)
    assert _hidden_entries(store) == []


def test_valid_fraction_float16_bit_test_matches_isfinite() -> None:
    """The float16 exponent-bit test counts exactly the pixels np.isfinite counts (NaN, +inf, -inf, the
    largest finite value 65504 and subnormals included), per tile; a pixel is valid when every pol is."""
    from fusarbatch.tiling.store import _valid_fraction_block

    rng = np.random.default_rng(3)
    block = (rng.standard_normal((3, 2, 8, 8)) * 20).astype(np.float32)
    block[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, 65504.0]
    block[1, 1, 2:5, :] = np.nan  # one pol invalid is enough
    block[2, 0, 7, 7] = 1e-7  # a float16 subnormal: finite
    expected = np.isfinite(block).all(axis=1).reshape(3, -1).mean(axis=1)
    assert expected.tolist() == pytest.approx([61 / 64, 40 / 64, 1.0])
    for dtype in (np.float32, np.float16):
        got = _valid_fraction_block(block.astype(dtype))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected.astype(np.float32))
