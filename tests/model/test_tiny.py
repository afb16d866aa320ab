"""The offline tiny Qwen2.5-VL: deterministic, fast, and shaped like the real model's inputs."""

from __future__ import annotations

import json
import time

from safetensors.torch import load_file

from fusarbatch.model import build_tiny_model, detection_prompt, format_detection_answer, load_processor
from fusarbatch.model.prompts import Box


def test_same_seed_same_files_other_seed_other_weights(generated_tiny_model_dir, tmp_path) -> None:
    start = time.perf_counter()
    again = build_tiny_model(tmp_path / "again", seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (generated_tiny_model_dir / name).read_bytes(), name
    other = load_file(str(build_tiny_model(tmp_path / "other", seed=1) / "model.safetensors"))
    first = load_file(str(again / "model.safetensors"))
    assert other.keys() == first.keys()
    assert any(not (other[k] == first[k]).all() for k in first)


def test_config_matches_the_stack_recipe(generated_tiny_model_dir) -> None:
    cfg = json.loads((generated_tiny_model_dir / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert cfg["model_type"] == "qwen2_5_vl"
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 4)
    assert text["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert (vision["spatial_merge_size"], vision["patch_size"], vision["out_hidden_size"]) == (2, 14, 64)
    assert 550 <= text["vocab_size"] <= 650


def test_tokenizer_and_processor(generated_tiny_model_dir, generated_image) -> None:
    proc = load_processor(generated_tiny_model_dir)
    tok = proc.tokenizer
    answer = format_detection_answer([Box("plane", 102, 267, 161, 328)])
    ids = tok(answer)["input_ids"]
    assert tok.decode(ids) == answer
    assert len(ids) < len(answer)  # BPE merges: fewer tokens than characters
    assert tok.convert_ids_to_tokens(tok(" 102")["input_ids"]) == ["\u0120", "1", "0", "2"]  # digits split
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|endoftext|>"):
        assert len(tok(special)["input_ids"]) == 1
    assert tok.padding_side == "left"
    text = proc.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": detection_prompt("ship")}],
            }
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("respond with None.<|im_end|>\n<|im_start|>assistant\n")
    enc = proc(text=[text], images=[generated_image(504, 504, 0)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 36, 36]]
    assert enc["pixel_values"].shape == (1296, 1176)
    assert int((enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == 324


def test_rope_options_reach_the_config_and_bad_ones_are_refused(tmp_path) -> None:
    import pytest
    import torch

    out = build_tiny_model(tmp_path / "rope", rope_theta=10.0, mrope_section=[1, 2, 5])
    rope = json.loads((out / "config.json").read_text())["text_config"]["rope_parameters"]
    assert (rope["rope_theta"], rope["mrope_section"]) == (10.0, [1, 2, 5])
    # the width section (last) turns by theta ** (-3 / 8) rad per position at its fastest: 0.42 here,
    # 0.03 with Qwen's theta 1e4 (why the demo preset sets it)
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    inv = model.model.language_model.rotary_emb.inv_freq
    assert torch.isclose(inv[3], torch.tensor(10.0 ** (-3 / 8)))
    bads = (
        {"mrope_section": [2, 3, 4]},
        {"mrope_section": [0, 4, 4]},
        {"mrope_section": [2.9, 3, 3]},  # was truncated to [2, 3, 3] (hostile round 5)
        {"mrope_section": [True, True, 6]},
        {"mrope_section": "233"},
        {"mrope_section": [float("nan"), 4, 4]},
        {"rope_theta": 1.0},
        {"rope_theta": float("inf")},  # was accepted: every frequency but the first became 0
        {"rope_theta": 1e308},
        {"rope_theta": "10"},
    )
    for bad in bads:
        with pytest.raises(ValueError, match=r"mrope_section|rope_theta"):
            build_tiny_model(tmp_path / "bad", **bad)
