"""FusarGPT on a real (tiny, randomly initialised) Qwen2.5-VL: wiring, generation, checkpoints, errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusarbatch.errors import FusarbatchError, ModelError, UsageError
from fusarbatch.model import (
    TLM_CONFIG_FILE,
    TLM_LEGACY_FILE,
    TLM_WEIGHTS_FILE,
    Anchors,
    FusarGPT,
    check_model_dir,
    counting_prompt,
    detection_prompt,
    grounding_prompt,
    load_tlm,
)
from fusarbatch.model.fusar_gpt import resolve_model_dirs
from fusarbatch.model.tlm import TLM_FORMAT


def randomise_lora(fusar: FusarGPT, seed: int = 0) -> None:
    """peft initialises lora_B to zero (adapter = identity); randomise it so round trips mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fusar.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def batch_inputs(fusar: FusarGPT, images, prompts) -> dict[str, torch.Tensor]:
    return fusar.build_inputs(images, prompts, image_size=None)


@pytest.fixture
def three(generated_image, generated_anchors):
    """Three images of different sizes and aspect ratios, three prompts, anchors (one image without)."""
    images = [generated_image(504, 504, 1), generated_image(280, 392, 2), generated_image(112, 168, 3)]
    prompts = [detection_prompt("plane"), counting_prompt("ship"), grounding_prompt("ship")]
    anchors = [generated_anchors(1), generated_anchors(2, n=9, n_invalid=3), None]
    return images, prompts, anchors


# ------------------------------------------------------------ wiring
def test_pooler_output_is_raster_order(fusar, generated_image) -> None:
    """With the vision blocks reduced to identity, merged token k is the merger of patches 4k..4k+3, i.e. the
    processor's raster order: the window permutation (non-trivial on an 18x18 merged grid) is undone."""
    from transformers.vision_utils import get_vision_window_index

    visual = fusar.visual
    with torch.no_grad():
        for block in visual.blocks:
            for lin in (block.attn.proj, block.mlp.down_proj):
                lin.weight.zero_()
                lin.bias.zero_()
    inputs = batch_inputs(fusar, [generated_image(504, 504, 7)], ["x"])
    grid = inputs["image_grid_thw"]
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=112, patch_size=14)
    assert not torch.equal(window_index, torch.arange(len(window_index)))  # the permutation is real
    with torch.no_grad(), fusar.use_anchors([None]):
        pooled = visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        expected = visual.merger(visual.patch_embed(inputs["pixel_values"]))
    assert pooled.shape == (324, 64)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_hook_applies_tlm_to_visual_output(fusar, three) -> None:
    images, prompts, anchors = three
    inputs = batch_inputs(fusar, images, prompts)
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 36, 36], [1, 20, 28], [1, 8, 12]]
    with torch.no_grad():
        with fusar.use_anchors([None, None, None]):
            raw = fusar.visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        with fusar.use_anchors(anchors):
            hooked = fusar.visual(inputs["pixel_values"], grid_thw=grid).pooler_output
        expected = fusar.tlm.modulate(raw, grid, anchors, 2)
    torch.testing.assert_close(hooked, expected, atol=0, rtol=0)
    assert not torch.allclose(hooked[:324], raw[:324], atol=1e-3)


