"""``fusarbatch run`` end to end on the embedded demo catalog with the tiny model (real STAC, GeoTIFFs,
Zarr, Dask LocalCluster, Qwen2.5-VL + TLM, GeoParquet)."""

import copy
import datetime as dt
import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from fusarbatch.config import RunConfig, load_config
from fusarbatch.errors import AOIError, UsageError
from fusarbatch.outputs.geoparquet import read_dataset
from fusarbatch.outputs.ledger import Ledger
from fusarbatch.pipeline import run
from tests.conftest import REPO, demo_items_absolute, run_cli

AOIS = REPO / "catalogs" / "demo" / "aois"
CAMARGUE = "S1A_IW_GRD_20150309T173017_VV_camargue"
SEN12MS = "SEN12MS_ROIs1158_spring_s1_1_p30"
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
    assert events[0] == ("scenes", {"total": 3, "to_do": 3, "skipped": 0})
    assert [e for e, _ in events].count("scene_done") == 3
    assert summary.prompts == 2 * sum(s.tiles_inferred for s in summary.scenes)  # detection + class per tile


CAMARGUE_RUN = dict(aoi=AOIS / "camargue.geojson", start="2015-01", max_new_tokens=64, device="cpu")


#: The camargue scene, whole (the fixed answers' boxes lie in the tile's padding, outside the AOI), with room
#: for the two-box answer of the generated fixed-answer models.
CAMARGUE_BOXES = dict(CAMARGUE_RUN, max_new_tokens=80, whole_scenes=True)


@pytest.fixture(scope="module")
def camargue_run(tmp_path_factory, generated_vessel_answer_model):
    """A model that answers two boxes labelled 'vessel' to "detect: ship", on the camargue scene (the
    packaged demo model draws no box on this land scene)."""
    out = tmp_path_factory.mktemp("camargue")
    return out, run(RunConfig(**CAMARGUE_BOXES, model=generated_vessel_answer_model, out=out))


def test_detections_carry_the_label_asked_and_the_models_own_label(camargue_run):
    """Every box answers "detect: ship", so its label is ship (NMS, ids and counts per asked label); what
    the model wrote is kept in model_label ('vessel' here; the issue-4 demo model said 'vehicle')."""
    out, summary = camargue_run
    detections = read_dataset(out, "detections")
    assert len(detections) == sum(sum(s.detections.values()) for s in summary.scenes) == 2
    assert set(detections.label) == {"ship"}
    assert set(detections.model_label) == {"vessel"}
    tiles = read_dataset(out, "tiles")
    assert int(tiles.count_ship.sum()) == len(detections)
    counts = read_dataset(out, "counts")
    assert counts.set_index("label")["count"].to_dict() == {"ship": len(detections)}


def test_forced_rerun_replaces_files_without_duplicates(demo_run, generated_demo_model, tmp_path):
    first = demo_run[1]
    out = _copy_of(demo_run, tmp_path)  # another AOI: the shared folder stays as demo_run made it
    cfg = RunConfig(
        aoi=AOIS / "camargue.geojson", start="2015-01", out=out, max_new_tokens=12, device="cpu", force=True
    )
    summary = run(cfg)
    assert [s.scene_id for s in summary.scenes] == [CAMARGUE] and summary.skipped == []
    tiles = read_dataset(out, "tiles")
    camargue = tiles[tiles.scene_id == CAMARGUE]
    assert len(camargue) == 1 and set(camargue.run_id) == {summary.run_id} != {first.run_id}
    assert len(sorted((out / "tiles").glob("date=*/*.parquet"))) == 3


