"""The vLLM engine's parts that need no vLLM: the missing-extra usage error and the embeddings shape check."""

import importlib.util

import pytest
import torch

from fusarbatch.engines.vllm_engine import VLLM_EXTRA, check_image_embeds, require_vllm
from fusarbatch.errors import ModelError, UsageError
from fusarbatch.model.fusar_gpt import ProcessedImage
from tests.conftest import REPO, run_cli
from tests.test_cli_bad_input import assert_usage_error

no_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here (the extra is present)"
)


@no_vllm
def test_engine_vllm_without_the_extra_is_one_usage_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    aoi = str(REPO / "catalogs/demo/aois/demo_all.geojson")
    proc = run_cli("run", "--aoi", aoi, "--start", "2015-01", "--out", str(out), "--engine", "vllm")
    assert_usage_error(proc, "--engine vllm", f'pip install "{VLLM_EXTRA}"')
    assert not out.exists()
    with pytest.raises(UsageError, match=r"fusarbatch\[vllm\]"):
        require_vllm()


def test_unknown_engine_is_a_usage_error(tmp_path):
    proc = run_cli(
        "run", "--aoi", "x.geojson", "--start", "2015-01", "--out", str(tmp_path), "--engine", "tgi"
    )
    assert_usage_error(proc, "engine", "expected one of hf, vllm, cfar")


def _image(t=1, h=36, w=36):
    return ProcessedImage(torch.zeros(t * h * w, 1176), torch.tensor([t, h, w]), t * h * w // 4)


def test_embeddings_of_the_right_shape_pass_the_check():
    check_image_embeds(torch.randn(324, 128), _image(), hidden_size=128, merge_size=2)


@pytest.mark.parametrize(
    ("tokens", "image", "needle"),
    [
        (torch.randn(323, 128), _image(), "expected (324, 128)"),  # one token short
        (torch.randn(324, 64), _image(), "expected (324, 128)"),  # another model's hidden size
        (torch.randn(324, 128), _image(1, 35, 36), "grid_thw [1, 35, 36]"),  # odd grid
        (torch.randn(324, 128), _image(0, 36, 36), "grid_thw [0, 36, 36]"),
        (torch.full((324, 128), float("nan")), _image(), "not finite"),
        (torch.ones(324, 128, dtype=torch.int64), _image(), "not finite floating-point"),
    ],
)
def test_embeddings_that_do_not_fit_never_reach_the_engine(tokens, image, needle):
    with pytest.raises(ModelError, match="image embeddings") as err:
        check_image_embeds(tokens, image, hidden_size=128, merge_size=2)
    assert needle in str(err.value)