def test_tlm_changes_logits_only_where_anchors_are_present(fusar, three) -> None:
    images, prompts, anchors = three
    inputs = batch_inputs(fusar, images, prompts)
    with torch.no_grad():
        plain = fusar(anchors=[None, None, None], **inputs).logits
        modulated = fusar(anchors=anchors, **inputs).logits
        only_second = fusar(anchors=[None, anchors[1], None], **inputs).logits
    mask = inputs["attention_mask"].bool()
    diff = (modulated - plain).abs().amax(-1)  # (B, L)
    assert float(diff[0][mask[0]].max()) > 1e-2 and float(diff[1][mask[1]].max()) > 1e-2
    torch.testing.assert_close(modulated[2], plain[2], atol=1e-5, rtol=1e-5)  # image 3 has no anchors
    # rows are independent: anchors of image 2 do not leak into images 1 and 3
    torch.testing.assert_close(only_second[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(only_second[1], modulated[1], atol=1e-5, rtol=1e-5)


def test_zero_tlm_is_identity_in_the_model(fusar, three) -> None:
    images, prompts, anchors = three
    inputs = batch_inputs(fusar, images, prompts)
    with torch.no_grad():
        fusar.tlm.film_mlp[2].weight.zero_()
        fusar.tlm.film_mlp[2].bias.zero_()
        plain = fusar(anchors=[None, None, None], **inputs).logits
        zero = fusar(anchors=anchors, **inputs).logits
    assert torch.equal(plain, zero)


def test_tlm_gets_gradients_through_the_hook(fusar, three) -> None:
    """Training (shared model definition): a frozen base still passes gradients to the TLM MLP."""
    images, prompts, anchors = three
    inputs = batch_inputs(fusar, images, prompts)
    fusar.train()
    for p in fusar.model.parameters():
        p.requires_grad_(False)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = fusar(anchors=anchors, labels=labels, **inputs)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in fusar.tlm.parameters())
    assert all(p.grad is None for p in fusar.model.parameters())


def test_running_the_vision_tower_without_anchors_is_an_error(fusar, three) -> None:
    images, prompts, _ = three
    inputs = batch_inputs(fusar, images[:1], prompts[:1])
    with pytest.raises(RuntimeError, match="without anchors"), torch.no_grad():
        fusar.model(**inputs)
    with pytest.raises(ValueError, match="anchor sets for 1 images"), torch.no_grad():
        fusar(anchors=[None, None], **inputs)


def test_vision_tower_runs_once_per_generate(fusar, three) -> None:
    images, prompts, anchors = three
    calls = []
    handle = fusar.visual.register_forward_hook(lambda m, a, o: calls.append(o.pooler_output.shape[0]))
    try:
        fusar.generate(images, prompts, anchors, max_new_tokens=5, image_size=None)
    finally:
        handle.remove()
    assert calls == [324 + 140 + 24]


# ------------------------------------------------------------ generation
def test_batched_generation_equals_one_at_a_time(fusar, three) -> None:
    images, prompts, anchors = three
    batched = fusar.generate_detailed(images, prompts, anchors, max_new_tokens=10, image_size=None)
    singles = [
        fusar.generate_detailed([im], [p], [a], max_new_tokens=10, image_size=None)[0]
        for im, p, a in zip(images, prompts, anchors, strict=True)
    ]
    assert [g.token_ids for g in batched] == [g.token_ids for g in singles]
    assert [g.text for g in batched] == [g.text for g in singles]
    for b, s in zip(batched, singles, strict=True):
        assert b.logprob == pytest.approx(s.logprob, abs=1e-3)
        assert b.logprob <= 0.0
    # the comparison is meaningful: rows differ, and anchors change the answers
    assert len({g.token_ids for g in batched}) == 3
    no_anchors = fusar.generate_detailed(images, prompts, None, max_new_tokens=10, image_size=None)
    assert no_anchors[0].token_ids != batched[0].token_ids
    assert no_anchors[2].token_ids == batched[2].token_ids  # image 3 had no anchors either way


def test_generate_returns_strings_and_flags(fusar, three) -> None:
    images, prompts, anchors = three
    texts = fusar.generate(images, prompts, anchors, max_new_tokens=4)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    detailed = fusar.generate_detailed(images, prompts, anchors, max_new_tokens=4)
    assert [g.text for g in detailed] == texts
    for g in detailed:
        assert len(g.token_ids) <= 4
        assert g.finished == (len(g.token_ids) < 4)
    assert fusar.generate([], [], [], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="2 anchor sets"):
        fusar.generate(images, prompts, anchors[:2])


def test_inputs_are_left_padded_and_resized_to_504(fusar, generated_image) -> None:
    images = [generated_image(300, 200, 1), generated_image(504, 504, 2)]
    inputs = fusar.build_inputs(images, [detection_prompt("ship"), "short"], image_size=fusar.image_size)
    assert inputs["image_grid_thw"].tolist() == [[1, 36, 36], [1, 36, 36]]
    image_id = fusar.base_model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [324, 324]
    mask = inputs["attention_mask"]
    assert int(mask[1, 0]) == 0 and int(mask[1, -1]) == 1 and bool(mask[0].all())  # left padding
    assert fusar.device.type == "cpu" and fusar.dtype == torch.float32 and fusar.image_size == 504


def test_bfloat16_model_generates_with_float32_tlm(load_fusar, three) -> None:
    fusar = load_fusar(dtype=torch.bfloat16)
    assert fusar.dtype == torch.bfloat16 and fusar.tlm.film_mlp[0].weight.dtype == torch.float32
    images, prompts, anchors = three
    out = fusar.generate_detailed(images, prompts, anchors, max_new_tokens=3, image_size=None)
    assert len(out) == 3 and all(len(g.token_ids) >= 1 for g in out)


# ------------------------------------------------------------ LoRA
def test_lora_targets_only_the_language_model(fusar) -> None:
    fusar.add_lora()
    names = fusar.lora_module_names()
    assert len(names) == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert all(".language_model." in n for n in names)
    assert not any("visual" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    cfg = fusar.model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 32, 0.05)
    with pytest.raises(ValueError, match="already attached"):
        fusar.add_lora()


def test_adapter_round_trip_gives_identical_generation(fusar, load_fusar, three, tmp_path) -> None:
    images, prompts, anchors = three
    before_lora = fusar.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    fusar.add_lora()
    randomise_lora(fusar)
    fusar.eval()
    expected = fusar.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    assert [g.token_ids for g in expected] != [g.token_ids for g in before_lora]  # the adapter matters
    ckpt = fusar.save(tmp_path / "ckpt")
    assert {"adapter_config.json", "adapter_model.safetensors", TLM_WEIGHTS_FILE, TLM_CONFIG_FILE} <= {
        p.name for p in ckpt.iterdir()
    }
    assert json.loads((ckpt / TLM_CONFIG_FILE).read_text()) == {
        "format": TLM_FORMAT, "sigma": 2.0, "hidden_mult": 4, "image_size": 504, "vec_dim": 64
    }  # fmt: skip

    loaded = load_fusar(ckpt)
    assert loaded.has_lora
    for (k, v), (k2, v2) in zip(fusar.tlm.state_dict().items(), loaded.tlm.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    got = loaded.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]


def test_merged_lora_matches_and_keeps_the_tlm(fusar, load_fusar, three, tmp_path) -> None:
    images, prompts, anchors = three
    fusar.add_lora()
    randomise_lora(fusar, seed=3)
    fusar.eval()
    inputs = batch_inputs(fusar, images, prompts)
    with torch.no_grad():
        unmerged = fusar(anchors=anchors, **inputs).logits
    ids = [
        g.token_ids
        for g in fusar.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    ]
    with pytest.raises(ValueError, match="merge"):
        fusar.save_full(tmp_path / "nope")
    fusar.merge_lora()
    assert not fusar.has_lora and fusar.lora_module_names() == []
    with torch.no_grad():
        merged = fusar(anchors=anchors, **inputs).logits
        plain = fusar(anchors=[None, None, None], **inputs).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-3, rtol=1e-4)
    assert float((merged - plain).abs().max()) > 1e-2  # the hook survived the merge
    merged_ids = [
        g.token_ids
        for g in fusar.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    ]
    assert merged_ids == ids

    full = fusar.save_full(tmp_path / "full")
    reloaded = FusarGPT.from_pretrained(full, device="cpu")  # TLM found in the model directory itself
    assert not reloaded.has_lora
    again = [
        g.token_ids
        for g in reloaded.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    ]
    assert again == ids


