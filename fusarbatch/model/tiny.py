"""A tiny, randomly initialised Qwen2.5-VL built offline: for tests and the demo (STACK.md section 2).

:func:`build_tiny_model` writes a complete model directory (config, safetensors weights, a locally trained
byte-level BPE tokenizer with the Qwen special tokens and chat template, the PIL image processor) that loads
through exactly the same code path as a real Qwen2.5-VL-7B-Instruct directory
(:meth:`fusarbatch.model.FusarGPT.from_pretrained`). Nothing is downloaded.

The weights are random: the model produces well-formed token streams, not sensible answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from fusarbatch.model.prompts import (
    Box,
    caption_prompt,
    classification_prompt,
    counting_prompt,
    detection_prompt,
    format_count_answer,
    format_detection_answer,
    format_grounding_answer,
    grounding_prompt,
)

__all__ = ["QWEN2_5_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_model"]

log = logging.getLogger(__name__)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""Special tokens of the tiny tokenizer, ids 0..6 in this order (Qwen2.5-VL names)."""

# Qwen2.5-VL-Instruct's chat template (default system message, one vision block per image).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_VOCAB_SIZE = 600
# Weights are drawn with std 0.5 instead of Qwen's 0.02: with 0.02 the tiny model answers every input with the
# same repeated token, so tests could not tell images, anchors or batch rows apart.
_INIT_STD = 0.5
_MIN_PIXELS = 56 * 56  # Qwen2.5-VL's shipped limits: 504 x 504 stays 504 x 504 (36 x 36 patches)
_MAX_PIXELS = 28 * 28 * 16384
_LABELS = (
    "plane",
    "ship",
    "aircraft",
    "boeing737",
    "boeing787",
    "A220",
    "A321",
    "ARJ21",
    "cargo",
    "tanker",
    "fishing",
    "container",
    "bridge",
    "harbor",
    "airport",
    "oil tank",
    "storage tank",
    "vessel",
    "dredger",
    "passenger",
    "tug",
    "vehicle",
)
#: MSTAR SOC classes (the trained demo model's classification vocabulary) and what they are; also used
#: by the training caption templates (training/builders.py).
MSTAR_KINDS = {
    "2S1": "self-propelled howitzer",
    "BMP2": "infantry fighting vehicle",
    "BRDM2": "armoured reconnaissance vehicle",
    "BTR60": "armoured personnel carrier",
    "BTR70": "armoured personnel carrier",
    "D7": "bulldozer",
    "T62": "main battle tank",
    "T72": "main battle tank",
    "ZIL131": "military truck",
    "ZSU234": "self-propelled anti-aircraft gun",
}
_CELLS = ("top left", "top centre", "top right", "centre left", "centre", "centre right", "bottom left")
_CAPTIONS = (
    "The SAR image shows an airport with a long runway, taxiways and several parked planes by the terminal.",
    "A harbor with bright ships moored along the piers; dark calm water covers the lower left of the scene.",
    "Farmland and scattered buildings, with a river crossing the image from the top to the bottom right.",
    "Open sea with a few small vessels appearing as bright points on a dark, uniform background.",
    "Dense urban area with strong double-bounce returns from buildings and roads in a regular grid.",
    "Mountains and forest in the upper half; a lake and a bridge in the lower part of the image.",
)


