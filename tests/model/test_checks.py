"""Model pre-checks (fusarbatch.model.checks): a config.json that does not describe its weights is refused
from the headers, before anything is allocated (issue 10: 1e6 layers would make the loader build them)."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from fusarbatch.errors import ModelError
from fusarbatch.model.checks import check_model_dir
from tests.conftest import REPO

DEMO = REPO / "fusarbatch" / "model" / "demo_model"


def _generated_copy(tmp_path, edit):
    d = tmp_path / "generated_model"
    shutil.copytree(DEMO, d)
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


def _million_layers(c):
    c["text_config"]["num_hidden_layers"] = 1_000_000
    del c["text_config"]["layer_types"]  # else transformers' own check catches the disagreement


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _million_layers,
            "config.json gives num_hidden_layers = 1000000 but the weights hold text layers 4 (0..3)",
        ),
        (
            lambda c: c["vision_config"].update(depth=32),
            "config.json gives vision_config.depth = 32 but the weights hold vision blocks 4 (0..3)",
        ),
        (
            lambda c: c["text_config"].update(hidden_size=4096),
            "config.json gives model.embed_tokens.weight the shape [980, 4096] but the weights hold "
            "[980, 128]",
        ),
        (
            lambda c: c["text_config"].update(intermediate_size=10_000_000),
            "config.json gives model.layers.0.mlp.gate_proj.weight the shape [10000000, 128] but the weights "
            "hold [256, 128]",
        ),
        (
            lambda c: c["vision_config"].update(hidden_size=1024, num_heads=16),
            "config.json gives visual.blocks.0.attn.qkv.weight the shape [3072, 1024] but the weights hold "
            "[192, 64]",
        ),
    ],
    ids=["1e6-layers", "vision-depth", "hidden-size", "intermediate-size", "vision-hidden"],
)
def test_config_that_does_not_describe_its_weights_is_refused_from_the_headers(tmp_path, edit, message):
    d = _generated_copy(tmp_path, edit)
    t0 = time.monotonic()
    with pytest.raises(ModelError) as info:
        check_model_dir(d)
    assert (
        str(info.value)
        == f"model dir {d}: {message}; config.json does not describe these weights: restore it"
    )
    assert time.monotonic() - t0 < 30  # a guard, not a speed target: the configuration is not built first


def test_the_packaged_model_passes():
    assert check_model_dir(DEMO) == DEMO