# ------------------------------------------------------------ official format
def test_official_vec64_film_checkpoint_loads_as_legacy(fusar, load_fusar, three, tmp_path, caplog) -> None:
    images, prompts, anchors = three
    official = tmp_path / "stage2_detection"
    official.mkdir()
    state = {k: v.clone() for k, v in fusar.tlm.film_mlp.state_dict().items()}
    torch.save({"film_mlp": state}, official / TLM_LEGACY_FILE)
    with caplog.at_level(logging.WARNING, logger="fusarbatch.model.fusar_gpt"):
        loaded = load_fusar(official)
    assert "assuming the legacy release settings (sigma 2.0, hidden_mult 4, image_size 504)" in caplog.text
    assert loaded.tlm.config.sigma == 2.0 and loaded.tlm.config.hidden_mult == 4 and loaded.image_size == 504
    assert not loaded.has_lora
    for k, v in state.items():
        assert torch.equal(loaded.tlm.film_mlp.state_dict()[k], v)
    expected = fusar.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    got = loaded.generate_detailed(images, prompts, anchors, max_new_tokens=8, image_size=None)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]

    # ours -> safetensors with the same keys and values as the official file
    ours = loaded.save(tmp_path / "ours")
    st = load_file(str(ours / TLM_WEIGHTS_FILE))
    assert set(st) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(torch.equal(st[k], state[k]) for k in state)


