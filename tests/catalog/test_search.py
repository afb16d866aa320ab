"""search(): static catalog, stac-geoparquet, and a real STAC API (rustac on loopback) via pystac-client."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import json
import logging
import time
from pathlib import Path

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import shapely
from conftest import (
    DEMO_AOIS,
    DEMO_DIR,
    DEMO_IDS,
    GENERATED_COLLECTION,
    GENERATED_FIJI_ID,
    REAL_EW_ITEM,
    REAL_IW_ITEM,
    demo_items_absolute,
    equal_area_share,
    generated_iw_copies,
    load_json,
    serve,
    serve_directory,
)
from shapely.geometry import box

from fusarbatch.catalog import (
    CatalogSpec,
    Scene,
    load_aoi,
    parse_period,
    resolve_catalog,
    save_scenes,
    search,
    search_scenes,
)
from fusarbatch.errors import AOIError, CatalogError

CAMARGUE_ID, SEN12MS_ID, QUICKLOOK_ID = DEMO_IDS
IW_ID = load_json(REAL_IW_ITEM)["id"]
EW_ID = load_json(REAL_EW_ITEM)["id"]
GENERATED_IDS = [f"generated-iw-{i}" for i in range(8)]


def write_generated_aoi(tmp_path: Path, name: str, *bounds: float) -> Path:
    path = tmp_path / f"generated_{name}.geojson"
    path.write_text(shapely.to_geojson(box(*bounds)))
    return path


def run(spec: CatalogSpec, aoi: Path, start: str, end: str | None = None, **kw):
    first, last = parse_period(start, end)
    return search(spec, load_aoi(aoi), first, last, **kw)


def ids(result) -> list[str]:
    return [s.item_id for s in result.scenes]


# ---- static catalog (catalogs/demo) ------------------------------------------------------------------------


def test_static_demo_all_scenes_sorted_by_datetime():
    result = run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2015-01")
    assert ids(result) == [CAMARGUE_ID, SEN12MS_ID, QUICKLOOK_ID]
    assert [s.datetime.year for s in result.scenes] == [2015, 2017, 2021]
    assert set(result.coverage) == set(DEMO_IDS)
    assert result.saved is None and result.spec.name == "demo"
    for scene in result.scenes:  # asset hrefs made absolute, and they exist
        for band in scene.bands.values():
            assert Path(band.href).is_absolute() and Path(band.href).is_file()


def test_static_end_month_inclusive_keeps_only_camargue():
    assert ids(run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2015-01", "2016-12")) == [
        CAMARGUE_ID
    ]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        ("2017-05", "2017-05", [SEN12MS_ID]),  # the SEN12MS item has only a range, 2017-03-01..2017-05-31
        ("2017-05-31", "2017-06", [SEN12MS_ID]),
        ("2016-01", "2017-03-01", [SEN12MS_ID]),
        ("2017-06", None, [QUICKLOOK_ID]),
        ("2015-03-09", "2015-03-09", [CAMARGUE_ID]),
    ],
)
def test_static_datetime_ranges(start, end, expected):
    assert ids(run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", start, end)) == expected


def test_static_no_scene_in_period_is_aoi_error():
    with pytest.raises(AOIError) as info:
        run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2017-06", "2020-12")
    assert str(info.value) == (
        f"--aoi {DEMO_AOIS / 'demo_all.geojson'} overlaps no scene of catalog 'demo' between 2017-06-01 and "
        f"2020-12-31; check the AOI, dates or catalog"
    )


def test_static_aoi_elsewhere_is_aoi_error():
    with pytest.raises(
        AOIError, match=r"fiji_antimeridian.geojson overlaps no scene of catalog 'demo' from 2015-01-01 on"
    ):
        run(resolve_catalog("demo"), DEMO_AOIS / "fiji_antimeridian.geojson", "2015-01")


def test_static_limit_keeps_earliest():
    result = run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2015-01", limit=2)
    assert ids(result) == [CAMARGUE_ID, SEN12MS_ID]
    assert set(result.coverage) == {CAMARGUE_ID, SEN12MS_ID}


def test_static_unknown_collection_lists_available():
    with pytest.raises(CatalogError, match=r"no collection nope; available: fusarbatch-demo-s1"):
        run(resolve_catalog("demo", collections=("nope",)), DEMO_AOIS / "demo_all.geojson", "2015-01")


def test_static_missing_catalog_file(tmp_path):
    spec = CatalogSpec(name="generated-missing", kind="static", href=str(tmp_path / "catalog.json"))
    with pytest.raises(CatalogError, match=r"^catalog 'generated-missing'"):
        run(spec, DEMO_AOIS / "demo_all.geojson", "2015-01")


def test_items_without_pol_asset_are_skipped_with_warning(caplog):
    spec = CatalogSpec(
        name="generated-hh-only", kind="static", href=str(DEMO_DIR / "catalog.json"), assets={"HH": ("hh",)}
    )
    with caplog.at_level(logging.WARNING, logger="fusarbatch.catalog"):
        result = run(spec, DEMO_AOIS / "demo_all.geojson", "2015-01")
    # camargue has only a "vv" asset; the other two carry sar:polarizations on a multi-band asset
    assert ids(result) == [SEN12MS_ID, QUICKLOOK_ID]
    skipped = [r for r in caplog.records if r.name == "fusarbatch.catalog" and CAMARGUE_ID in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING


def test_only_unusable_items_is_a_catalog_error():
    spec = CatalogSpec(
        name="generated-hh-only", kind="static", href=str(DEMO_DIR / "catalog.json"), assets={"HH": ("hh",)}
    )
    with pytest.raises(
        CatalogError, match=r"1 item\(s\) overlap --aoi .*camargue.geojson .* but none has an asset"
    ):
        run(spec, DEMO_AOIS / "camargue.geojson", "2015-01")


# ---- coverage ------------------------------------------------------------------------------------------


def test_camargue_aoi_inside_camargue_footprint_is_fully_covered():
    result = run(resolve_catalog("demo"), DEMO_AOIS / "camargue.geojson", "2015-01")
    assert ids(result) == [CAMARGUE_ID]
    assert result.coverage[CAMARGUE_ID] == pytest.approx(1.0, abs=1e-9)


def test_utm_aoi_finds_the_same_scene_with_the_same_coverage():
    result = run(resolve_catalog("demo"), DEMO_AOIS / "camargue_utm31n.geojson", "2015-01")
    assert ids(result) == [CAMARGUE_ID]
    assert result.coverage[CAMARGUE_ID] == pytest.approx(1.0, abs=1e-6)


def test_demo_all_coverage_is_share_of_whole_aoi():
    aoi = load_aoi(DEMO_AOIS / "demo_all.geojson")
    camargue_part = load_aoi(DEMO_AOIS / "camargue.geojson")
    result = run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2015-01")
    # the Camargue footprint covers the whole Camargue part and nothing else of the AOI
    assert result.coverage[CAMARGUE_ID] == pytest.approx(camargue_part.area_m2 / aoi.area_m2, rel=1e-9)
    assert 0 < result.coverage[CAMARGUE_ID] < 0.01


def test_half_overlapping_aoi_via_geoparquet(tmp_path):
    """A generated scene over [10, 12] x [0, 2] degrees and an AOI over [11, 13] x [0, 2]: at constant
    latitudes an ellipsoidal lon/lat box's area is proportional to its longitude span, so the share is 1/2."""
    item = generated_iw_copies()[0]
    item["geometry"] = json.loads(shapely.to_geojson(box(10, 0, 12, 2)))
    item["bbox"] = [10, 0, 12, 2]
    spec = CatalogSpec(name="generated", kind="api", href="http://127.0.0.1:9/")
    parquet = save_scenes([Scene.from_item(item, spec)], tmp_path / "generated_half.parquet")
    result = run(
        resolve_catalog(str(parquet)), write_generated_aoi(tmp_path, "half", 11, 0, 13, 2), "2024-01"
    )
    assert ids(result) == ["generated-iw-0"]
    assert result.coverage["generated-iw-0"] == pytest.approx(0.5, rel=1e-6)


