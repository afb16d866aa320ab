"""fusarbatch.errors: the one-line disk-full message, from OSErrors and from safetensors' write errors."""

from __future__ import annotations

import errno

import pytest
from safetensors import SafetensorError
from safetensors.torch import save_file

from fusarbatch.errors import as_os_error, disk_full


def test_safetensors_write_errors_read_as_their_os_error():
    exc = SafetensorError(
        "Error while serializing: IoError(Os { code: 28, kind: StorageFull }) (os error 28)"
    )
    err = as_os_error(exc)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    line = disk_full(exc, "a checkpoint in out/x")
    assert line is not None and line.startswith(
        "disk full (No space left on device) while writing a checkpoint"
    )
    other = ValueError("shape mismatch")
    assert as_os_error(other) is other and disk_full(other) is None
    assert disk_full(SafetensorError("... (os error 13)")) is None  # permission denied is not a full disk


def test_a_real_safetensors_write_past_the_file_size_limit(tmp_path):
    resource = pytest.importorskip("resource")
    import torch

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(Exception) as info:
            save_file({"w": torch.zeros(10_000)}, str(tmp_path / "w.safetensors"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert disk_full(info.value, "w") == (
        "disk full: file-size limit reached (File too large) while writing w; free space, then rerun "
        "(earlier outputs are kept)"
    )