def test_tlm_config_is_honoured(fusar, tmp_path) -> None:
    d = tmp_path / "tlm"
    fusar.save(d)
    cfg = json.loads((d / TLM_CONFIG_FILE).read_text())
    (d / TLM_CONFIG_FILE).write_text(json.dumps({**cfg, "sigma": 3.5}))
    tlm = load_tlm(d, hidden_size=64)
    assert tlm.sigma == 3.5
    (d / TLM_CONFIG_FILE).write_text(json.dumps({**cfg, "format": "something_else"}))
    with pytest.raises(ModelError, match=r"tlm_config\.json invalid"):
        load_tlm(d, hidden_size=64)


# ------------------------------------------------------------ errors
def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("config.json", "config.json missing"),
        ("model.safetensors", "model.safetensors (weights) missing"),
        ("tokenizer.json", "tokenizer.json missing"),
        ("processor_config.json", "preprocessor_config.json missing"),
    ],
)
def test_incomplete_model_dir_names_the_missing_file(
    generated_tiny_model_dir, tmp_path, remove, named
) -> None:
    d = _copy_model(generated_tiny_model_dir, tmp_path / "m")
    (d / remove).unlink()
    with pytest.raises(ModelError) as info:
        FusarGPT.from_pretrained(d, init_tlm=True, device="cpu")
    msg = str(info.value)
    assert named in msg and str(d) in msg and "\n" not in msg
    assert isinstance(info.value, FusarbatchError) and info.value.exit_code == 2


