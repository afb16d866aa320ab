"""Scene.from_item on real Sentinel-1 STAC Items (stactools, Planetary Computer) and the demo catalog."""

from __future__ import annotations

import datetime as dt

import pytest
from conftest import DEMO_DIR, REAL_EW_ITEM, REAL_IW_ITEM, REAL_PC_ITEM, demo_items_absolute, load_json

from fusarbatch.catalog.scene import Scene
from fusarbatch.catalog.spec import CatalogSpec, resolve_catalog
from fusarbatch.errors import CatalogError

ANY = CatalogSpec(name="generated-any", kind="api", href="http://127.0.0.1:9/")


def test_iw_grd_dual_pol_vv_vh():
    scene = Scene.from_item(load_json(REAL_IW_ITEM), ANY)
    assert scene.item_id == "S1A_IW_GRDH_1SDV_20210809T173953_20210809T174018_039156_049F13"
    assert scene.pols == ("VV", "VH")
    assert scene.datetime == dt.datetime(2021, 8, 9, 17, 40, 5, 653288, tzinfo=dt.UTC)
    assert (scene.platform, scene.orbit_direction, scene.product_type) == ("sentinel-1a", "ascending", "GRD")
    assert scene.crs == "EPSG:4326"  # proj:epsg 4326 in the item
    assert scene.collection == "sentinel1-grd"
    assert scene.bands["VV"].href.endswith(
        "measurement/s1a-iw-grd-vv-20210809t173953-20210809t174018-039156-049f13-001.tiff"
    )
    assert scene.bands["VH"].href.endswith("-002.tiff")
    assert scene.bands["VV"].band == 1
    assert (scene.quantity, scene.scale) == ("sigma0", "db")  # the spec's defaults: the item says nothing
    assert scene.footprint.bounds == pytest.approx((1.512143, 44.536255, 5.188996, 46.436539))


def test_ew_grd_dual_pol_hh_hv():
    scene = Scene.from_item(load_json(REAL_EW_ITEM), ANY)
    assert scene.pols == ("HH", "HV")
    assert scene.datetime == dt.datetime(2022, 11, 30, 1, 44, 14, 692855, tzinfo=dt.UTC)
    assert (scene.platform, scene.orbit_direction) == ("sentinel-1a", "descending")
    assert scene.bands["HH"].href.endswith("measurement/ew-hh.tiff")
    assert scene.bands["HV"].href.endswith("measurement/ew-hv.tiff")


def test_planetary_computer_raw_item():
    item = load_json(REAL_PC_ITEM)
    assert item["properties"]["platform"] == "SENTINEL-1A"
    scene = Scene.from_item(item, ANY)
    assert scene.item_id == "S1A_IW_GRDH_1SDV_20230628T210705_20230628T210730_049191_05EA4D_21D1"
    assert scene.platform == "sentinel-1a"  # lower-cased, as STAC asks
    assert scene.orbit_direction == "descending"
    assert scene.pols == ("VV", "VH")
    assert scene.datetime == dt.datetime(2023, 6, 28, 21, 7, 18, 488895, tzinfo=dt.UTC)
    assert scene.collection is None and scene.crs is None
    assert scene.bands["VV"].href.endswith("/measurement/iw-vv.tiff")


def test_item_without_matching_asset_keys_is_a_catalog_error():
    demo = resolve_catalog("demo")  # assets: VV -> vv, VH -> vh only
    with pytest.raises(CatalogError, match=r"item 'S1A_EW_GRDM_1SDH_\w+': no asset for any polarisation"):
        Scene.from_item(load_json(REAL_EW_ITEM), demo)


def test_demo_items():
    demo = resolve_catalog("demo")
    scenes = {s.item_id: s for s in (Scene.from_item(i, demo) for i in demo_items_absolute())}
    camargue = scenes["S1A_IW_GRD_20150309T173017_VV_camargue"]
    assert camargue.pols == ("VV",)
    assert camargue.bands["VV"].href == str(
        DEMO_DIR / "data/camargue/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    )
    assert camargue.bands["VV"].nodata == -99.0
    assert (camargue.crs, camargue.orbit_direction) == ("EPSG:32631", "ascending")
    sen12ms = scenes["SEN12MS_ROIs1158_spring_s1_1_p30"]
    # one two-band asset: band 1 VV, band 2 VH; only a start/end range: datetime = start
    assert sen12ms.pols == ("VV", "VH")
    assert (sen12ms.bands["VV"].band, sen12ms.bands["VH"].band) == (1, 2)
    assert sen12ms.bands["VV"].href == sen12ms.bands["VH"].href
    assert sen12ms.datetime == dt.datetime(2017, 3, 1, tzinfo=dt.UTC)
    assert sen12ms.orbit_direction is None
    quicklook = scenes["S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255_quicklook"]
    assert quicklook.crs is None  # GCP-only raster
    assert (quicklook.scale, quicklook.quantity) == ("dn", "dn")
    assert quicklook.orbit_direction == "descending"