# ---- stac-geoparquet round trip ------------------------------------------------------------------------


def test_geoparquet_round_trip(tmp_path):
    first = run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2015-01")
    path = save_scenes(first.scenes, tmp_path / "generated_scenes.parquet")
    assert pq.read_table(path).num_rows == 3
    frame = gpd.read_parquet(path)
    assert sorted(frame["id"]) == sorted(DEMO_IDS)
    assert frame.crs.to_epsg() == 4326
    spec = resolve_catalog(str(path))
    assert spec.kind == "geoparquet"
    again = run(spec, DEMO_AOIS / "demo_all.geojson", "2015-01")
    assert ids(again) == ids(first)
    for a, b in zip(first.scenes, again.scenes, strict=True):
        assert a.datetime == b.datetime
        assert a.pols == b.pols
        assert a.bands == b.bands  # hrefs, band indices, nodata
        assert a.footprint.equals(b.footprint)
        assert (a.crs, a.platform, a.orbit_direction, a.scale, a.quantity) == (
            b.crs,
            b.platform,
            b.orbit_direction,
            b.scale,
            b.quantity,
        )
    assert again.coverage == pytest.approx(first.coverage)


def test_search_scenes_saves(tmp_path):
    out = tmp_path / "sub" / "generated_scenes.parquet"
    result = search_scenes(
        aoi=DEMO_AOIS / "demo_all.geojson", start="2015-01", end=None, catalog=None, save=out
    )
    assert result.saved == out and out.is_file()
    assert sorted(pq.read_table(out).column("id").to_pylist()) == sorted(DEMO_IDS)


