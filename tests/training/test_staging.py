"""training/staging.py: a model's files appear in --out only once all are written."""

from __future__ import annotations

import pytest

from fusarbatch.errors import FusarbatchError
from training.staging import fresh_staging, move_into


def test_move_into_checks_every_target_first_and_moves_the_done_marker_last(tmp_path):
    """Hostile round 7: a folder named like one of the model's files stopped the move half way (a traceback,
    fusarbatch_train.json -- the marker make_demo.sh reads as done -- already moved in, no weights)."""
    out = tmp_path / "out"
    partial = fresh_staging(out)
    partial.mkdir(parents=True)
    for name in ("config.json", "fusarbatch_train.json", "model.safetensors", "tlm.safetensors"):
        (partial / name).write_text(name)
    (out / "model.safetensors").mkdir()
    (out / "model.safetensors" / "x").write_text("in the way")
    with pytest.raises(FusarbatchError, match=r"model\.safetensors: a folder in the way of the model's"):
        move_into(partial, out)
    assert sorted(p.name for p in out.iterdir()) == [".model.partial", "model.safetensors"]
    (out / "model.safetensors" / "x").unlink()
    (out / "model.safetensors").rmdir()
    (out / "config.json").write_text("old")
    move_into(partial, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "fusarbatch_train.json", "model.safetensors", "tlm.safetensors"
    ]  # fmt: skip
    assert (out / "config.json").read_text() == "config.json"
