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