def test_checkpoint_on_a_base_model_gives_the_full_models_answers(
    camargue_run, generated_vessel_answer_model, tmp_path
):
    """``--model CHECKPOINT --base-model BASE`` (the official release layout: TLM [+ LoRA] beside a plain
    Qwen2.5-VL) goes through the same code path as a full model directory: a generated model split into a
    base without TLM and a TLM-only checkpoint answers exactly as the whole one."""
    tlm_files = ("tlm.safetensors", "tlm_config.json")
    base = tmp_path / "base"
    shutil.copytree(generated_vessel_answer_model, base, ignore=shutil.ignore_patterns(*tlm_files))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in tlm_files:
        shutil.copy2(generated_vessel_answer_model / name, ckpt / name)
    out = tmp_path / "out"
    summary = run(RunConfig(**CAMARGUE_BOXES, out=out, model=ckpt, base_model=base))
    assert [(s.scene_id, s.status) for s in summary.scenes] == [(CAMARGUE, "ok")]
    assert summary.model_id == "ckpt"
    hashes = []
    for folder in (out, camargue_run[0]):
        ledger = Ledger.open(folder)
        hashes.append(ledger.runs(1)[0]["model_hash"])
        ledger.close()
    assert hashes[0] != hashes[1]  # base + checkpoint fingerprint both folders
    for kind in ("tiles", "detections", "counts"):
        split = read_dataset(out, kind).drop(columns=["run_id", "model_id"])
        whole = read_dataset(camargue_run[0], kind).drop(columns=["run_id", "model_id"])
        assert len(split) >= 1 and list(split.columns) == list(whole.columns)
        for column in split.columns:
            assert split[column].equals(whole[column]), (kind, column)
    with pytest.raises(UsageError, match="pass --base-model DIR"):
        run(RunConfig(**CAMARGUE_BOXES, out=tmp_path / "o2", model=ckpt))  # no base recorded anywhere


# ------------------------------------------------------------------------------------ ledger and reruns