def test_unreadable_geoparquet(tmp_path):
    path = tmp_path / "generated_broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="not a readable stac-geoparquet file"):
        run(resolve_catalog(str(path)), DEMO_AOIS / "demo_all.geojson", "2015-01")


# ---- a real STAC API (rustac serve) through pystac-client ------------------------------------------------


def api(stac_api, **kw) -> CatalogSpec:
    return CatalogSpec(name=stac_api.url, kind="api", href=stac_api.url, timeout_s=10, **kw)


@pytest.fixture
def france_aoi(tmp_path) -> Path:
    """Inside the real IW footprint (and its generated copies), away from every other item."""
    return write_generated_aoi(tmp_path, "france", 3.0, 45.0, 3.5, 45.5)


def test_api_intersects_hits_only_overlapping_items(stac_api, france_aoi):
    result = run(api(stac_api), france_aoi, "2015-01")
    assert ids(result) == [IW_ID, *GENERATED_IDS]
    assert all(result.coverage[i] == pytest.approx(1.0) for i in ids(result))


def test_api_other_aoi_other_items(stac_api, tmp_path):
    arctic = write_generated_aoi(tmp_path, "arctic", 85.0, 79.0, 90.0, 80.0)
    result = run(api(stac_api), arctic, "2015-01")
    assert ids(result) == [EW_ID]
    assert result.scenes[0].pols == ("HH", "HV")


def test_api_finds_the_demo_items_like_the_static_catalog(stac_api):
    # the demo items name local files: a remote API may only do that with allow_local_assets
    result = run(api(stac_api), DEMO_AOIS / "demo_all.geojson", "2015-01", allow_local_assets=True)
    static = run(resolve_catalog("demo"), DEMO_AOIS / "demo_all.geojson", "2015-01")
    assert ids(result) == ids(static) == list(DEMO_IDS)
    assert result.coverage == pytest.approx(static.coverage)
    assert [s.bands for s in result.scenes] == [s.bands for s in static.scenes]


