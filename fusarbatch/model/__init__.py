"""FUSAR-GPT model glue (DESIGN 3.4): TLM, loading (base + TLM + LoRA), prompts and parsers, tiny test model.

Shared by inference (``fusarbatch.inference``) and training (``training/``): one model definition.
"""

from __future__ import annotations

import importlib
from typing import Any

from fusarbatch.errors import ModelError as ModelError  # re-exported

# Lazy exports (PEP 562): `from fusarbatch.model import parse_detection` does not import transformers/torch.
_EXPORTS = {
    "fusar_gpt": (
        "LORA_TARGET_REGEX",
        "TLM_CONFIG_FILE",
        "TLM_LEGACY_FILE",
        "TLM_WEIGHTS_FILE",
        "FusarGPT",
        "Generation",
        "ImageOnlyQwen2_5_VLProcessor",
        "check_adapter_dir",
        "check_model_dir",
        "decoded_token_spans",
        "load_processor",
        "load_tlm",
        "lora_config",
        "model_image_size",
        "resolve_model_dirs",
        "save_tlm",
    ),
    "prompts": (
        "GRID",
        "Box",
        "ParseResult",
        "caption_prompt",
        "classification_prompt",
        "counting_prompt",
        "detection_prompt",
        "format_class_answer",
        "format_count_answer",
        "format_detection_answer",
        "format_grounding_answer",
        "grounding_cell",
        "grounding_cells",
        "grounding_prompt",
        "parse_class",
        "parse_count",
        "parse_detection",
        "parse_grounding",
        "regrid_classification_prompt",
        "scale_box_to_tile",
    ),
    "confidence": ("box_confidences", "span_confidence"),
    "tiny": ("build_tiny_model",),
    "tlm": ("TLM", "TLM_FORMAT", "Anchors", "TLMConfig", "gaussian_weights", "modulation_fields"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted(["ModelError", *_WHERE])  # the lazy export table, and ModelError
