"""``fusarbatch run`` end to end on the embedded demo catalog with the tiny model (real STAC, GeoTIFFs,
Zarr, Dask LocalCluster, Qwen2.5-VL + TLM, GeoParquet)."""

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from fusarbatch.config import RunConfig, load_config
from fusarbatch.errors import UsageError
from fusarbatch.outputs.geoparquet import read_dataset
from fusarbatch.pipeline import run
from tests.conftest import REPO, run_cli

AOIS = REPO / "catalogs" / "demo" / "aois"
DEMO_IDS = {
    "S1A_IW_GRD_20150309T173017_VV_camargue",
    "SEN12MS_ROIs1158_spring_s1_1_p30",
    "S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255_quicklook",
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, generated_demo_model):
    out = tmp_path_factory.mktemp("run")
    events = []
    cfg = RunConfig(
        aoi=AOIS / "demo_all.geojson", start="2015-01", out=out, max_new_tokens=12, batch_size=4, device="cpu"
    )
    summary = run(cfg, lambda event, fields: events.append((event, dict(fields))))
    return out, summary, events


def test_run_writes_three_geoparquet_datasets_and_quicklooks(demo_run):
    out, summary, _ = demo_run
    assert {s.scene_id for s in summary.scenes} == DEMO_IDS
    assert all(s.status == "ok" for s in summary.scenes), [s.error for s in summary.scenes]
    for kind in ("detections", "tiles", "counts"):
        files = sorted((out / kind).glob("date=*/*.parquet"))
        assert len(files) == 3, kind
        geo = json.loads(pq.read_schema(files[0]).metadata[b"geo"])
        assert geo["version"] == "1.1.0" and "covering" in geo["columns"]["geometry"]
    assert (
        out / "detections" / "date=2015-03-09" / "S1A_IW_GRD_20150309T173017_VV_camargue.parquet"
    ).exists()
    pngs = sorted((out / "quicklooks").glob("*.png"))
    assert len(pngs) == 3
    assert Image.open(pngs[0]).format == "PNG"


def test_tiles_table_matches_the_tile_store(demo_run):
    out, summary, _ = demo_run
    tiles = read_dataset(out, "tiles")
    for s in summary.scenes:
        group = zarr.open_group(str(out / "tiles.zarr" / s.scene_id), mode="r")
        n = group["transform"].shape[0]
        rows = tiles[tiles.scene_id == s.scene_id].sort_values("tile_id")
        assert list(rows.tile_id) == list(range(n))
        np.testing.assert_allclose(rows.valid_fraction, group["valid_fraction"][:], rtol=1e-6)
        assert (rows.status == "ok").sum() == s.tiles_inferred
        # each footprint lies inside the scene's lon/lat bounds (tiles may be NaN-padded past the edge)
        assert rows.geometry.is_valid.all()
    assert tiles.crs.to_epsg() == 4326
    assert "count_ship" in tiles.columns


def test_malformed_model_output_is_recorded_not_fatal(demo_run):
    # The tiny demo model has random weights: its answers are noise, recorded per tile as parse failures.
    out, summary, _ = demo_run
    tiles = read_dataset(out, "tiles")
    assert summary.scenes and all(s.status == "ok" for s in summary.scenes)
    assert sum(s.parse_failures for s in summary.scenes) > 0
    assert tiles.error.notna().any()
    assert tiles.error.dropna().str.contains("detect:ship").any()


def test_counts_and_progress_events(demo_run):
    out, summary, events = demo_run
    counts = read_dataset(out, "counts")
    assert sorted(counts.scene_id) == sorted(DEMO_IDS)
    assert (counts.label == "ship").all()
    detections = read_dataset(out, "detections")
    for sid in DEMO_IDS:
        assert int(counts[counts.scene_id == sid]["count"].iloc[0]) == int(
            (detections.get("scene_id", []) == sid).sum()
        )
    assert events[0] == ("scenes", {"total": 3})
    assert [e for e, _ in events].count("scene_done") == 3
    assert summary.prompts == 2 * sum(s.tiles_inferred for s in summary.scenes)  # detection + class per tile


def test_rerun_replaces_files_without_duplicates(demo_run, generated_demo_model):
    out, _, _ = demo_run
    cfg = RunConfig(aoi=AOIS / "camargue.geojson", start="2015-01", out=out, max_new_tokens=12, device="cpu")
    run(cfg)
    tiles = read_dataset(out, "tiles")
    assert len(tiles[tiles.scene_id == "S1A_IW_GRD_20150309T173017_VV_camargue"]) == 1
    assert len(sorted((out / "tiles").glob("date=*/*.parquet"))) == 3


def test_config_rejects_unknown_keys_and_bad_types(tmp_path):
    bad = tmp_path / "run.toml"
    bad.write_text('aoi = "a.geojson"\nstart = "2024-01"\nbatchsize = 4\n')
    with pytest.raises(UsageError, match="batchsize"):
        load_config(bad, {})
    bad.write_text('aoi = "a.geojson"\nstart = "2024-01"\nbatch_size = "many"\n')
    with pytest.raises(UsageError, match="batch_size"):
        load_config(bad, {})
    ok = load_config(None, {"aoi": "a.geojson", "start": "2024-01", "batch_size": 4, "end": None})
    assert ok.batch_size == 4 and ok.end is None and ok.labels == ("ship",)


# --------------------------------------------------------------------------------------- bad input (CLI)


def test_missing_model_dir_names_the_missing_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    proc = run_cli(
        "run",
        "--aoi",
        str(AOIS / "camargue.geojson"),
        "--start",
        "2015-01",
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(model),
    )
    assert proc.returncode == 2, proc.stderr
    assert "config.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(
        "run",
        "--aoi",
        str(AOIS / "camargue.geojson"),
        "--start",
        "2015-01",
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(tmp_path / "nowhere"),
    )
    assert proc.returncode == 2 and "nowhere" in proc.stderr


def test_require_gpu_without_gpu_is_a_clear_error(tmp_path, generated_demo_model):
    proc = run_cli(
        "run",
        "--aoi",
        str(AOIS / "camargue.geojson"),
        "--start",
        "2015-01",
        "--out",
        str(tmp_path),
        "--model",
        str(generated_demo_model),
        "--require-gpu",
    )
    assert proc.returncode == 2
    assert "--require-gpu" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_asked_but_absent_falls_back_to_cpu_and_unreachable_aef_index_warns_once(
    tmp_path, generated_demo_model
):
    proc = run_cli(
        "run",
        "--aoi",
        str(AOIS / "camargue.geojson"),
        "--start",
        "2015-01",
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(generated_demo_model),
        "--device",
        "cuda",
        "--max-new-tokens",
        "8",
        "--aef-index",
        str(tmp_path / "no_such_aef_index.parquet"),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "running on CPU" in proc.stderr
    assert proc.stderr.count("AlphaEarth anchors disabled") == 1, proc.stderr
    assert "no_such_aef_index" in proc.stderr
    tiles = gpd.read_parquet(next((tmp_path / "o" / "tiles").glob("date=*/*.parquet")))
    assert (tiles.aef_coverage == 0).all()


def test_out_not_writable_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli(
        "run", "--aoi", str(AOIS / "camargue.geojson"), "--start", "2015-01", "--out", str(blocker / "o")
    )
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr


def test_known_paths_exist():
    assert Path(AOIS / "demo_all.geojson").exists()
