"""Local inputs (fusarbatch.files, issue 10): FIFOs and devices as catalog, item, asset, AOI, config, AEF
index or COG are refused before they are opened (a FIFO blocks ``open()`` until a writer comes: a cron
run would hang), and every JSON/TOML read has a size cap (``/dev/zero`` never ends). Real FIFOs
(``os.mkfifo``), real devices, sparse files; each test has a hard timeout, so a reader that blocks fails
the test instead of hanging the suite."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import shapely

from fusarbatch.catalog import BandRef, Scene
from fusarbatch.catalog.aoi import load_aoi
from fusarbatch.catalog.spec import resolve_catalog
from fusarbatch.config import read_config_file
from fusarbatch.errors import AOIError, CatalogError, FusarbatchError, UsageError
from tests.conftest import DEMO_CATALOG, REPO, generated_fifo

pytestmark = pytest.mark.timeout(60)

CAMARGUE_ITEM = (
    DEMO_CATALOG.parent
    / "fusarbatch-demo-s1/S1A_IW_GRD_20150309T173017_VV_camargue/S1A_IW_GRD_20150309T173017_VV_camargue.json"
)


@pytest.fixture
def fifo(tmp_path):
    with generated_fifo(tmp_path / "generated_fifo") as path:
        yield path


def test_fifo_device_socket_and_directory_are_refused_unopened(tmp_path, fifo):
    from fusarbatch.files import check_regular, read_capped

    sock_path = tmp_path / "generated.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, kind in (
            (fifo, "a FIFO (named pipe)"),
            (Path("/dev/zero"), "a character device"),
            (sock_path, "a socket"),
            (tmp_path, "a directory"),
        ):
            expected = re.escape(f"--x {path}: {kind}, not a regular file; give a file")
            with pytest.raises(UsageError, match=f"^{expected}$"):
                check_regular(path, "--x", UsageError, "give a file")
            with pytest.raises(UsageError, match="not a regular file"):
                read_capped(path, "--x", UsageError, 10)
    finally:
        sock.close()
    with pytest.raises(FileNotFoundError):
        check_regular(tmp_path / "nope", "--x", UsageError)


def test_read_capped_reads_up_to_the_cap_and_no_further(tmp_path):
    from fusarbatch.files import MAX_TOML_BYTES, read_capped

    small = tmp_path / "small.json"
    small.write_bytes(b"x" * 100)
    assert read_capped(small, "--x", UsageError, 100) == b"x" * 100
    with pytest.raises(UsageError, match="larger than 99 bytes"):
        read_capped(small, "--x", UsageError, 99)
    sparse = tmp_path / "generated_sparse.toml"  # 2 GiB of holes: no disk used, refused from its size
    with sparse.open("wb") as fh:
        fh.truncate(2**31)
    started = time.monotonic()
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        read_capped(sparse, "--config", UsageError, MAX_TOML_BYTES)
    assert time.monotonic() - started < 5


def test_config_fifo_device_and_huge_file_are_usage_errors(tmp_path, fifo):
    with pytest.raises(UsageError, match=rf"^--config {fifo}: a FIFO \(named pipe\), not a regular file"):
        read_config_file(fifo)
    with pytest.raises(UsageError, match=r"^--config /dev/zero: a character device, not a regular file"):
        read_config_file(Path("/dev/zero"))
    huge = tmp_path / "generated_huge.toml"
    huge.write_text('aoi = "a.geojson"\n' + "# padding\n" * 200_000)  # 2 MB of valid TOML
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        read_config_file(huge)


@pytest.mark.parametrize("suffix", [".toml", ".json", ".parquet"])
def test_catalog_file_that_is_a_fifo_is_refused(tmp_path, suffix):
    path = tmp_path / f"generated_catalog{suffix}"
    expected = rf"^--catalog {path}: a FIFO \(named pipe\), not a regular file"
    with generated_fifo(path), pytest.raises(CatalogError, match=expected):
        resolve_catalog(str(path))


def test_static_catalog_item_that_is_a_fifo_or_device_is_skipped(tmp_path, fifo, caplog):
    """A local static catalog linking to a FIFO and to /dev/zero as items: both skipped with a warning,
    the real item found."""
    from fusarbatch.catalog import search
    from fusarbatch.catalog.dates import parse_period

    catalog = tmp_path / "catalog.json"
    links = [{"rel": "root", "href": str(catalog)}] + [
        {"rel": "item", "href": str(h), "type": "application/json"}
        for h in (fifo, "/dev/zero", CAMARGUE_ITEM)
    ]
    catalog.write_text(
        json.dumps(
            {
                "type": "Catalog",
                "stac_version": "1.0.0",
                "id": "generated",
                "description": "generated",
                "links": links,
            }
        )
    )
    aoi = load_aoi(DEMO_CATALOG.parent / "aois" / "camargue.geojson")
    result = search(resolve_catalog(str(catalog)), aoi, *parse_period("2015-01", None))
    assert [s.item_id for s in result.scenes] == ["S1A_IW_GRD_20150309T173017_VV_camargue"]
    skipped = [r.getMessage() for r in caplog.records if "skipped: item" in r.getMessage()]
    assert any("a FIFO (named pipe), not a regular file" in m for m in skipped), skipped
    assert any("/dev/zero: a character device" in m for m in skipped), skipped


def test_aoi_fifo_and_device_are_refused(fifo):
    with pytest.raises(AOIError, match=r"a FIFO \(named pipe\), not a regular file"):
        load_aoi(fifo)
    with pytest.raises(AOIError, match="a character device, not a regular file"):
        load_aoi(Path("/dev/zero"))


def test_raster_asset_that_is_a_fifo_fails_its_scene(tmp_path, fifo):
    from fusarbatch.tiling import tile_scene

    scene = Scene(
        item_id="generated-fifo-scene",
        datetime=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        footprint=shapely.box(4, 43, 5, 44),
        bands={"VV": BandRef(str(fifo))},
        crs="EPSG:32631",
    )
    result = tile_scene(scene, tmp_path / "tiles.zarr", tile_size=64, overlap=8)
    assert result.status == "failed"
    assert result.error == f"asset {fifo}: a FIFO (named pipe), not a regular file; give a raster file"


def test_aef_index_and_cog_that_are_fifos_are_refused(tmp_path):
    import geopandas as gpd
    import numpy as np

    from fusarbatch.features.alphaearth import AEFUnavailable, COGIndexSource, load_index

    index = tmp_path / "generated_index.parquet"
    with generated_fifo(index), pytest.raises(AEFUnavailable, match=r"^AEF index .*: a FIFO \(named pipe\)"):
        load_index(index)
    with generated_fifo(tmp_path / "generated_cog.tif") as cog:
        frame = gpd.GeoDataFrame(
            {"path": [str(cog)], "year": [2023], "crs": ["EPSG:32631"]},
            geometry=[shapely.box(3, 43, 5, 45)],
            crs=4326,
        )
        frame.to_parquet(tmp_path / "generated_fifo_index.parquet")
        source = COGIndexSource(tmp_path / "generated_fifo_index.parquet", missing_cog="raise")
        with pytest.raises(AEFUnavailable, match=r"a FIFO \(named pipe\), not a regular file"):
            source.sample(np.array([4.0]), np.array([44.0]), 2023)
        source.close()


def test_run_with_dev_zero_as_config_is_one_usage_error(tmp_path):
    """End to end: ``fusarbatch run --config /dev/zero`` (a real device that never ends) under a 2 GB
    address-space limit, so that a reader that slurps it fails fast instead of eating the machine."""
    script = Path(sys.executable).parent / "fusarbatch"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fusarbatch.cli"]

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*command, "run", "--config", "/dev/zero", "--out", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    message = json.loads(proc.stderr)["message"]
    assert message == "--config /dev/zero: a character device, not a regular file; give a TOML file"
    assert not (tmp_path / "out").exists()


def test_model_file_that_is_a_fifo_is_refused(tmp_path):
    from fusarbatch.model.checks import check_model_dir

    d = tmp_path / "model"
    shutil.copytree(REPO / "fusarbatch" / "model" / "demo_model", d)
    (d / "generation_config.json").unlink()
    expected = r"generation_config.json is a FIFO \(named pipe\), not a regular file"
    with generated_fifo(d / "generation_config.json"), pytest.raises(FusarbatchError, match=expected):
        check_model_dir(d)