def test_missing_model_dir_and_missing_shard(generated_tiny_model_dir, tmp_path) -> None:
    with pytest.raises(ModelError, match=r"model dir .*nowhere: directory missing"):
        FusarGPT.from_pretrained(tmp_path / "nowhere", init_tlm=True)
    d = _copy_model(generated_tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (d / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"model-00002-of-00002.safetensors missing"):
        check_model_dir(d)
    cfg = json.loads((generated_tiny_model_dir / "config.json").read_text())
    d2 = _copy_model(generated_tiny_model_dir, tmp_path / "m2")
    (d2 / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ModelError, match="model_type 'llava', expected 'qwen2_5_vl'"):
        check_model_dir(d2)


@pytest.mark.parametrize(
    ("name", "damage", "named"),
    [
        ("model.safetensors", "truncate", "model.safetensors is not a readable safetensors file"),
        ("model.safetensors", "garbage", "model.safetensors is not a readable safetensors file"),
        ("tokenizer.json", "truncate", "tokenizer.json is not a tokenizer"),
        ("tokenizer_config.json", "garbage", "tokenizer_config.json is not valid JSON"),
        ("config.json", "garbage", "config.json is not valid JSON"),
    ],
)
def test_corrupt_model_files_are_found_before_loading(
    generated_tiny_model_dir, tmp_path, name, damage, named
):
    """A truncated download or an overwritten file fails in check_model_dir (headers only, milliseconds),
    naming the file, instead of in a worker's from_pretrained mid-run."""
    d = _copy_model(generated_tiny_model_dir, tmp_path / "m")
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00\x01garbage" * 10)
    with pytest.raises(ModelError) as info:
        check_model_dir(d)
    assert named in str(info.value) and str(d) in str(info.value) and "\n" not in str(info.value)


def _damage(d: Path, case: str) -> None:
    """Hostile model directories (found by a bad-input review)."""
    if case == "config-list":
        (d / "config.json").write_text("[1, 2]")
    elif case == "index-bad-map":
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": 1}}')
    elif case == "index-list":
        (d / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    elif case == "index-escapes":
        (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    elif case == "tokenizer-empty-object":
        (d / "tokenizer.json").write_text("{}")
    elif case == "another-models-weights":
        shutil.copy(d / TLM_WEIGHTS_FILE, d / "model.safetensors")
    elif case == "tlm-config-bad":
        (d / TLM_CONFIG_FILE).write_text('{"sigma": "x"}')
    elif case == "tlm-wrong-shape":
        from safetensors.torch import save_file

        save_file({"0.weight": torch.zeros(8, 64), "2.weight": torch.zeros(6, 8)}, str(d / TLM_WEIGHTS_FILE))
    elif case == "tlm-extra-key":
        from safetensors.torch import save_file

        state = load_file(str(d / TLM_WEIGHTS_FILE))
        save_file({**state, "extra.weight": torch.zeros(3)}, str(d / TLM_WEIGHTS_FILE))
    elif case == "tlm-nan":
        from safetensors.torch import save_file

        state = load_file(str(d / TLM_WEIGHTS_FILE))
        state["0.bias"][0] = float("nan")
        save_file(state, str(d / TLM_WEIGHTS_FILE))
    elif case == "tlm-config-inf":
        cfg = json.loads((d / TLM_CONFIG_FILE).read_text())
        (d / TLM_CONFIG_FILE).write_text(json.dumps({**cfg, "image_size": float("inf")}))
    elif case == "tokenizer-no-image-token":
        from tokenizers import Tokenizer, models

        Tokenizer(models.BPE()).save(str(d / "tokenizer.json"))
    elif case == "config-wrong-type":
        cfg = json.loads((d / "config.json").read_text())
        cfg["text_config"]["hidden_size"] = str(cfg["text_config"]["hidden_size"])
        (d / "config.json").write_text(json.dumps(cfg))
    elif case == "shard-lacks-tensor":
        from safetensors.torch import save_file

        state = load_file(str(d / "model.safetensors"))
        names = sorted(state)
        half = len(names) // 2
        save_file({k: state[k] for k in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
        save_file({"x": torch.zeros(1)}, str(d / "model-00002-of-00002.safetensors"))  # the wrong file
        shard = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(names)}
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shard}))
        (d / "model.safetensors").unlink()
    elif case == "huge-json":
        with (d / "generation_config.json").open("wb") as fh:
            fh.truncate(300 * 2**20)  # sparse: no disk used


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("config-list", "config.json is not a JSON object"),
        ("index-bad-map", "has no weight_map of tensor -> shard file names"),
        ("index-list", "has no weight_map of tensor -> shard file names"),
        ("index-escapes", "names shards outside the directory"),
        ("tokenizer-empty-object", "tokenizer.json is not a tokenizer"),
        ("another-models-weights", "holds no Qwen2.5-VL vision tower or token embeddings"),
        ("tlm-config-bad", "tlm_config.json invalid"),
        ("tlm-wrong-shape", "tlm.safetensors is not the TLM of a model with hidden size 64"),
        ("huge-json", "generation_config.json is larger than 256 MiB"),
        ("tlm-extra-key", "tlm.safetensors is not the TLM of a model with hidden size 64 and hidden_mult 4"),
        ("tlm-nan", "tlm.safetensors holds NaN or infinite values"),
        ("tlm-config-inf", "tlm_config.json invalid"),
        ("tokenizer-no-image-token", "tokenizer.json has no <|image_pad|> token"),
        ("config-wrong-type", "config.json is not a valid Qwen2.5-VL configuration"),
        ("shard-lacks-tensor", "model-00002-of-00002.safetensors lacks"),
    ],
)
def test_hostile_model_dirs_fail_the_check_in_one_line(fusar, tmp_path, case, named) -> None:
    d = fusar.save_full(tmp_path / "full")
    _damage(d, case)
    with pytest.raises(ModelError) as info:
        resolve_model_dirs(d)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_weights_that_do_not_match_the_config_fail_to_load(fusar, tmp_path) -> None:
    """A header-valid file with a tensor missing would load with random values (transformers only logs
    it): from_pretrained refuses it."""
    from safetensors.torch import save_file

    d = fusar.save_full(tmp_path / "full")
    state = load_file(str(d / "model.safetensors"))
    dropped = next(k for k in sorted(state) if "visual.blocks" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, str(d / "model.safetensors"))
    assert resolve_model_dirs(d) == (d, None)  # the header check cannot know
    with pytest.raises(ModelError, match=r"the weights do not match config.json \(1 tensor\(s\) missing"):
        FusarGPT.from_pretrained(d, device="cpu")


