"""``--engine cfar`` through the real pipeline: a GENERATED Sentinel-1-like scene (4.4-look speckle, bright
targets at known pixels) on the grid of the real SEN12MS demo scene (UTM 37S, 10 m), a real STAC
GeoParquet catalog, Zarr tiles, Dask and GeoParquet outputs. No model is loaded."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import rasterio
import shapely
from pyproj import Transformer

from fusarbatch.config import RunConfig
from fusarbatch.engines import ENGINES, open_engine
from fusarbatch.engines.cfar import CHIP_PARAMS
from fusarbatch.engines.cfar_run import CfarEngine
from fusarbatch.outputs.geoparquet import read_dataset
from fusarbatch.pipeline import run
from tests.conftest import REPO, demo_items_absolute

AOIS = REPO / "catalogs" / "demo" / "aois"
SEN12MS = "SEN12MS_ROIs1158_spring_s1_1_p30"
#: (row0, row1, col0, col1), end-exclusive, scene pixels: 40 x 100 m ships, 16 dB above the sea
TARGETS = [(50, 54, 60, 70), (150, 160, 180, 184), (200, 204, 30, 40)]


def _generated_scene(tmp_path, seed=3, targets=TARGETS):
    """The SEN12MS item pointing at a generated GeoTIFF on its grid: VV/VH sigma0 dB of 4.4-look speckle
    (-18 / -25 dB) with the TARGETS 16 dB brighter."""
    item = copy.deepcopy(next(i for i in demo_items_absolute() if i["id"] == SEN12MS))
    with rasterio.open(item["assets"]["sigma0"]["href"]) as src:
        profile = src.profile
    rng = np.random.default_rng(seed)
    bands = []
    for mean_db in (-18.0, -25.0):
        intensity = rng.gamma(4.4, 1 / 4.4, (256, 256)) * 10 ** (mean_db / 10)
        for r0, r1, c0, c1 in targets:
            intensity[r0:r1, c0:c1] *= 40.0
        bands.append(10 * np.log10(intensity))
    tif = tmp_path / "generated_sen12ms_targets.tif"
    with rasterio.open(tif, "w", **profile) as dst:
        dst.write(np.stack(bands).astype(np.float32))
    item["id"] = "generated_targets"
    item["assets"]["sigma0"]["href"] = str(tif)
    import stac_geoparquet.arrow as sga

    catalog = tmp_path / "generated_catalog.parquet"
    sga.to_parquet(sga.parse_stac_items_to_arrow([item]), catalog)
    return catalog, profile["transform"], profile["crs"]


def test_generated_targets_land_at_their_place_in_epsg4326(tmp_path):
    catalog, transform, crs = _generated_scene(tmp_path)
    cfg = RunConfig(
        aoi=AOIS / "sen12ms.geojson",
        start="2017-01",
        catalog=str(catalog),
        out=tmp_path / "out",
        engine="cfar",
        model=tmp_path / "no-model-here",  # never looked at
        quicklooks=False,
    )
    summary = run(cfg)
    assert [s.status for s in summary.scenes] == ["ok"], [s.error for s in summary.scenes]
    assert summary.model_id == "cfar"
    det = read_dataset(cfg.out, "detections")
    assert len(det) == len(TARGETS) and (det.model_id == "cfar").all() and det.model_label.isna().all()
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    for r0, r1, c0, c1 in TARGETS:
        # the box is the target grown by the pre-filter radius (1 px), on pixel edges
        box = ((c0 - 1, r0 - 1), (c1 + 1, r0 - 1), (c1 + 1, r1 + 1), (c0 - 1, r1 + 1))
        corners = [transform @ xy for xy in box]
        want = shapely.Polygon([to_ll.transform(x, y) for x, y in corners])
        match = [g for g in det.geometry if g.intersects(want)]
        assert len(match) == 1
        np.testing.assert_allclose(match[0].bounds, want.bounds, atol=1e-9)
    assert det.score.between(0, 1).all() and det.score.nunique() == len(TARGETS)  # one score per box
    counts = read_dataset(cfg.out, "counts")
    assert counts["count"].tolist() == [len(TARGETS)]
    tiles = read_dataset(cfg.out, "tiles")
    assert tiles.scene_class.isna().all() and (tiles.status == "ok").all() and tiles.error.isna().all()
    assert tiles.count_ship.sum() == len(TARGETS)

    # the ledger: the same configuration is skipped; a changed CFAR parameter redoes the scene
    again = run(cfg)
    assert again.skipped == ["generated_targets"] and not again.scenes
    stricter = run(cfg.model_copy(update={"cfar_k": 1000.0}))
    assert [s.scene_id for s in stricter.scenes] == ["generated_targets"]
    assert len(read_dataset(cfg.out, "detections")) == 0


def test_pure_speckle_scene_gives_no_detection(tmp_path):
    catalog, _, _ = _generated_scene(tmp_path, seed=11, targets=())
    cfg = RunConfig(
        aoi=AOIS / "sen12ms.geojson", start="2017-01", catalog=str(catalog), out=tmp_path / "o", engine="cfar"
    )
    summary = run(cfg)
    assert [s.status for s in summary.scenes] == ["ok"]
    assert read_dataset(cfg.out, "counts")["count"].tolist() == [0]


def test_windows_from_metres_and_a_window_larger_than_the_tile(caplog):
    cfg = RunConfig(aoi=AOIS / "sen12ms.geojson", start="2017-01", engine="cfar")
    engine = open_engine(cfg)
    assert isinstance(engine, CfarEngine) and engine.resources is None and engine.grid == 504
    p = engine.params_for((10.0, 10.0), (504, 504))
    assert (p.guard, p.background, p.k, p.min_area) == (81, 161, cfg.cfar_k, 20)
    assert (p.prefilter, p.open_size, p.close_size) == (
        CHIP_PARAMS.prefilter,
        CHIP_PARAMS.open_size,
        CHIP_PARAMS.close_size,
    )
    with caplog.at_level(logging.WARNING):
        big = engine.params_for((1.0, 1.0), (504, 504))  # 1601 px background in a 504 px tile
    assert (big.guard, big.background) == (251, 503)
    assert "shrunk" in caplog.text
    assert cfg.cfar_k == CHIP_PARAMS.k  # the run's default threshold is the one tuned on SSDD


def test_engine_registry_and_config_checks():
    from fusarbatch.errors import UsageError

    assert set(ENGINES) >= {"hf", "vllm", "cfar"}
    base = dict(aoi=AOIS / "sen12ms.geojson", start="2017-01")
    from fusarbatch.config import load_config

    with pytest.raises(UsageError, match="engine"):
        load_config(None, {**base, "engine": "yolo"})
    with pytest.raises(UsageError, match="one label"):
        load_config(None, {**base, "engine": "cfar", "labels": ("ship", "oil rig")})
    with pytest.raises(UsageError, match="larger than cfar_guard_m"):
        load_config(None, {**base, "cfar_guard_m": 900.0, "cfar_background_m": 800.0})
