"""Bad input found by adversarial testing: one line, exit 2, no traceback, nothing written."""

import pytest

from tests.conftest import REPO, run_cli

CAMARGUE = str(REPO / "catalogs/demo/aois/camargue.geojson")


def assert_usage_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_markup_like_paths_are_printed_verbatim(tmp_path):
    proc = run_cli("search", "--aoi", "/tmp/x/[/]a.geojson", "--start", "2015-01")
    assert_usage_error(proc, "/tmp/x/[/]a.geojson")
    proc = run_cli("search", "--aoi", "/tmp/[red]x[/red].geojson", "--start", "2015-01")
    assert_usage_error(proc, "/tmp/[red]x[/red].geojson")


@pytest.mark.parametrize(("size", "overlap"), [("28", "28"), ("64", "1000"), ("100000", "0")])
def test_bad_tiling_parameters_fail_before_anything_is_written(tmp_path, size, overlap):
    out = tmp_path / "out"
    proc = run_cli(
        "tile",
        "--aoi",
        CAMARGUE,
        "--start",
        "2015-01",
        "--out",
        str(out),
        "--tile-size",
        size,
        "--overlap",
        overlap,
    )
    assert_usage_error(proc, "--tile-size" if overlap == "0" else "--overlap")
    assert not out.exists()


def test_unwritable_outputs_are_usage_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_usage_error(
        run_cli("tile", "--aoi", CAMARGUE, "--start", "2015-01", "--out", str(blocker)), "--out"
    )
    assert_usage_error(
        run_cli("search", "--aoi", CAMARGUE, "--start", "2015-01", "--save", str(tmp_path)), "--save"
    )
    proc = run_cli("search", "--aoi", CAMARGUE, "--start", "2015-01", "--save", str(blocker / "x.parquet"))
    assert_usage_error(proc, "--save")
    assert blocker.read_text() == "x"


def test_catalog_toml_with_wrong_types_names_the_key(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('kind = "static"\nhref = "x/catalog.json"\ntimeout_s = "abc"\n')
    assert_usage_error(
        run_cli("search", "--aoi", CAMARGUE, "--start", "2015-01", "--catalog", str(toml)), "timeout_s"
    )
    toml.write_text('kind = "static"\nhref = 5\n')
    assert_usage_error(
        run_cli("search", "--aoi", CAMARGUE, "--start", "2015-01", "--catalog", str(toml)), "href"
    )
