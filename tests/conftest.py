"""Shared pytest fixtures. Each stage keeps its fixtures in its own section below.

Fixtures that generate data say so in their names ("generated").
"""

from __future__ import annotations

import contextlib
import copy
import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# =========================================================================================================
# catalog stage (tests/catalog): demo catalog paths, real STAC items, a real STAC API on loopback
# =========================================================================================================

DEMO_DIR = REPO / "catalogs" / "demo"
DEMO_CATALOG = DEMO_DIR / "catalog.json"
DEMO_AOIS = DEMO_DIR / "aois"
STAC_DATA = TESTS / "data" / "stac"

#: Real Sentinel-1 STAC Items copied into tests/data/stac (see SOURCE.txt there).
REAL_IW_ITEM = (
    STAC_DATA / "stactools_sentinel1" / "S1A_IW_GRDH_1SDV_20210809T173953_20210809T174018_039156_049F13.json"
)
REAL_EW_ITEM = (
    STAC_DATA / "stactools_sentinel1" / "S1A_EW_GRDM_1SDH_20221130T014342_20221130T014446_046117_058549.json"
)
REAL_PC_ITEM = STAC_DATA / "planetary_computer" / "sentinel-1-grd-item-raw.json"

DEMO_IDS = (
    "S1A_IW_GRD_20150309T173017_VV_camargue",
    "SEN12MS_ROIs1158_spring_s1_1_p30",
    "S1A_IW_GRDH_1SDV_20210119T031653_20210119T031718_036201_043ED0_8255_quicklook",
)

#: Acquisition times of the generated copies of the real IW item: mid-month, plus the last second of a
#: month and the first second of the next, so that month boundaries are exercised.
GENERATED_DATETIMES = (
    "2024-01-15T12:00:00Z",
    "2024-02-29T23:59:59Z",
    "2024-03-01T00:00:00Z",
    "2024-04-15T12:00:00Z",
    "2024-05-31T23:59:59Z",
    "2024-06-01T00:00:00Z",
    "2024-07-15T12:00:00Z",
    "2024-08-15T12:00:00Z",
)
GENERATED_COLLECTION = "generated-s1"


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def demo_items_absolute() -> list[dict[str, Any]]:
    """The 3 demo items as dicts, asset hrefs absolute paths into catalogs/demo/data."""
    import pystac

    root = pystac.Catalog.from_file(str(DEMO_CATALOG))
    out = []
    for item in root.get_items(recursive=True):
        item.make_asset_hrefs_absolute()
        out.append(item.to_dict(include_self_link=False, transform_hrefs=False))
    return out


def generated_iw_copies() -> list[dict[str, Any]]:
    """Copies of the real IW item (same footprint and assets) with ids ``generated-iw-<i>``, the datetimes
    in :data:`GENERATED_DATETIMES` (start/end_datetime removed) and collection ``generated-s1``."""
    real = load_json(REAL_IW_ITEM)
    out = []
    for i, when in enumerate(GENERATED_DATETIMES):
        item = copy.deepcopy(real)
        item["id"] = f"generated-iw-{i}"
        item["collection"] = GENERATED_COLLECTION
        item["properties"]["datetime"] = when
        item["properties"].pop("start_datetime", None)
        item["properties"].pop("end_datetime", None)
        item["links"] = [link for link in item["links"] if link["rel"] in ("license", "about")]
        out.append(item)
    return out


#: A generated item across the antimeridian near Fiji, footprint split at +-180 (lon 179 -> 181 in all).
GENERATED_FIJI_ID = "generated-fiji-0"


def generated_fiji_item() -> dict[str, Any]:
    """A copy of the real IW item moved across the antimeridian near Fiji: a MultiPolygon footprint
    lon [179, 180] + [-180, -179], lat [-17, -16.5], at 2024-09-01T06:00:00Z, collection ``generated-s1``."""
    item = generated_iw_copies()[0]
    item["id"] = GENERATED_FIJI_ID
    item["properties"]["datetime"] = "2024-09-01T06:00:00Z"
    item["geometry"] = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[179.0, -17.0], [180.0, -17.0], [180.0, -16.5], [179.0, -16.5], [179.0, -17.0]]],
            [[[-180.0, -17.0], [-179.0, -17.0], [-179.0, -16.5], [-180.0, -16.5], [-180.0, -17.0]]],
        ],
    }
    item["bbox"] = [179.0, -17.0, -179.0, -16.5]
    return item


