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
    # the spec's default quantity; the scale is not declared (empty): the tiler decides from the data
    assert (scene.quantity, scene.scale) == ("sigma0", "")
    # the GRD calibration annotations, per polarisation
    assert scene.calibration["VV"].endswith(
        "annotation/calibration/calibration-s1a-iw-grd-vv-20210809t173953-20210809t174018-039156-049f13-001.xml"
    )
    assert scene.calibration["VH"].endswith("-002.xml") and set(scene.calibration) == {"VV", "VH"}
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


def _generated_item(assets, item_pols=("VV", "VH")):
    return {
        "id": "generated-two-band",
        "properties": {"datetime": "2024-01-01T00:00:00Z", "sar:polarizations": list(item_pols)},
        "geometry": {"type": "Point", "coordinates": [4.5, 43.6]},
        "assets": assets,
    }


@pytest.mark.parametrize(
    "assets",
    [
        # under the VV key, an asset that says it holds VV and VH (this gave VV alone)
        {"vv": {"href": "/data/two.tif", "sar:polarizations": ["VV", "VH"], "roles": ["data"]}},
        # no key matches; the bands say which polarisation they hold (STAC 1.1 bands / eo:bands)
        {"data": {"href": "/data/two.tif", "bands": [{"name": "VV"}, {"name": "VH"}], "roles": ["data"]}},
        {"image": {"href": "/data/two.tif", "eo:bands": [{"name": "vv"}, {"name": "vh"}]}},
        {
            "image": {
                "href": "/data/two.tif",
                "bands": [{"sar:polarizations": ["VV"]}, {"sar:polarizations": ["VH"]}],
            }
        },
        # the item's only data asset, two bands, the item's sar:polarizations
        {
            "image": {"href": "/data/two.tif", "raster:bands": [{}, {}], "roles": ["data"]},
            "thumbnail": {"href": "/data/q.png", "roles": ["thumbnail"]},
        },
    ],
    ids=["key-vv-asset-lists-two", "bands-names", "eo-bands-names", "bands-sar-pols", "item-pols"],
)
def test_two_band_asset_gives_both_polarisations(assets):
    scene = Scene.from_item(_generated_item(assets), ANY)
    assert scene.pols == ("VV", "VH")
    assert (scene.bands["VV"].band, scene.bands["VH"].band) == (1, 2)
    assert scene.bands["VV"].href == scene.bands["VH"].href == "/data/two.tif"


def test_single_band_asset_under_a_key_is_not_split_by_the_item_polarisations():
    # the item says VV+VH, but only the VV asset is there: VV from band 1, no invented VH band 2
    assets = {"vv": {"href": "/data/vv.tif", "roles": ["data"]}}
    scene = Scene.from_item(_generated_item(assets), ANY)
    assert scene.pols == ("VV",) and scene.bands["VV"].band == 1


def test_percent_encoded_local_hrefs_are_decoded(tmp_path):
    folder = tmp_path / "sar data"
    folder.mkdir()
    (folder / "x y.tif").write_bytes(b"")
    literal = tmp_path / "odd%20name.tif"  # a file whose name really holds "%20", written unencoded
    literal.write_bytes(b"")
    assets = {
        "vv": {"href": f"{tmp_path}/sar%20data/x%20y.tif"},
        "vh": {"href": f"file://{tmp_path}/sar%20data/x%20y.tif"},
        "hh": {"href": str(literal)},
        "hv": {"href": "https://example.org/sar%20data/x.tif"},  # URLs stay URLs
    }
    scene = Scene.from_item(_generated_item(assets, ("VV", "VH", "HH", "HV")), ANY)
    assert scene.bands["VV"].href == scene.bands["VH"].href == str(folder / "x y.tif")
    assert scene.bands["HH"].href == str(literal)
    assert scene.bands["HV"].href == "https://example.org/sar%20data/x.tif"
