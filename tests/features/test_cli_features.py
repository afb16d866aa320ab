"""``fusarbatch features`` on a real tile store and generated AEF-format COGs (see conftest.py)."""

from __future__ import annotations

import zarr

from tests.conftest import run_cli

from .conftest import scene_tiles, write_scene_group

ROLES = ("west", "straddle", "nodata", "nowhere")


def _store(tmp_path, world):
    tiles = scene_tiles(world)
    write_scene_group(tmp_path / "tiles.zarr", "S1A_2023", [tiles[r] for r in ROLES])
    return tmp_path


def test_features_command_writes_anchors_and_reports_coverage(tmp_path, generated_aef_world):
    out = _store(tmp_path, generated_aef_world)
    index = str(generated_aef_world.index)
    proc = run_cli("features", "--out", str(out), "--aef-index", index, "--anchors", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split("\t") == ["scene", "tiles", "anchors", "AEF year", "coverage", "error"]
    scene, tiles, anchors, year, coverage, error = lines[2].split("\t")
    mask = zarr.open_group(str(out / "tiles.zarr"), mode="r")["S1A_2023"]["aef_mask"][:]
    assert (scene, tiles, anchors, year, error) == ("S1A_2023", "4", "16", "2023", "")
    assert mask.shape == (4, 16) and not mask[3].any() and mask[0].all()  # "nowhere" tile: no COG
    assert coverage == f"{100 * mask.mean():.1f}%"


def test_unreadable_aef_index_is_a_usage_error_and_touches_nothing(tmp_path, generated_aef_world):
    out = _store(tmp_path, generated_aef_world)
    proc = run_cli("features", "--out", str(out), "--aef-index", str(tmp_path / "missing.parquet"))
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: --aef-index: AEF index ") and "missing.parquet cannot be read" in line
    group = zarr.open_group(str(out / "tiles.zarr"), mode="r")["S1A_2023"]
    assert "aef_mask" not in set(group.array_keys())
