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


def test_serving_dir_is_complete_names_the_architecture_and_is_made_once(tmp_path):
    """What vLLM loads: the config with its architecture (a model built in code has none: vLLM then picks
    a pooling model), the weights linked, the stock processor's files; made once, atomically."""
    import json

    from fusarbatch.engines.vllm_engine import serving_dir
    from fusarbatch.model.demo import PACKAGED
    from fusarbatch.model.fusar_gpt import FusarGPT

    fusar = FusarGPT.from_pretrained(PACKAGED, device="cpu")
    fusar.base_model.config.architectures = None
    d = serving_dir(fusar, PACKAGED, "generated-fingerprint", tmp_path)
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (d / "model.safetensors").resolve() == (PACKAGED / "model.safetensors").resolve()
    pre = json.loads((d / "preprocessor_config.json").read_text())
    assert pre["processor_class"] == "Qwen2_5_VLProcessor" and pre["merge_size"] == 2
    assert json.loads((d / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    assert (d / "chat_template.jinja").read_text() == fusar.processor.chat_template
    assert json.loads((d / ".complete").read_text()) == {"format": 1, "merged": False}
    stamp = (d / "config.json").stat().st_mtime_ns
    assert serving_dir(fusar, PACKAGED, "generated-fingerprint", tmp_path) == d
    assert (d / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temporary folder left
    fusar.add_lora()
    with pytest.raises(ModelError, match="merge the LoRA"):
        serving_dir(fusar, PACKAGED, "other", tmp_path)
