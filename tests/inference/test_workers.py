"""Dask clients for model tasks: the GPU resource, unreachable schedulers, no hangs."""

import time

import pytest
from distributed import LocalCluster

from fusarbatch.errors import FusarbatchError
from fusarbatch.inference.workers import GPU_RESOURCE, resolve_device, start_client
from tests.conftest import free_port


def test_local_cluster_declares_the_gpu_resource():
    client, cluster = start_client(None, workers=1)
    try:
        info = client.scheduler_info()["workers"]
        assert [w["resources"] for w in info.values()] == [GPU_RESOURCE]
        assert client.submit(lambda: 41 + 1, resources=GPU_RESOURCE).result(timeout=30) == 42
    finally:
        client.close()
        cluster.close()


def test_scheduler_without_gpu_workers_is_rejected():
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    try:
        with pytest.raises(FusarbatchError, match="GPU resource"):
            start_client(cluster.scheduler_address)
    finally:
        cluster.close()


def test_unreachable_scheduler_fails_within_timeout():
    t0 = time.monotonic()
    with pytest.raises(FusarbatchError, match="cannot connect"):
        start_client(f"tcp://127.0.0.1:{free_port()}", connect_timeout_s=3)
    assert time.monotonic() - t0 < 15


def test_resolve_device_on_a_cpu_machine():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device(None) == "cpu"
    assert resolve_device("cuda") == "cpu"
    if not torch.backends.mps.is_available():
        assert resolve_device("mps") == "cpu"  # Apple GPU asked for on another machine: CPU, with a warning
    with pytest.raises(FusarbatchError, match="--require-gpu"):
        resolve_device(None, require_gpu=True)


@pytest.mark.parametrize("address", ["garbage", "tcp://127.0.0.1", "tcp://:x"])
def test_malformed_scheduler_address_is_a_usage_error(address):
    from fusarbatch.errors import UsageError

    with pytest.raises(UsageError, match="not a scheduler address"):
        start_client(address, connect_timeout_s=2)


# ---- no hang on a scheduler that is not one; loopback only (issue 10) -----------------------------------


@pytest.mark.timeout(60)
def test_scheduler_port_that_accepts_and_never_answers_fails_within_timeout(silent_server):
    address = "tcp://" + silent_server.removeprefix("http://").rstrip("/")
    t0 = time.monotonic()
    with pytest.raises(FusarbatchError, match=rf"^--scheduler {address}: cannot connect within 2 s"):
        start_client(address, connect_timeout_s=2)
    assert time.monotonic() - t0 < 2 + 3


@pytest.mark.timeout(60)
def test_scheduler_address_of_an_http_server_fails_within_timeout():
    from tests.conftest import RangeFileHandler, serve

    with serve(RangeFileHandler) as url:
        address = "tcp://" + url.removeprefix("http://").rstrip("/")
        t0 = time.monotonic()
        with pytest.raises(FusarbatchError, match=rf"^--scheduler {address}: "):
            start_client(address, connect_timeout_s=2)
    assert time.monotonic() - t0 < 2 + 3


def _listening() -> set[tuple[str, int]]:
    import psutil

    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


@pytest.mark.parametrize("dashboard", [False, True])
def test_local_cluster_listens_on_loopback_only_and_serves_the_dashboard_only_when_asked(dashboard, caplog):
    import urllib.request

    before = _listening()
    with caplog.at_level("INFO", logger="fusarbatch.inference.workers"):
        client, cluster = start_client(None, workers=2, dashboard=dashboard)
    try:
        opened = _listening() - before
        assert opened and {ip for ip, _ in opened} == {"127.0.0.1"}, opened
        assert 8787 not in {port for _, port in opened}  # never the default port of a shared machine
        port = client.scheduler_info()["services"]["dashboard"]  # Dask's HTTP server, always there
        assert ("127.0.0.1", port) in opened
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dask dashboard")]
        assert said == ([f"Dask dashboard: http://127.0.0.1:{port}/status"] if dashboard else [])
    finally:
        client.close()
        cluster.close()