def _corpus() -> list[str]:
    """Training text for the tiny tokenizer: every prompt and answer shape the project uses."""
    lines: list[str] = list(_CAPTIONS)
    lines += [caption_prompt(), "None", "None.", "none", "[]", "0 1 2 3 4 5 6 7 8 9 10 11 12 504"]
    for i, label in enumerate(_LABELS):
        lines += [detection_prompt(label), counting_prompt(label), grounding_prompt(label)]
        box = Box(label, 10 + 7 * i, 20 + 5 * i, 60 + 9 * i, 90 + 11 * i)
        lines += [classification_prompt(box, choices=_LABELS[:4]), label]
        boxes = [Box(label, 3 * i + k, 17 * k + i, 3 * i + 40 + k, 17 * k + 55 + i) for k in range(4)]
        lines += [
            format_detection_answer(boxes),
            format_count_answer(i),
            format_grounding_answer([i % 9 + 1, 5]),
        ]
        lines.append(
            '```json\n[\n\t{"bbox_2d": ['
            + f"{i}, {2 * i}, {3 * i + 9}, {4 * i + 9}"
            + '], "label": "'
            + label
            + '"}\n]\n```'
        )
    names = list(MSTAR_KINDS)
    for i, (name, kind) in enumerate(MSTAR_KINDS.items()):
        cell = _CELLS[i % len(_CELLS)]
        box = Box(name, 40 + 9 * i, 30 + 7 * i, 95 + 11 * i, 80 + 13 * i)
        lines += [
            name,
            f"a {name} {kind} in the {cell}",
            f"An X-band SAR chip of a single {name}, a {kind}, in the centre of the image on flat ground.",
            classification_prompt(box, choices=names),
            format_detection_answer([Box("vehicle", box.x1, box.y1, box.x2, box.y2)]),
        ]
    lines += [
        "An X-band SAR scene of ground clutter with three vehicles: one in the top left, two in the centre.",
        "A Sentinel-1 SAR image in VV polarisation of the sea with two ships, bright points on dark water.",
        "A Gaofen-3 SAR image in HH polarisation showing five ships at sea (two in the bottom right).",
    ]
    lines.append("You are a helpful assistant.")
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def _train_tokenizer(vocab_size: int = _VOCAB_SIZE) -> object:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 4,
    init_std: float = _INIT_STD,
    vocab_size: int = _VOCAB_SIZE,
    embed_std: float | None = None,
    rope_theta: float = 1e4,
    mrope_section: Sequence[int] | None = None,
) -> Path:
    """Write a tiny Qwen2.5-VL model directory to ``out_dir`` and return it.

    Architecture (STACK.md section 2): text hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
    M-RoPE sections [2, 3, 3]; vision depth 2, hidden 32, 4 heads, patch 14, temporal patch 2, spatial
    merge 2, window 112, full attention at block 1, ``out_hidden_size`` 64; tied embeddings; about 0.2 M
    parameters. Weights are normal with std 0.5 (Qwen: 0.02) so that different images and anchors give
    different greedy answers. The tokenizer is a byte-level BPE (vocabulary 600, Qwen's split regex) trained
    on the project's own prompts and answers, so answers tokenise sensibly. The image processor is
    ``Qwen2VLImageProcessorPil`` with Qwen2.5-VL's pixel limits: a 504 x 504 image gives ``image_grid_thw``
    (1, 36, 36) and 324 visual tokens.

    Deterministic: the same ``seed`` writes identical weights and tokenizer. Takes about a second on CPU.

    The keyword arguments size other tiny configurations (the trained demo model of ``training/`` uses a
    larger one and Qwen's init std 0.02); the defaults are the configuration above. ``mrope_section`` is
    Qwen's 1/4, 3/8, 3/8 split of ``head_dim / 2``.

    :param out_dir: directory to create (or overwrite files in).
    :param seed: seed for the random weights.
    :returns: ``Path(out_dir)``.
    ``embed_std`` re-draws the (tied) token embeddings with that std: with Qwen's 0.02 everywhere, the frozen
    final norm and tied embeddings cap the logits of a LoRA-trained model at about ``0.02 * hidden`` (too flat
    to ever be confident), so the demo base uses larger embeddings.

    ``rope_theta`` and ``mrope_section`` set the language model's M-RoPE (default: theta 1e4, Qwen's split).
    Qwen2.5-VL gives the temporal section the highest frequencies and the width section the lowest; with a
    head size of 32 and theta 1e4 the width channel turns by at most 0.04 rad across a 12-token row, so a tiny
    language model cannot tell the columns of an image apart (the demo preset uses a small theta; see
    training/RESULTS.md).

    :raises ValueError: a head size that is not a multiple of 8 (M-RoPE sections), or ``mrope_section``
        that does not add up to half the head size.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fusarbatch.model.fusar_gpt import ImageOnlyQwen2_5_VLProcessor

    head_dim, rem = divmod(hidden_size, num_heads)
    if rem or head_dim % 8 or vision_hidden_size % vision_heads:
        raise ValueError(
            f"hidden {hidden_size} / {num_heads} heads must give a head size that is a multiple of 8; "
            f"vision hidden {vision_hidden_size} must be a multiple of {vision_heads} heads"
        )
    if mrope_section is None:
        quarter = head_dim // 8  # head_dim / 2 split as 1/4, 3/8, 3/8 (Qwen: 16, 24, 24 for head_dim 128)
        mrope_section = [quarter, 3 * quarter // 2, head_dim // 2 - quarter - 3 * quarter // 2]
    if (
        isinstance(mrope_section, (str, bytes))
        or len(mrope_section) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in mrope_section)
        or sum(mrope_section) != head_dim // 2
    ):
        raise ValueError(
            f"mrope_section {mrope_section!r}: three positive integers adding up to {head_dim // 2}"
        )
    mrope_section = list(mrope_section)
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not 1 < rope_theta <= 1e9:
        raise ValueError(f"rope_theta {rope_theta!r}: a number in (1, 1e9]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = _train_tokenizer(vocab_size)
    model_json = json.loads(trained.to_str())["model"]  # type: ignore[attr-defined]
    tokenizer = Qwen2Tokenizer(
        vocab=model_json["vocab"],
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model_json["merges"]],
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE

    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(rope_theta),
                "mrope_section": mrope_section,
            },
            "bos_token_id": None,
            "eos_token_id": tid("<|im_end|>"),
            "pad_token_id": tid("<|endoftext|>"),
            "initializer_range": init_std,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": vision_intermediate_size,
            "num_heads": vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
            "out_hidden_size": hidden_size,
            "initializer_range": init_std,
        },
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        if embed_std is not None:
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, embed_std)
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": _MIN_PIXELS, "longest_edge": _MAX_PIXELS},
    )
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_5_VL_CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    log.info("tiny Qwen2.5-VL written to %s (seed %d)", out, seed)
    return out
