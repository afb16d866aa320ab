"""The tile store and the GeoParquet never disagree (issue 10): ``fusarbatch tile --tile-size N`` (or
``features``) into a run folder makes the next ``run`` redo the scenes it touched, and ``status`` says so;
an empty incremental run lists no output path that does not exist. Real demo catalog, tiny model."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import zarr
from rich.console import Console

from fusarbatch.config import RunConfig
from fusarbatch.outputs.ledger import collect_status
from fusarbatch.outputs.provenance import OUTPUTS_MADE_FROM
from fusarbatch.pipeline import run
from fusarbatch.report import print_run_summary
from tests.conftest import REPO, run_cli

AOI = REPO / "catalogs" / "demo" / "aois" / "sen12ms.geojson"
SEN12MS = "SEN12MS_ROIs1158_spring_s1_1_p30"


def _cfg(out, **kw) -> RunConfig:
    return RunConfig(aoi=AOI, start="2017-01", out=out, max_new_tokens=8, device="cpu", **kw)


def test_tile_with_another_tile_size_into_a_run_folder_is_redone_by_the_next_run(
    tmp_path, generated_demo_model
):
    out = tmp_path / "out"
    first = run(_cfg(out))
    assert [s.scene_id for s in first.scenes] == [SEN12MS] and first.exit_code == 0
    group = zarr.open_group(str(out / "tiles.zarr" / SEN12MS), mode="r")
    assert group.attrs[OUTPUTS_MADE_FROM]["tiling_id"] == group.attrs["tiling_id"]
    assert collect_status(out)["out_of_step"] == []
    # the user re-tiles the run folder at another tile size (256 px: 4 tiles instead of 1)
    proc = run_cli(
        "tile",
        "--aoi",
        str(AOI),
        "--start",
        "2017-01",
        "--out",
        str(out),
        "--tile-size",
        "128",
        "--overlap",
        "16",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "redone by its next run" in proc.stdout
    assert zarr.open_group(str(out / "tiles.zarr" / SEN12MS), mode="r").attrs["tile_size"] == 128
    status = collect_status(out)
    [stale] = status["out_of_step"]
    assert stale["scene_id"] == SEN12MS and "tile size 128" in stale["reason"]
    assert stale["action"] == "the next run redoes it"
    status_text = run_cli("status", "--out", str(out))
    assert "changed since their outputs were made: 1" in status_text.stdout
    # the next run (tile size 504) redoes the scene: store and GeoParquet agree again
    again = run(_cfg(out))
    assert [s.scene_id for s in again.scenes] == [SEN12MS] and again.skipped == []
    group = zarr.open_group(str(out / "tiles.zarr" / SEN12MS), mode="r")
    assert (
        group.attrs["tile_size"] == 504
        and group.attrs[OUTPUTS_MADE_FROM]["tiling_id"] == group.attrs["tiling_id"]
    )
    tiles = gpd.read_parquet(next((out / "tiles").glob(f"date=*/{SEN12MS}.parquet")))
    assert len(tiles) == group.attrs["n_tiles"] == 1
    assert collect_status(out)["out_of_step"] == []
    # and now it is skipped again
    third = run(_cfg(out))
    assert third.scenes == [] and third.skipped == [SEN12MS]


def test_features_rewritten_after_the_outputs_are_out_of_step(tmp_path, generated_demo_model):
    out = tmp_path / "out"
    assert run(_cfg(out)).exit_code == 0
    proc = run_cli("features", "--out", str(out), "--anchors", "4", timeout=120)
    assert proc.returncode == 0, proc.stderr
    [stale] = collect_status(out)["out_of_step"]
    assert "AlphaEarth anchors were rewritten" in stale["reason"]
    again = run(_cfg(out))
    assert [s.scene_id for s in again.scenes] == [SEN12MS]


def test_an_empty_incremental_run_lists_only_outputs_that_exist(tmp_path, generated_demo_model):
    out = tmp_path / "fresh"
    # a rolling window of the last two days over the demo catalog (scenes of 2015-2021): nothing new
    summary = run(_cfg(out).model_copy(update={"start": "-P2D"}))
    assert summary.scenes == [] and summary.exit_code == 0
    console = Console(record=True, width=400)
    print_run_summary(console, summary)
    outputs = next(line for line in console.export_text().splitlines() if line.startswith("outputs:"))
    assert not (out / "detections").exists() and not (out / "tiles.zarr").exists()
    assert outputs.startswith("outputs: none written yet; ledger ")
    # after a run that wrote them, each listed path exists
    run(_cfg(out))
    console = Console(record=True, width=400)
    print_run_summary(console, summary)
    outputs = next(line for line in console.export_text().splitlines() if line.startswith("outputs:"))
    listed = [
        part.rsplit(" (", 1)[0] for part in outputs[len("outputs: ") :].split("; ledger")[0].split(", ")
    ]
    assert len(listed) == 6 and all(Path(p).exists() for p in listed), listed