def test_model_dir_without_config_json_is_not_taken_for_a_checkpoint(fusar, tmp_path) -> None:
    d = fusar.save_full(tmp_path / "full")
    (d / "config.json").unlink()
    with pytest.raises(ModelError, match=r"config.json missing beside the model weights"):
        resolve_model_dirs(d)
    with pytest.raises(ModelError, match="is a file, not a directory"):
        resolve_model_dirs(d / "model.safetensors")


def test_resolve_model_dirs_full_dir_checkpoint_and_base(fusar, generated_tiny_model_dir, tmp_path) -> None:
    with pytest.raises(ModelError, match=r"no TLM weights .* a plain Qwen2.5-VL is not FUSAR-GPT"):
        resolve_model_dirs(generated_tiny_model_dir)  # a base without TLM is not a model to run
    full = fusar.save_full(tmp_path / "full")
    assert resolve_model_dirs(full) == (full, None)
    with pytest.raises(UsageError, match=r"only for a checkpoint --model; .* drop --base-model"):
        resolve_model_dirs(full, tmp_path / "anything")
    fusar.add_lora()
    ckpt = fusar.save(tmp_path / "ckpt")  # TLM + LoRA, no config.json: a checkpoint
    assert resolve_model_dirs(ckpt, generated_tiny_model_dir) == (generated_tiny_model_dir, ckpt)
    # the base recorded by training (fusarbatch_train.json) is used without --base-model
    (ckpt / "fusarbatch_train.json").write_text(json.dumps({"base_model": str(generated_tiny_model_dir)}))
    assert resolve_model_dirs(ckpt) == (generated_tiny_model_dir, ckpt)
    (ckpt / "fusarbatch_train.json").write_text(json.dumps({"base_model": str(tmp_path / "gone")}))
    adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = "Qwen/x"
    (ckpt / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    with pytest.raises(UsageError, match=r"base model is unknown or missing; pass --base-model DIR"):
        resolve_model_dirs(ckpt)  # recorded base gone, adapter names a hub id: never the hub
    (ckpt / "tlm.safetensors").write_bytes((ckpt / "tlm.safetensors").read_bytes()[:100])
    with pytest.raises(ModelError, match=r"adapter dir .*ckpt: tlm.safetensors is not a readable"):
        resolve_model_dirs(ckpt, generated_tiny_model_dir)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match=r"neither a model directory .* nor a FUSAR-GPT checkpoint"):
        resolve_model_dirs(other)
    with pytest.raises(ModelError, match="nowhere: directory missing"):
        resolve_model_dirs(tmp_path / "nowhere")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / TLM_LEGACY_FILE).write_bytes(b"\x80\x02 not a zip")
    with pytest.raises(ModelError, match=r"vec64_film\.pt is not a torch\.save file"):
        resolve_model_dirs(legacy, generated_tiny_model_dir)


