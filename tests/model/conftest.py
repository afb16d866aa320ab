"""Fixtures for tests/model: a tiny Qwen2.5-VL generated offline once per session, images and anchors.

Everything here is generated (random weights, random pixels, random AEF-like vectors); nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusarbatch.model import Anchors, FusarGPT, build_tiny_model

TLM_SEED = 1234


@pytest.fixture(scope="session")
def generated_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL directory (config, weights, tokenizer, processor), built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2_5_vl"), seed=0)


@pytest.fixture
def load_fusar(generated_tiny_model_dir: Path) -> Callable[..., FusarGPT]:
    """Load the tiny model as a FusarGPT; without an adapter a new TLM is initialised from a fixed seed."""

    def load(adapter_dir: Path | None = None, **kwargs: object) -> FusarGPT:
        torch.manual_seed(TLM_SEED)
        kwargs.setdefault("init_tlm", adapter_dir is None)
        return FusarGPT.from_pretrained(
            generated_tiny_model_dir, adapter_dir=adapter_dir, device="cpu", **kwargs
        )

    return load


@pytest.fixture
def fusar(load_fusar: Callable[..., FusarGPT]) -> FusarGPT:
    """A fresh tiny FusarGPT (CPU, float32, new seeded TLM, no LoRA); tests may modify it."""
    return load_fusar()


def _generated_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


def _generated_anchors(seed: int, n: int = 16, n_invalid: int = 0) -> Anchors:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)  # AEF vectors are unit length
    positions = rng.random((n, 2)).astype(np.float32)
    mask = np.ones(n, dtype=bool)
    mask[:n_invalid] = False
    return Anchors.of(features, positions, mask)


@pytest.fixture
def generated_image() -> Callable[[int, int, int], Image.Image]:
    """``make(height, width, seed)`` -> a random RGB PIL image."""
    return _generated_image


@pytest.fixture
def generated_anchors() -> Callable[..., Anchors]:
    """``make(seed, n=16, n_invalid=0)`` -> random unit AEF vectors at random (y, x); n_invalid masked."""
    return _generated_anchors