def test_api_datetime_month_precision_inclusive_end(stac_api, france_aoi):
    # generated datetimes: 02-29T23:59:59, 03-01T00:00:00, 04-15, 05-31T23:59:59, 06-01T00:00:00
    assert ids(run(api(stac_api), france_aoi, "2024-03", "2024-05")) == GENERATED_IDS[2:5]
    assert ids(run(api(stac_api), france_aoi, "2024-02", "2024-02")) == GENERATED_IDS[1:2]
    assert ids(run(api(stac_api), france_aoi, "2024-06-01", "2024-06-01")) == GENERATED_IDS[5:6]
    assert ids(run(api(stac_api), france_aoi, "2021-08-09", "2021-08-09")) == [IW_ID]


def test_api_paging_collects_every_page_without_duplicates(stac_api, france_aoi):
    paged = run(api(stac_api), france_aoi, "2015-01", page_size=2)  # 9 items: 5 pages
    assert ids(paged) == [IW_ID, *GENERATED_IDS]
    assert len(set(ids(paged))) == 9
    assert ids(run(api(stac_api), france_aoi, "2015-01", page_size=100)) == ids(paged)


def test_api_limit_caps_scenes(stac_api, france_aoi):
    result = run(api(stac_api), france_aoi, "2015-01", page_size=2, limit=3)
    assert len(result.scenes) == 3
    assert set(ids(result)) <= {IW_ID, *GENERATED_IDS}
    keys = [(s.datetime, s.item_id) for s in result.scenes]
    assert keys == sorted(keys)
    assert set(result.coverage) == set(ids(result))


def test_api_collections_filter(stac_api, france_aoi):
    result = run(api(stac_api, collections=(GENERATED_COLLECTION,)), france_aoi, "2015-01", page_size=3)
    assert ids(result) == GENERATED_IDS
    assert {s.collection for s in result.scenes} == {GENERATED_COLLECTION}


def test_api_relative_asset_hrefs_resolve_against_item_self_link(stac_api, france_aoi):
    scene = run(api(stac_api), france_aoi, "2021-08", "2021-08").scenes[0]
    assert scene.item_id == IW_ID
    vv = scene.bands["VV"].href
    assert vv.startswith(stac_api.url)
    assert vv.endswith(
        "/tests/data-files/grd/S1A_IW_GRDH_1SDV_20210809T173953_20210809T174018_039156_049F13_6FF8.SAFE/measurement/s1a-iw-grd-vv-20210809t173953-20210809t174018-039156-049f13-001.tiff"
    )


def test_api_antimeridian_aoi_matches_only_the_item_across_it(stac_api):
    fiji = DEMO_AOIS / "fiji_antimeridian.geojson"
    result = run(api(stac_api), fiji, "2015-01")
    # A world-wide box would also hit France, the Arctic, Australia and the demo items.
    assert ids(result) == [GENERATED_FIJI_ID]
    # AOI: lon 178.5 -> 180.5, lat -17.5..-16; item: lon 179 -> 181, lat -17..-16.5. Shifted by 180 degrees
    # of longitude (rotational symmetry) they are ordinary boxes: measure those independently.
    expected = equal_area_share(box(-1.5, -17.5, 0.5, -16.0), box(-1.0, -17.0, 1.0, -16.5))
    assert 0.24 < expected < 0.26
    assert result.coverage[GENERATED_FIJI_ID] == pytest.approx(expected, rel=1e-4)


def test_api_nothing_there_is_aoi_error(stac_api, tmp_path):
    ocean = write_generated_aoi(tmp_path, "ocean", -30.0, -40.0, -29.0, -39.0)
    with pytest.raises(
        AOIError, match=r"overlaps no scene of catalog 'http://127\.0\.0\.1:\d+/' from 2015-01-01 on"
    ):
        run(api(stac_api), ocean, "2015-01")


# ---- unreachable or broken APIs: one line, bounded time ------------------------------------------------


