"""Bad input found by adversarial testing: one line, exit 2, no traceback, nothing written."""

import json

import pytest

from tests.conftest import REPO, run_cli

CAMARGUE = str(REPO / "catalogs/demo/aois/camargue.geojson")


def assert_usage_error(proc, *needles):
    """Exit 2, one stderr line (a JSON log line for `run`, whose stderr is not a terminal here)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    if proc.args[1] == "run":
        record = json.loads(line)
        assert record["event"] == "error" and record["exit_code"] == 2
        line = record["message"]
    for needle in needles:
        assert needle in line, line


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


# ---- found by a second hostile review (session 2) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("run", "--bogus"), "No such option: --bogus"),
        (("run", "--aoi", CAMARGUE, "--start", "2015-01", "--batch-size", "abc"), "'--batch-size'"),
        (("search", "--aoi", CAMARGUE, "--start", "2015-01", "--limit", "0"), "'--limit'"),
        (("search",), "Missing option '--aoi'"),
    ],
)
def test_command_line_syntax_errors_are_one_line(args, needle):
    """Not click's framed multi-line box: one line that says where the help is."""
    proc = run_cli(*args)
    assert_usage_error(proc, needle, f"(see `fusarbatch {args[0]} --help`)")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (("--tile-size", "100000"), "--tile-size 100000: at most 8192 pixels"),
        (("--overlap", "600"), "--overlap 600 must be smaller than --tile-size 504"),
        (("--device", "tpu"), "device: 'tpu': expected cpu, cuda, cuda:N or mps"),
        (("--label", "ship\x1b[31m[bold]x"), "labels: 'ship\\x1b[31m[bold]x': letters, digits"),
        (("--label", "a/b", "--label", "a_b"), "labels: 'a/b' and 'a_b' give the same column count_a_b"),
        (("--label", "Ship", "--label", "ship"), "give the same column count_ship; keep one"),
    ],
)
def test_run_options_are_checked_before_anything_is_written(tmp_path, flags, needle):
    """Formerly each of these failed every scene (exit 1) after the cluster had started."""
    out = tmp_path / "out"
    proc = run_cli("run", "--aoi", CAMARGUE, "--start", "2015-01", "--out", str(out), *flags)
    assert_usage_error(proc, needle)
    assert "\x1b" not in proc.stderr and not out.exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('aoi = "a.geojson"\nstart = 2015-01-01\n', 'start: quote the date: start = "2015-01-01"'),
        ('\ufeffaoi = "a.geojson"\nstart = "2015-01"\nbatch_size = 0\n', "batch_size"),  # BOM: read
        ("aoi = [unclosed\n", "not valid TOML"),
    ],
)
def test_config_file_mistakes_name_the_fix(tmp_path, text, needle):
    config = tmp_path / "run.toml"
    config.write_text(text, encoding="utf-8")
    assert_usage_error(run_cli("config", "show", "--config", str(config)), needle)
    missing = run_cli("config", "show", "--config", str(tmp_path / "none.toml"))
    assert_usage_error(missing, "none.toml: no such file; give the path of a TOML file")


def test_save_needs_a_parquet_name_and_huge_numbers_in_an_aoi_are_an_aoi_error(tmp_path):
    proc = run_cli("search", "--aoi", CAMARGUE, "--start", "2015-01", "--save", str(tmp_path / "x.csv"))
    assert_usage_error(proc, "x.csv: stac-geoparquet is written: give a .parquet file name")
    assert not (tmp_path / "x.csv").exists()
    aoi = tmp_path / "generated_bigint.geojson"
    aoi.write_text('{"type": "Point", "coordinates": [' + "9" * 5000 + ", 1]}")
    assert_usage_error(run_cli("search", "--aoi", str(aoi), "--start", "2015-01"), "unreadable JSON")


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--out", ""], "Invalid value for '--out': empty; give a path"),
        (["--out", " "], "Invalid value for '--out': empty; give a path"),
        (["--workers", "1000000"], "workers: Input should be less than or equal to 64"),
        (["--task-timeout", "inf"], "task_timeout_s: Input should be a finite number"),
        (["--scheduler-timeout", "1e300"], "scheduler_timeout_s: Input should be less than or equal to 3600"),
    ],
    ids=["out-empty", "out-blank", "workers-1e6", "timeout-inf", "scheduler-timeout-huge"],
)
def test_absurd_run_options_are_usage_errors(tmp_path, flags, needle):
    """Issue 10: ``--out ''`` was the current folder, a million workers a million threads, an infinite
    task timeout a wait for ever."""
    proc = run_cli("run", "--aoi", CAMARGUE, "--start", "2015-01", *(["--out", str(tmp_path / "o")]), *flags)
    assert_usage_error(proc, needle)
    assert not (tmp_path / "o").exists() and not (REPO / "run.lock").exists()


def test_empty_out_in_a_config_file_is_a_usage_error(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'aoi = "{CAMARGUE}"\nstart = "2015-01"\nout = ""\n')
    assert_usage_error(run_cli("run", "--config", str(config)), f"--config {config}: out: empty; give a path")