def test_adapter_dir_errors(fusar, generated_tiny_model_dir, tmp_path) -> None:
    with pytest.raises(ModelError, match=r"adapter dir .*: directory missing"):
        FusarGPT.from_pretrained(generated_tiny_model_dir, adapter_dir=tmp_path / "none")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"tlm.safetensors \(or vec64_film.pt\) missing"):
        FusarGPT.from_pretrained(generated_tiny_model_dir, adapter_dir=empty)
    with pytest.raises(ModelError, match=r"tlm.safetensors \(or vec64_film.pt\) missing"):
        FusarGPT.from_pretrained(generated_tiny_model_dir)  # no TLM anywhere and no init_tlm
    fusar.add_lora()
    ckpt = fusar.save(tmp_path / "ckpt")
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors missing"):
        FusarGPT.from_pretrained(generated_tiny_model_dir, adapter_dir=ckpt)
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"film_mlp": {"0.weight": torch.zeros(3, 64)}}, bad / TLM_LEGACY_FILE)
    with pytest.raises(ModelError, match="does not fit a model with hidden size 64"):
        FusarGPT.from_pretrained(generated_tiny_model_dir, adapter_dir=bad)
    (bad / TLM_LEGACY_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"vec64_film\.pt unreadable"):
        FusarGPT.from_pretrained(generated_tiny_model_dir, adapter_dir=bad)


def test_anchors_of_masks_non_finite_rows() -> None:
    f = np.ones((3, 64), dtype=np.float16)
    f[1, 5] = np.nan
    p = np.array([[0.1, 0.2], [0.3, 0.4], [np.nan, 0.5]], dtype=np.float32)
    a = Anchors.of(f, p, np.array([True, True, True]))
    assert a.features.dtype == torch.float32 and a.mask.tolist() == [True, False, False]
    assert torch.isfinite(a.features).all() and a.n_valid == 1
    assert Anchors.empty().features.shape == (0, 64)


def test_images_processed_once_give_the_processors_inputs(fusar, generated_image):
    """generate_tiles processes each image once and expands the pads itself: the inputs must be exactly the
    processor's (ids, mask, token types, pixels, grids) for the same (image, prompt) rows."""
    from fusarbatch.model import classification_prompt, detection_prompt

    images = [generated_image(504, 504, 1), generated_image(300, 400, 2)]
    prompts = [detection_prompt("ship"), classification_prompt([0, 0, 504, 504], ["ship", "background"])]
    rows = [(0, prompts[0]), (1, prompts[0]), (0, prompts[1])]
    processed = fusar.process_images(images)
    assert [tuple(p.grid_thw.tolist()) for p in processed] == [(1, 36, 36), (1, 36, 36)]
    assert [p.n_tokens for p in processed] == [324, 324]
    mine = fusar.inputs_from_processed([processed[i] for i, _ in rows], [p for _, p in rows])
    ref = fusar.build_inputs([images[i] for i, _ in rows], [p for _, p in rows], image_size=504)
    assert set(mine) == set(ref)
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key


def test_generate_tiles_answers_as_generate_detailed(fusar, generated_image, generated_anchors):
    from fusarbatch.model import detection_prompt

    images = [generated_image(504, 504, s) for s in (3, 4, 5)]
    anchors = [generated_anchors(s) for s in (3, 4, 5)]
    asks = [detection_prompt("ship"), detection_prompt("plane")]
    per_tile = fusar.generate_tiles(images, anchors, [asks] * 3, max_new_tokens=10, batch_size=3)
    # the first prompts of all tiles form the first batch, as the worker asked them before
    first = fusar.generate_detailed(images, [asks[0]] * 3, anchors, max_new_tokens=10)
    second = fusar.generate_detailed(images, [asks[1]] * 3, anchors, max_new_tokens=10)
    assert [g[0] for g in per_tile] == first
    assert [g[1] for g in per_tile] == second