def test_api_connection_refused_fails_fast(closed_port_url, france_aoi):
    spec = CatalogSpec(name=closed_port_url, kind="api", href=closed_port_url, timeout_s=10)
    t0 = time.monotonic()
    with pytest.raises(CatalogError) as info:
        run(spec, france_aoi, "2024-01")
    assert time.monotonic() - t0 < 5
    assert str(info.value) == (
        f"catalog {closed_port_url!r}: cannot reach it (connection refused); check the URL or your network"
    )


def test_api_silent_server_fails_within_timeout(silent_server, france_aoi):
    spec = CatalogSpec(name=silent_server, kind="api", href=silent_server, timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(CatalogError) as info:
        run(spec, france_aoi, "2024-01")
    elapsed = time.monotonic() - t0
    assert 1.4 < elapsed < 1.5 + 5
    assert f"catalog {silent_server!r}: cannot reach it (no answer within 1.5 s)" in str(info.value)


def test_api_unknown_host_fails(france_aoi):
    url = "http://fusarbatch-no-such-host.invalid/stac"
    spec = CatalogSpec(name=url, kind="api", href=url, timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(
        CatalogError,
        match=r"cannot reach it \((unknown host 'fusarbatch-no-such-host\.invalid'|no answer within 3 s)\)",
    ):
        run(spec, france_aoi, "2024-01")
    assert time.monotonic() - t0 < 3 + 5


def test_api_http_error_status(stac_api, france_aoi):
    url = stac_api.url + "no/such/api"
    with pytest.raises(CatalogError, match=r"the server answered HTTP 404"):
        run(CatalogSpec(name=url, kind="api", href=url, timeout_s=5), france_aoi, "2024-01")


def test_api_url_that_is_not_an_api_root(stac_api, france_aoi):
    url = stac_api.url + "collections"
    with pytest.raises(CatalogError, match=r"did not answer with a STAC API landing page"):
        run(CatalogSpec(name=url, kind="api", href=url, timeout_s=5), france_aoi, "2024-01")


def test_api_demo_items_keep_absolute_paths(stac_api):
    aoi, local = DEMO_AOIS / "camargue.geojson", {"allow_local_assets": True}
    with pytest.raises(CatalogError, match="their assets are local files"):  # a remote API: refused
        run(api(stac_api), aoi, "2015-03", "2015-03")
    scene = run(api(stac_api), aoi, "2015-03", "2015-03", **local).scenes[0]
    expected = next(i for i in demo_items_absolute() if i["id"] == CAMARGUE_ID)["assets"]["vv"]["href"]
    assert scene.bands["VV"].href == expected
    assert Path(expected).is_file()
    assert scene.datetime == dt.datetime(2015, 3, 9, 17, 30, 17, tzinfo=dt.UTC)


# ---- a static catalog over HTTP ------------------------------------------------------------------------


@pytest.fixture
def demo_over_http():
    """catalogs/demo served read-only by Python's http.server on loopback."""
    from tests.conftest import serve_directory

    with serve_directory(DEMO_DIR) as url:
        yield url


def test_static_catalog_over_http(demo_over_http):
    spec = resolve_catalog(demo_over_http + "catalog.json")
    assert spec.kind == "static"
    result = run(spec, DEMO_AOIS / "demo_all.geojson", "2015-01")
    assert ids(result) == list(DEMO_IDS)
    assert result.scenes[0].bands["VV"].href == (
        demo_over_http + "data/camargue/S1A__IW___A_20150309T173017_VV_grd_mli_geo_norm_db.tif"
    )


REPO = Path(__file__).resolve().parents[2]


def test_static_catalog_skips_unreadable_items_and_keeps_the_rest(tmp_path, caplog):
    import shutil

    from fusarbatch.catalog import search_scenes

    demo = REPO / "catalogs" / "demo"
    copy = tmp_path / "demo"
    shutil.copytree(demo, copy, ignore=shutil.ignore_patterns("data"))
    (copy / "data").symlink_to(demo / "data")
    items = sorted((copy / "fusarbatch-demo-s1").glob("*/*.json"))
    bad_datetime, not_json = items[0], items[1]
    doc = json.loads(bad_datetime.read_text())
    doc["properties"]["datetime"] = "not-a-date"
    bad_datetime.write_text(json.dumps(doc))
    not_json.write_text("{ this is not json")
    with caplog.at_level("WARNING", logger="fusarbatch.catalog"):
        result = search_scenes(
            aoi=REPO / "catalogs/demo/aois/demo_all.geojson", start="2015-01", end=None, catalog=str(copy)
        )
    assert len(result.scenes) == 1
    assert result.scenes[0].item_id == items[2].stem
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and any(bad_datetime.name in m for m in skipped)


def test_broken_signer_is_reported_as_the_catalogs_error(tmp_path):
    from fusarbatch.catalog import search_scenes

    toml = tmp_path / "signed.toml"
    toml.write_text(
        f'kind = "static"\nhref = "{REPO / "catalogs/demo/catalog.json"}"\nsign = "no_such_module_xyz:sign"\n'
    )
    with pytest.raises(CatalogError, match="no_such_module_xyz"):
        search_scenes(
            aoi=REPO / "catalogs/demo/aois/camargue.geojson", start="2015-01", end=None, catalog=str(toml)
        )


def test_static_catalog_with_percent_encoded_relative_hrefs_is_tiled(tmp_path):
    """A static catalog (generated) whose item points at ``../sar%20data/camargue%20vv.tif``: the file is
    ``sar data/camargue vv.tif`` (STAC hrefs are URI references); search finds it and the tiler reads it."""
    import shutil

    import numpy as np
    import rasterio
    import zarr

    from fusarbatch.tiling import tile_scene

    item = next(i for i in demo_items_absolute() if i["id"] == CAMARGUE_ID)
    source = Path(item["assets"]["vv"]["href"])
    (tmp_path / "sar data").mkdir()
    shutil.copy(source, tmp_path / "sar data" / "camargue vv.tif")
    (tmp_path / "catalog" / "item").mkdir(parents=True)
    item = {
        **item,
        "links": [{"rel": "root", "href": "../catalog.json"}, {"rel": "parent", "href": "../catalog.json"}],
    }
    item["assets"] = {"vv": {**item["assets"]["vv"], "href": "../../sar%20data/camargue%20vv.tif"}}
    item.pop("collection", None)
    (tmp_path / "catalog" / "item" / "item.json").write_text(json.dumps(item))
    catalog = {
        "type": "Catalog",
        "stac_version": "1.0.0",
        "id": "generated-percent-encoded",
        "description": "generated",
        "links": [{"rel": "root", "href": "./catalog.json"}, {"rel": "item", "href": "./item/item.json"}],
    }
    (tmp_path / "catalog" / "catalog.json").write_text(json.dumps(catalog))
    spec = resolve_catalog(str(tmp_path / "catalog" / "catalog.json"))
    [scene] = run(spec, DEMO_AOIS / "camargue.geojson", "2015-03").scenes
    assert scene.bands["VV"].href == str(tmp_path / "sar data" / "camargue vv.tif")
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=128, overlap=16)
    assert result.status == "ok", result.error
    g = zarr.open_group(str(tmp_path / "tiles.zarr"), path=scene.safe_id, mode="r")
    with rasterio.open(source) as src:
        first = src.read(1, window=((0, 128), (0, 128))).astype(np.float32)
    first[first == -99] = np.nan
    np.testing.assert_array_equal(g["backscatter"][0, 0], first.astype(np.float16))  # float16 store


# ---- bounds on a whole search, and local files named by a remote catalog (issue 10) --------------------


class _EndlessStacApi(http.server.BaseHTTPRequestHandler):
    """A STAC API whose search never ends: every page links to a next one with new items (``pad`` bytes of
    padding per page), or, at ``/big``, a landing page whose body streams ``BIG_BYTES`` (far more than any
    cap) as fast as loopback carries it."""

    pad = 0
    BIG_BYTES = 512 * 2**20

    def _send(self, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _page(self, n: int) -> None:
        base = f"http://127.0.0.1:{self.server.server_address[1]}/"
        feature = load_json(REAL_IW_ITEM) | {"id": f"generated-endless-{n}", "links": []}
        feature["properties"] = feature["properties"] | {"padding": "x" * self.pad}
        self._send(
            {
                "type": "FeatureCollection",
                "features": [feature],
                "links": [{"rel": "next", "href": f"{base}search?page={n + 1}", "method": "GET"}],
            }
        )

    def do_GET(self) -> None:
        if self.path.startswith("/big"):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            chunk = b" " * 2**20
            with contextlib.suppress(OSError):  # the client hangs up at its cap
                for _ in range(self.BIG_BYTES // len(chunk)):
                    self.wfile.write(chunk)
            return
        if self.path.startswith("/search"):
            self._page(int(self.path.rpartition("=")[2]))
            return
        base = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._send(
            {
                "type": "Catalog",
                "stac_version": "1.0.0",
                "id": "generated-endless",
                "description": "generated",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core", ITEM_SEARCH],
                "links": [{"rel": "search", "href": f"{base}search", "method": "POST"}],
            }
        )

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._page(0)

    def log_message(self, *args) -> None:
        pass


ITEM_SEARCH = "https://api.stacspec.org/v1.0.0/item-search"


@pytest.mark.timeout(60)
def test_api_whose_pages_never_end_fails_at_the_search_deadline(france_aoi):
    with serve(_EndlessStacApi) as url:
        spec = CatalogSpec(name=url, kind="api", href=url, timeout_s=5, search_timeout_s=2)
        t0 = time.monotonic()
        with pytest.raises(CatalogError) as info:
            run(spec, france_aoi, "2015-01")
    assert time.monotonic() - t0 < 2 + 5 + 3  # the deadline, at most one request more, slack
    assert str(info.value) == (
        f"catalog {url!r}: the search did not end within 2 s (pages that never end?); narrow the AOI or "
        "dates, or raise `search_timeout_s` in a catalog definition"
    )


@pytest.mark.timeout(60)
def test_search_command_ends_at_the_deadline_of_pages_that_never_end(france_aoi, tmp_path):
    """End to end: ``fusarbatch search`` with a catalog definition (``search_timeout_s = 2``) of a STAC
    API whose pages never end: one line, exit 2, soon after the deadline (it paged for ever)."""
    from tests.conftest import run_cli

    with serve(_EndlessStacApi) as url:
        toml = tmp_path / "endless.toml"
        toml.write_text(f'kind = "api"\nhref = "{url}"\nsearch_timeout_s = 2\n')
        t0 = time.monotonic()
        proc = run_cli("search", "--aoi", str(france_aoi), "--start", "2015-01", "--catalog", str(toml))
    assert time.monotonic() - t0 < 2 + 30  # the deadline plus a CLI start-up
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "the search did not end within 2 s (pages that never end?); narrow the AOI or dates, or raise "
            "`search_timeout_s` in a catalog definition"
        )
    )


@pytest.mark.timeout(60)
def test_api_pages_beyond_the_search_byte_cap_fail(france_aoi):
    handler = type("PaddedPages", (_EndlessStacApi,), {"pad": 300_000})
    with serve(handler) as url:
        spec = CatalogSpec(name=url, kind="api", href=url, timeout_s=5, max_search_mb=1)
        with pytest.raises(CatalogError, match=r"more than 64 MiB in one answer, or 1 MiB in all"):
            run(spec, france_aoi, "2015-01")


@pytest.mark.timeout(60)
def test_api_answer_that_never_ends_is_cut_at_the_answer_cap(france_aoi):
    import psutil

    rss = psutil.Process().memory_info().rss
    with serve(_EndlessStacApi) as url:
        spec = CatalogSpec(name=url + "big", kind="api", href=url + "big", timeout_s=20)
        with pytest.raises(CatalogError, match=r"the server sent more than 64 MiB in one answer"):
            run(spec, france_aoi, "2015-01")
    assert psutil.Process().memory_info().rss - rss < 400 * 2**20  # not the 512 MB it streamed


def _remote_catalog_with_local_assets(root: Path) -> None:
    """A static catalog to serve over HTTP whose item names a local file with a ``file://`` URL (the
    camargue demo raster). (An absolute path there is resolved against the catalog's URL by pystac, so it
    stays on the server; a STAC API's absolute paths stay local: see the next test.)"""
    tif = next((DEMO_DIR / "data" / "camargue").glob("*.tif"))
    item = next(i for i in demo_items_absolute() if i["id"] == CAMARGUE_ID)
    links = [{"rel": "root", "href": "./catalog.json"}]
    for n, href in enumerate([tif.as_uri()]):
        doc = json.loads(json.dumps(item)) | {"id": f"generated-local-{n}", "links": []}
        doc["assets"]["vv"]["href"] = href
        (root / f"item{n}.json").write_text(json.dumps(doc))
        links.append({"rel": "item", "href": f"./item{n}.json", "type": "application/json"})
    (root / "catalog.json").write_text(
        json.dumps(
            {
                "type": "Catalog",
                "stac_version": "1.0.0",
                "id": "generated",
                "description": "g",
                "links": links,
            }
        )
    )


def test_remote_catalog_may_not_name_local_files(tmp_path):
    _remote_catalog_with_local_assets(tmp_path)
    aoi = DEMO_AOIS / "camargue.geojson"
    with serve_directory(tmp_path) as url:
        spec = resolve_catalog(url + "catalog.json")
        with pytest.raises(CatalogError) as info:
            run(spec, aoi, "2015-01")
        allowed = run(spec, aoi, "2015-01", allow_local_assets=True)
    assert str(info.value) == (
        f"catalog {url + 'catalog.json'!r}: 1 item(s) overlap --aoi {aoi} from 2015-01-01 on but their "
        "assets are local files, which a remote catalog may not name; pass --allow-local-assets if you "
        "trust the catalog"
    )
    assert ids(allowed) == ["generated-local-0"]
    # a local catalog naming local files is the normal case
    assert ids(run(resolve_catalog(str(tmp_path / "catalog.json")), aoi, "2015-01")) == ids(allowed)


def test_search_command_refuses_local_assets_of_a_remote_catalog(tmp_path):
    """End to end: ``fusarbatch search`` against a real http.server on 127.0.0.1."""
    from tests.conftest import run_cli

    _remote_catalog_with_local_assets(tmp_path)
    args = ["search", "--aoi", str(DEMO_AOIS / "camargue.geojson"), "--start", "2015-01"]
    with serve_directory(tmp_path) as url:
        refused = run_cli(*args, "--catalog", url + "catalog.json")
        allowed = run_cli(*args, "--catalog", url + "catalog.json", "--allow-local-assets")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "are local files, which a remote catalog may not name; pass --allow-local-assets if you trust "
            "the catalog"
        )
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "generated-local-0" in allowed.stdout


def test_local_href_kinds():
    from fusarbatch.catalog.search import is_local_href

    local = ["/data/x.tif", "x.tif", "../x.tif", "file:///data/x.tif", "C:/data/x.tif", "/vsizip//data/a.zip"]
    remote = [
        "https://h/x.tif",
        "s3://b/x.tif",
        "/vsicurl/https://h/x.tif",
        "/vsizip//vsicurl/http://h/a.zip",
    ]
    assert [is_local_href(h) for h in local] == [True] * len(local)
    assert [is_local_href(h) for h in remote] == [False] * len(remote)