def _copy_of(demo_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(demo_run[0], out)
    return out


def test_rerun_skips_done_scenes_and_redoes_changed_or_missing(demo_run, tmp_path):
    out = _copy_of(demo_run, tmp_path)
    base = {"aoi": AOIS / "demo_all.geojson", "start": "2015-01", "out": out, "device": "cpu"}
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/date=*/*.parquet")}
    # same configuration as demo_run except the batch size, which does not change the outputs
    again = run(RunConfig(**base, max_new_tokens=12, batch_size=2))
    assert again.scenes == [] and sorted(again.skipped) == sorted(DEMO_IDS) and again.exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/date=*/*.parquet")} == mtimes
    # a changed generation budget redoes every scene, reusing tiles and anchors (same tiling hash)
    changed = run(RunConfig(**base, max_new_tokens=9))
    assert sorted(s.scene_id for s in changed.scenes) == sorted(DEMO_IDS) and changed.skipped == []
    assert all(s.reused == ["tile", "features"] and s.status == "ok" for s in changed.scenes)
    ledger = Ledger.open(out)
    try:
        hashes = {r.config_hash for r in ledger.scenes()}
        assert hashes == {RunConfig(**base, max_new_tokens=9).output_hash()}
        assert all(r.run_id == changed.run_id and r.attempts >= 2 for r in ledger.scenes())
    finally:
        ledger.close()
    # a done scene whose files are gone is redone
    next((out / "counts").glob(f"date=*/{SEN12MS}.parquet")).unlink()
    redone = run(RunConfig(**base, max_new_tokens=9))
    assert [s.scene_id for s in redone.scenes] == [SEN12MS] and len(redone.skipped) == 2
    assert len(read_dataset(out, "counts")) == 3


def _parquet_catalog(path, items):
    import stac_geoparquet.arrow as sga

    sga.to_parquet(sga.parse_stac_items_to_arrow(items), path)
    return path


def _sen12ms_copies(when_by_id):
    """Copies of the (small, one-tile) SEN12MS demo item with other ids and datetimes."""
    item = next(i for i in demo_items_absolute() if i["id"] == SEN12MS)
    copies = []
    for item_id, when in when_by_id.items():
        c = copy.deepcopy(item)
        c["id"] = item_id
        c["properties"].pop("start_datetime", None)
        c["properties"].pop("end_datetime", None)
        c["properties"]["datetime"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        copies.append(c)
    return copies


def test_since_last_run_and_rolling_windows(tmp_path, generated_demo_model):
    now = dt.datetime.now(dt.UTC)
    catalog = tmp_path / "catalog.parquet"
    when = {"gen-a": now - dt.timedelta(days=3), "gen-b": now - dt.timedelta(hours=2)}
    _parquet_catalog(catalog, _sen12ms_copies(when))
    base = {
        "aoi": AOIS / "sen12ms.geojson",
        "catalog": str(catalog),
        "out": tmp_path / "out",
        "max_new_tokens": 8,
        "device": "cpu",
    }
    # first run: no earlier run, so --since-last-run starts at --start
    first = run(RunConfig(**base, since_last_run=True, start="-P5D"))
    assert sorted(s.scene_id for s in first.scenes) == ["gen-a", "gen-b"] and first.exit_code == 0
    assert abs((first.window[0] - (now - dt.timedelta(days=5))).total_seconds()) < 60
    # a new scene appears; one acquired long ago is published late (outside the margin: not searched)
    when |= {"gen-c": now - dt.timedelta(hours=1), "gen-old": now - dt.timedelta(days=10)}
    _parquet_catalog(catalog, _sen12ms_copies(when))
    second = run(RunConfig(**base, since_last_run=True))
    assert [s.scene_id for s in second.scenes] == ["gen-c"] and second.skipped == ["gen-b"]
    ledger = Ledger.open(base["out"])
    try:
        searched = [r["searched_at"] for r in ledger.runs()]
    finally:
        ledger.close()
    last = dt.datetime.fromisoformat(searched[1].replace("Z", "+00:00"))
    assert second.window[0] == last - dt.timedelta(days=1) and second.mode == "since-last-run"
    # a rolling window: the last two days, all done
    rolling = run(RunConfig(**base, start="-P2D"))
    assert rolling.scenes == [] and sorted(rolling.skipped) == ["gen-b", "gen-c"] and rolling.exit_code == 0
    # nothing new in an incremental window is not an error
    empty = run(RunConfig(**base, since_last_run=True, since_margin="PT1M"))
    assert empty.scenes == [] and empty.skipped == [] and empty.exit_code == 0
    # ... but an explicit window over nothing still is
    with pytest.raises(AOIError, match="overlaps no scene"):
        run(RunConfig(**base, start="2030-01"))


def test_failed_scenes_are_retried_and_retry_failed_needs_no_search(tmp_path, generated_demo_model):
    items = demo_items_absolute()
    raster = tmp_path / "moved" / "camargue.tif"
    camargue = next(i for i in items if i["id"] == CAMARGUE)
    original = next(iter(camargue["assets"].values()))["href"]
    for asset in camargue["assets"].values():
        asset["href"] = str(raster)
    catalog = _parquet_catalog(tmp_path / "catalog.parquet", items)
    cfg = {"catalog": str(catalog), "out": tmp_path / "out", "max_new_tokens": 8, "device": "cpu"}
    first = run(RunConfig(aoi=AOIS / "demo_all.geojson", start="2015-01", **cfg))
    assert [s.scene_id for s in first.failed] == [CAMARGUE] and first.exit_code == 1
    assert first.failed[0].stage == "tile" and "camargue.tif" in first.failed[0].error
    # a plain rerun redoes what failed (still failing) and skips the rest
    second = run(RunConfig(aoi=AOIS / "demo_all.geojson", start="2015-01", **cfg))
    assert [s.scene_id for s in second.scenes] == [CAMARGUE] and len(second.skipped) == 2
    ledger = Ledger.open(cfg["out"])
    try:
        rec = ledger.scene(CAMARGUE)
        assert (rec.status, rec.stage, rec.attempts) == ("failed", "tile", 2)
    finally:
        ledger.close()
    # the raster is back; --retry-failed works from the ledger: no AOI, no period, no search
    raster.parent.mkdir()
    shutil.copy(original, raster)
    (tmp_path / "out" / "scenes.parquet").unlink()

    # (without --catalog: each scene is rebuilt with the catalog it was found with, recorded in the ledger)
    def last_search():
        ledger = Ledger.open(cfg["out"])
        try:
            return ledger.last_search_time()
        finally:
            ledger.close()

    searched = last_search()
    retried = run(RunConfig(retry_failed=True, out=cfg["out"], max_new_tokens=8, device="cpu"))
    assert [(s.scene_id, s.status) for s in retried.scenes] == [(CAMARGUE, "ok")]
    assert retried.mode == "retry-failed" and retried.exit_code == 0
    assert not (tmp_path / "out" / "scenes.parquet").exists()
    assert (
        len(read_dataset(tmp_path / "out", "tiles")) == 3
    )  # the quick-look scene: 1 of its 2 tiles meets the AOI
    # it searched nothing: the next --since-last-run still starts from the second run's search
    assert searched is not None and last_search() == searched
    nothing = run(RunConfig(retry_failed=True, **cfg))
    assert nothing.scenes == [] and nothing.exit_code == 0


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


def test_corrupt_model_file_fails_before_any_scene_is_tiled(tmp_path, generated_demo_model):
    model = tmp_path / "model"
    shutil.copytree(generated_demo_model, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 3])  # an interrupted copy
    out = tmp_path / "o"
    args = ["run", "--aoi", str(AOIS / "camargue.geojson"), "--start", "2015-01", "--out", str(out)]
    proc = run_cli(*args, "--model", str(model))
    assert proc.returncode == 2, proc.stderr
    assert "model.safetensors is not a readable safetensors file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "tiles.zarr").exists() and not (out / "tiles").exists()


def test_a_model_that_cannot_be_loaded_ends_the_run_with_one_line(tmp_path, generated_demo_model):
    """Weights whose header is fine but which lack a tensor pass the pre-check; loading them on the worker
    fails (transformers would fill it with random values): the run stops after the first scene with the
    loader's message and exit 2, instead of failing every scene alike."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(generated_demo_model, model)
    state = load_file(str(model / "model.safetensors"))
    dropped = next(k for k in sorted(state) if "visual.blocks" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(model / "model.safetensors"))
    out = tmp_path / "o"
    args = ["run", "--aoi", str(AOIS / "demo_all.geojson"), "--start", "2015-01", "--out", str(out)]
    proc = run_cli(*args, "--model", str(model), "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # JSON lines off a terminal
    assert lines[-1]["event"] == "error" and lines[-1]["exit_code"] == 2
    assert "the weights do not match config.json (1 tensor(s) missing" in lines[-1]["message"]
    ledger = Ledger.open(out)
    try:
        assert ledger.runs(1)[0]["status"] == "error"
        assert len([r for r in ledger.scenes() if r.status == "done"]) == 0
    finally:
        ledger.close()


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


def test_an_aef_cog_missing_from_the_mirror_warns_once_and_the_run_goes_on(tmp_path, generated_demo_model):
    index = tmp_path / "generated_aef_index.csv"  # over the whole world: every scene looks for the COG
    index.write_text(
        "path,year,crs,geometry\n"
        f"{tmp_path / 'gone' / 'aef_2017.tif'},2017,EPSG:32631,"
        '"POLYGON((-180 -80, 180 -80, 180 80, -180 80, -180 -80))"\n'
    )
    args = [
        "run",
        "--aoi",
        str(AOIS / "demo_all.geojson"),
        "--start",
        "2015-01",
        "--out",
        str(tmp_path / "o"),
    ]
    proc = run_cli(*args, "--aef-index", str(index), "--max-new-tokens", "4", "--device", "cpu", timeout=180)
    assert proc.returncode == 0, proc.stderr
    warnings = [
        json.loads(line) for line in proc.stderr.splitlines() if "AlphaEarth anchors disabled" in line
    ]
    assert len(warnings) == 1 and "aef_2017.tif" in warnings[0]["message"]
    assert "missing_cog" not in proc.stderr  # no Python API parameter in a CLI message
    tiles = read_dataset(tmp_path / "o", "tiles")
    assert len(tiles) == 3 and (tiles.aef_coverage == 0).all() and (tiles.status == "ok").all()


def test_out_not_writable_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_cli(
        "run", "--aoi", str(AOIS / "camargue.geojson"), "--start", "2015-01", "--out", str(blocker / "o")
    )
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr


def test_known_paths_exist():
    assert Path(AOIS / "demo_all.geojson").exists()


def test_a_336_model_places_boxes_on_its_own_grid_with_per_box_scores(tmp_path, generated_fixed_answer_model):
    """A model whose grid is 336 (tlm_config.json) answers two boxes on that grid: they land at
    box * tile / 336 on the ground (on the 504 grid they would shrink toward the tile origin by 2/3); each box
    has its own score in [0, 1], the answer's probability is kept apart; --min-score drops the lower box."""
    from affine import Affine
    from pyproj import Transformer
    from shapely.geometry import box as shapely_box
    from shapely.ops import transform as shapely_transform

    from tests.conftest import FIXED_GRID

    out = tmp_path / "run"
    # whole scene: the fixed boxes lie in the tile's padding past the scene, outside the AOI (dropped)
    cfg = dict(CAMARGUE_RUN, model=generated_fixed_answer_model, max_new_tokens=80, whole_scenes=True)
    summary = run(RunConfig(**cfg, out=out))
    assert [s.status for s in summary.scenes] == ["ok"], [s.error for s in summary.scenes]
    group = zarr.open_group(str(out / "tiles.zarr" / CAMARGUE), mode="r")
    assert group["transform"].shape[0] == 1
    tile, size = Affine(*group["transform"][0]), int(group.attrs["tile_size"])
    to_ll = Transformer.from_crs(group.attrs["crs"], "EPSG:4326", always_xy=True).transform
    dets = read_dataset(out, "detections").sort_values("score")
    assert len(dets) == 2 and set(dets.label) == {"ship"}
    for x1, y1, x2, y2 in ([168, 0, 336, 84], [0, 252, 84, 336]):
        c1, r1, c2, r2 = (v * size / FIXED_GRID for v in (x1, y1, x2, y2))
        (mx1, my1), (mx2, my2) = tile * (c1, r1), tile * (c2, r2)
        expected = shapely_transform(to_ll, shapely_box(mx1, my1, mx2, my2))
        # one detection covers it to a millionth of its area (reprojection of corners only)
        assert any(g.symmetric_difference(expected).area < 1e-6 * expected.area for g in dets.geometry), (
            x1,
            y1,
        )
    scores, answer = list(dets.score), list(dets.answer_score)
    assert all(0 < s <= 1 for s in scores) and scores[0] != scores[1]
    assert answer[0] == answer[1] and all(a <= s for a, s in zip(answer, scores, strict=True))
    # --min-score between the two: the lower box goes, from the detections and the counts
    threshold = (scores[0] + scores[1]) / 2
    again = run(RunConfig(**cfg, out=out, min_score=threshold))
    assert [s.scene_id for s in again.scenes] == [CAMARGUE]  # min_score is in the config hash: redone
    kept = read_dataset(out, "detections")
    assert list(kept.score) == [scores[1]]
    assert read_dataset(out, "counts")["count"].tolist() == [1]


def test_cfar_engine_runs_the_demo_catalog_without_a_model(tmp_path):
    """`run --engine cfar` end to end (real CLI, demo catalog): no model is loaded or even looked for (a
    --model that does not exist is never opened), and the outputs are those of the same tiling, geo, NMS
    and GeoParquet path: counts = detections after NMS, every box inside its tile's footprint."""
    out = tmp_path / "out"
    args = ["run", "--aoi", str(AOIS / "demo_all.geojson"), "--start", "2015-01", "--out", str(out)]
    proc = run_cli(*args, "--engine", "cfar", "--model", str(tmp_path / "no-model-here"))
    assert proc.returncode == 0, proc.stderr
    assert "run " in proc.stdout and "with model cfar" in proc.stdout
    detections = read_dataset(out, "detections")
    tiles = read_dataset(out, "tiles")
    counts = read_dataset(out, "counts")
    assert sorted(counts.scene_id) == sorted(DEMO_IDS)
    assert len(detections) > 0  # land clutter of the demo scenes (CFAR knows no land)
    for sid in DEMO_IDS:
        n = int((detections.scene_id == sid).sum())
        assert int(counts[counts.scene_id == sid]["count"].iloc[0]) == n
        assert int(tiles[tiles.scene_id == sid].count_ship.sum()) == n
    footprint = {(r.scene_id, r.tile_id): r.geometry for r in tiles.itertuples()}
    for d in detections.itertuples():
        assert footprint[(d.scene_id, d.tile_id)].buffer(1e-9).covers(d.geometry)
    assert detections.score.between(0, 1).all() and detections.score.notna().all()
    assert (detections.model_id == "cfar").all() and (tiles.model_id == "cfar").all()
    assert tiles.scene_class.isna().all()  # CFAR answers detection and counting, not tile classes


def test_a_cut_answer_that_does_not_parse_is_one_parse_failure(tmp_path, generated_demo_model):
    """--max-new-tokens 1 cuts both answers of the tile (detection, class) and neither parses: 2 failures,
    not 4 (each answer had two error strings, "answer cut" and the parse error)."""
    summary = run(RunConfig(**{**CAMARGUE_RUN, "max_new_tokens": 1}, out=tmp_path / "o"))
    [scene] = summary.scenes
    assert scene.tiles_inferred == 1 and scene.parse_failures == 2
    tiles = read_dataset(tmp_path / "o", "tiles")
    assert tiles.error.iloc[0].count("answer cut") == 2  # the tiles table keeps every reason
