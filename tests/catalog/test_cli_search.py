"""The real ``fusarbatch search`` console script: happy paths and one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import json
import time

import geopandas as gpd
import pyarrow.parquet as pq
import pytest
import shapely
from conftest import DEMO_AOIS, DEMO_IDS, GENERATED_COLLECTION, run_cli
from shapely.geometry import box

DEMO_ALL = str(DEMO_AOIS / "demo_all.geojson")
CAMARGUE_ID = DEMO_IDS[0]


def assert_one_line_usage_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert err.count("\n") == 0, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ---- happy paths ---------------------------------------------------------------------------------------


def test_search_demo_lists_three_scenes():
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", "2015-01")
    assert proc.returncode == 0, proc.stderr
    assert "3 scene(s) from catalog 'demo'" in proc.stdout
    for item_id in DEMO_IDS:
        assert item_id in proc.stdout
    assert proc.stdout.index(DEMO_IDS[0]) < proc.stdout.index(DEMO_IDS[1]) < proc.stdout.index(DEMO_IDS[2])
    assert proc.stderr == ""


def test_search_demo_end_keeps_camargue_only():
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", "2015-01", "--end", "2016-12")
    assert proc.returncode == 0, proc.stderr
    assert "1 scene(s) from catalog 'demo'" in proc.stdout
    assert CAMARGUE_ID in proc.stdout
    assert DEMO_IDS[1] not in proc.stdout and DEMO_IDS[2] not in proc.stdout


def test_search_save_then_search_the_parquet(tmp_path):
    out = tmp_path / "generated_scenes.parquet"
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", "2015-01", "--save", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"scenes saved to {out}" in proc.stdout.replace("\n", "")
    frame = gpd.read_parquet(out)
    assert len(frame) == 3 and sorted(frame["id"]) == sorted(DEMO_IDS)
    assert pq.read_table(out).num_rows == 3
    again = run_cli("search", "--aoi", DEMO_ALL, "--start", "2015-01", "--catalog", str(out))
    assert again.returncode == 0, again.stderr
    assert "3 scene(s) from catalog 'generated_scenes'" in again.stdout
    for item_id in DEMO_IDS:
        assert item_id in again.stdout


def test_search_api_with_collection_and_limit(stac_api, tmp_path):
    aoi = tmp_path / "generated_france.geojson"
    aoi.write_text(shapely.to_geojson(box(3.0, 45.0, 3.5, 45.5)))
    proc = run_cli(
        "search", "--aoi", str(aoi), "--start", "2024-03", "--end", "2024-05",
        "--catalog", stac_api.url, "--collection", GENERATED_COLLECTION, "--limit", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"2 scene(s) from catalog '{stac_api.url}'" in proc.stdout
    listed = [f"generated-iw-{i}" for i in range(8) if f"generated-iw-{i}\t" in proc.stdout]  # tab-separated
    assert len(listed) == 2 and set(listed) <= {"generated-iw-2", "generated-iw-3", "generated-iw-4"}
    assert "100.0%" in proc.stdout


# ---- bad input: exit 2, one line naming the value ----------------------------------------------------------


def test_malformed_aoi_file(tmp_path):
    aoi = tmp_path / "generated_malformed.geojson"
    aoi.write_text('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0]')
    proc = run_cli("search", "--aoi", str(aoi), "--start", "2015-01")
    assert_one_line_usage_error(proc, str(aoi), "not valid JSON")


def test_empty_aoi(tmp_path):
    aoi = tmp_path / "generated_empty.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    proc = run_cli("search", "--aoi", str(aoi), "--start", "2015-01")
    assert_one_line_usage_error(proc, str(aoi), "no features")


def test_missing_aoi(tmp_path):
    aoi = tmp_path / "nope.geojson"
    proc = run_cli("search", "--aoi", str(aoi), "--start", "2015-01")
    assert_one_line_usage_error(proc, str(aoi), "cannot read it")


def test_aoi_overlapping_nothing():
    fiji = str(DEMO_AOIS / "fiji_antimeridian.geojson")
    proc = run_cli("search", "--aoi", fiji, "--start", "2015-01")
    assert_one_line_usage_error(proc, fiji, "overlaps no scene of catalog 'demo'")


def test_start_after_end():
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", "2024-05", "--end", "2024-03")
    err = assert_one_line_usage_error(proc)
    assert err == "error: --start 2024-05 is after --end 2024-03: swap them"


@pytest.mark.parametrize("bad", ["2024-13", "2024/01", "last-week"])
def test_bad_date_format(bad):
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", bad)
    assert_one_line_usage_error(proc, f"--start '{bad}'", "expected YYYY-MM or YYYY-MM-DD (UTC)")


def test_unknown_catalog_lists_known_names():
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", "2015-01", "--catalog", "sentinel-hub")
    assert_one_line_usage_error(proc, "'sentinel-hub'", "known names: demo, earth-search, planetary-computer")


def test_unreachable_catalog_closed_port_fails_fast(closed_port_url):
    t0 = time.monotonic()
    proc = run_cli("search", "--aoi", DEMO_ALL, "--start", "2015-01", "--catalog", closed_port_url)
    assert time.monotonic() - t0 < 10
    assert_one_line_usage_error(proc, closed_port_url, "connection refused")


def test_unreachable_catalog_silent_server_fails_within_timeout(silent_server):
    timeout = 2
    t0 = time.monotonic()
    proc = run_cli(
        "search", "--aoi", DEMO_ALL, "--start", "2015-01", "--catalog", silent_server,
        env={"FUSARBATCH_HTTP_TIMEOUT": str(timeout)},
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert_one_line_usage_error(proc, silent_server, f"no answer within {timeout} s")
    assert timeout <= elapsed < timeout + 5
