"""``--prescreen cfar``: CFAR at the pre-screen threshold on stored tiles (real GeoTIFF, Zarr, Dask)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from distributed import Client

from fusarbatch.catalog.scene import BandRef, Scene
from fusarbatch.config import RunConfig
from fusarbatch.engines.prescreen import PRESCREEN_K, prescreen_skips
from fusarbatch.tiling import tile_scene


@pytest.fixture(scope="module")
def generated_sea_store(tmp_path_factory):
    """Two 504 px tiles of GENERATED 4.4-look sea speckle (10 m, dB); a 6 x 6 px ship (+15 dB) in the
    second."""
    tmp = tmp_path_factory.mktemp("prescreen")
    rng = np.random.default_rng(5)
    sigma0 = 0.02 * rng.gamma(4.4, 1 / 4.4, size=(504, 952))
    sigma0[250:256, 750:756] *= 10**1.5
    path = tmp / "generated_sea_ship.tif"
    profile = dict(driver="GTiff", height=504, width=952, count=1, dtype="float32", crs="EPSG:32631")
    with rasterio.open(path, "w", transform=Affine(10, 0, 500_000, 0, -10, 4_800_000), **profile) as dst:
        dst.write((10 * np.log10(sigma0)).astype(np.float32)[None])
    scene = Scene(
        item_id="generated-sea-ship",
        datetime=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        footprint=shapely.box(3.0, 43.3, 3.1, 43.4),
        bands={"VV": BandRef(str(path), 1)},
        scale="db",
        crs="EPSG:32631",
    )
    result = tile_scene(scene, tmp / "tiles.zarr", tile_size=504, overlap=56)
    assert result.status == "ok" and result.n_tiles == 2
    return tmp / "tiles.zarr", result.group


def _cfg(**kw):
    return RunConfig(aoi="a.geojson", start="2024-01", **kw)


def test_empty_sea_tile_is_skipped_and_the_ship_tile_goes_to_the_model(generated_sea_store):
    store, group = generated_sea_store
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        assert prescreen_skips(client, _cfg(), str(store), group, [0, 1]) == {}  # prescreen off
        skips = prescreen_skips(client, _cfg(prescreen="cfar"), str(store), group, [0, 1])
        assert skips == {0: f"no CFAR candidate at k = {PRESCREEN_K:g} (--prescreen cfar)"}
        # a threshold nothing reaches skips both
        strict = prescreen_skips(client, _cfg(prescreen="cfar", prescreen_k=1e6), str(store), group, [0, 1])
        assert sorted(strict) == [0, 1]


def test_prescreen_is_for_the_model_engine_and_in_the_output_hash():
    with pytest.raises(ValueError, match="prescreen"):
        _cfg(engine="cfar", prescreen="cfar")
    assert _cfg(prescreen="cfar").output_hash() != _cfg().output_hash()
    assert _cfg(prescreen="cfar").stage_hash("tile") == _cfg().stage_hash("tile")  # tiles reused