def equal_area_share(aoi: Any, footprint: Any) -> float:
    """Coverage share computed independently of fusarbatch: planar areas in a Lambert azimuthal
    equal-area projection centred on the AOI, after densifying the lon/lat edges to 0.001 degree."""
    import numpy as np
    import shapely
    from pyproj import Transformer

    centre = aoi.centroid
    transformer = Transformer.from_crs(
        4326, f"+proj=laea +lat_0={centre.y} +lon_0={centre.x} +ellps=WGS84", always_xy=True
    )

    def area(geom: Any) -> float:
        dense = shapely.segmentize(geom, 0.001)
        projected = shapely.transform(
            dense, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))
        )
        return projected.area

    return area(aoi.intersection(footprint)) / area(aoi)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class StacApi:
    """A running ``rustac serve`` on loopback."""

    url: str
    items: tuple[dict[str, Any], ...]


def _rustac() -> str:
    beside = Path(sys.executable).parent / "rustac"
    found = str(beside) if beside.exists() else shutil.which("rustac")
    if not found:
        pytest.fail("the rustac binary is missing: install the dev extras (`pip install rustac==0.9.9`)")
    return found


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM a server started by a test, SIGKILL it if it is still there after ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@pytest.fixture(scope="session")
def stac_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StacApi]:
    """A real STAC API (``rustac serve``, in-memory backend) on a free loopback port, loaded with the 3 demo
    items (absolute asset hrefs), the 3 real items of tests/data/stac, 8 generated copies of the real IW
    item (:func:`generated_iw_copies`) and one generated item across the antimeridian
    (:func:`generated_fiji_item`). Stopped at the end of the session."""
    folder = tmp_path_factory.mktemp("stac_api_generated")
    items = [
        *demo_items_absolute(),
        load_json(REAL_IW_ITEM),
        load_json(REAL_EW_ITEM),
        load_json(REAL_PC_ITEM),
        *generated_iw_copies(),
        generated_fiji_item(),
    ]
    source = folder / "items_generated.json"
    source.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = (folder / "rustac.log").open("w")
    proc = subprocess.Popen(
        [_rustac(), "serve", str(source), "--create-collections", "--addr", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"rustac serve exited with {proc.returncode}: {(folder / 'rustac.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rustac serve did not answer on {url} within 30 s")
            time.sleep(0.1)
        yield StacApi(url=url, items=tuple(items))
    finally:
        stop_process(proc, timeout=5)
        log.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """URL of a loopback TCP server that accepts connections and never answers (a hung STAC API)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.05)  # so that the accept loop sees `stop` promptly
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"
    finally:
        stop.set()
        thread.join(timeout=2)
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def closed_port_url() -> str:
    """URL of a loopback port nothing listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/"


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the real ``fusarbatch`` console script (the one installed beside this Python) in the repo root.

    The terminal is wide (``COLUMNS=250``) so that rich tables do not fold item ids.
    """
    script = Path(sys.executable).parent / "fusarbatch"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "fusarbatch.cli"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "250", **(env or {})}
    full_env.pop("FUSARBATCH_CATALOGS", None)
    return subprocess.run(
        [*command, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------------------- run / pipeline


@pytest.fixture(scope="session")
def generated_demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model directory: the packaged demo model (trained on real SAR chips, issue 9), or, in a
    checkout without it, the tiny random-weight model (generated) built once in a temporary cache.

    ``FUSARBATCH_CACHE`` points there for the whole session, so runs without ``--model`` find it.
    """
    cache = tmp_path_factory.mktemp("fusarbatch_cache")
    os.environ["FUSARBATCH_CACHE"] = str(cache)
    from fusarbatch.model.demo import demo_model_dir

    return demo_model_dir()


#: The grid of :func:`generated_fixed_answer_model` (its ``tlm_config.json`` ``image_size``) and the answer it
#: was trained to give to the ship detection prompt: two boxes on that grid.
FIXED_GRID = 336
FIXED_ANSWER = (
    '[{"bbox_2d": [168, 0, 336, 84], "label": "ship"}, {"bbox_2d": [0, 252, 84, 336], "label": "ship"}]'
)


def _build_fixed_answer_model(root: Path, answer: str) -> Path:
    """A tiny full FUSAR-GPT directory whose model grid is 336 (``tlm_config.json`` ``image_size``), blind
    to the image (its vision merger's last layer is zero, so every image gives the same visual tokens) and
    trained (generated: 50 Adam steps of the language model on one random-pixel 336 x 336 image, a few
    seconds on one core) to answer the ship detection prompt with ``answer``, for any image. Its
    token probabilities are high but not 1, and differ between tokens, so the per-box scores of the two
    boxes differ. Built once; the fixture checks that greedy decoding of another image gives the answer."""
    import numpy as np
    import torch
    from PIL import Image

    from fusarbatch.model import TLM, FusarGPT, TLMConfig, build_tiny_model, detection_prompt
    from training.data import Collator

    base = build_tiny_model(root / "base", seed=0, init_std=0.02, embed_std=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fusar = FusarGPT.from_pretrained(base, init_tlm=True, device="cpu")
        fusar.tlm = TLM(fusar.tlm.hidden_size, TLMConfig(image_size=FIXED_GRID))
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (FIXED_GRID, FIXED_GRID, 3), dtype=np.uint8))
        item = {"image": image, "question": detection_prompt("ship"), "answer": answer, "anchors": None}
        batch = Collator(fusar.processor)([item])
        anchors = batch.pop("anchors")
        last = fusar.visual.merger.mlp[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        fusar.train()
        trained = [p for n, p in fusar.base_model.named_parameters() if "visual" not in n]
        for p in fusar.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.Adam(trained, lr=1e-2)
        for _ in range(50):
            loss = fusar(anchors, **batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    fusar.eval()
    other = Image.fromarray(rng.integers(0, 256, (504, 504, 3), dtype=np.uint8))
    [got] = fusar.generate([other], [detection_prompt("ship")], [None], max_new_tokens=80)
    if got != answer:
        pytest.fail(f"the generated fixed-answer model did not learn its answer: {got!r}")
    out = fusar.save_full(root / "model")
    assert json.loads((out / "tlm_config.json").read_text())["image_size"] == FIXED_GRID
    return out


@pytest.fixture(scope="session")
def generated_fixed_answer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`_build_fixed_answer_model` answering :data:`FIXED_ANSWER` (two boxes labelled ``ship``)."""
    return _build_fixed_answer_model(tmp_path_factory.mktemp("fixed_answer_model"), FIXED_ANSWER)


#: What :func:`generated_vessel_answer_model` answers to "detect: ship": the same two boxes in its own word.
VESSEL_ANSWER = FIXED_ANSWER.replace('"ship"', '"vessel"')


@pytest.fixture(scope="session")
def generated_vessel_answer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`_build_fixed_answer_model` answering :data:`VESSEL_ANSWER`: asked for ships, it labels its two
    boxes ``vessel`` (as a real model may use another word than the one asked)."""
    return _build_fixed_answer_model(tmp_path_factory.mktemp("vessel_answer_model"), VESSEL_ANSWER)


# ------------------------------------------------------------------------------ hostile inputs and servers


def _release_readers(path: Path) -> bool:
    """Open the FIFO for writing and close it at once: a reader blocked in ``open()`` goes on and reads
    end-of-file. False when no reader is waiting (ENXIO)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def generated_fifo(path: Path, release_after_s: float = 15.0) -> Iterator[Path]:
    """A real FIFO (named pipe) at ``path``. A reader blocked on it (the bug a test looks for) is released
    after ``release_after_s`` (it then reads end-of-file), so that such a bug fails the test instead of
    hanging the suite: a blocked ``open()`` in C code (pyarrow, GDAL) is not interrupted by
    pytest-timeout's signal. Removed on exit."""
    os.mkfifo(path)
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(release_after_s):
            return
        while not done.wait(0.1):
            _release_readers(path)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join(timeout=5)
        _release_readers(path)
        path.unlink(missing_ok=True)


class RangeFileHandler(http.server.SimpleHTTPRequestHandler):
    """``http.server``'s file handler plus single byte ranges (GDAL's ``/vsicurl/`` reads COGs by range),
    quiet."""

    def send_head(self):  # type: ignore[no-untyped-def]
        spec = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not spec.startswith("bytes=") or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, _, last = spec[len("bytes=") :].split(",")[0].partition("-")
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
        body = data[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def end_headers(self) -> None:
        if "Range" not in self.headers:
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A real threaded ``http.server`` on a free 127.0.0.1 port with ``handler``; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """The files under ``root`` over HTTP on 127.0.0.1, byte ranges included; yields the base URL."""
    handler = functools.partial(RangeFileHandler, directory=str(root))
    with serve(handler) as url:  # type: ignore[arg-type]
        yield url
