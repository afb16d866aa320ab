"""Fixtures for tests/training: a tiny base model and small manifests, all generated (random weights, random
pixels, random AEF-like vectors), plus three real ship chips copied into tests/data/ship_chips."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fusarbatch.model import build_tiny_model, counting_prompt
from training.manifest import Triplet, write_manifest

TESTS = Path(__file__).resolve().parents[1]
SHIP_CHIPS = TESTS / "data" / "ship_chips"

# The trainable tiny base: Qwen's init std (0.02) so that a few optimizer steps move the loss smoothly, and
# larger token embeddings (else the frozen tied embeddings cap the logits; see build_tiny_model).
TINY_KWARGS = {"init_std": 0.02, "embed_std": 0.3}


@pytest.fixture(scope="session")
def generated_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL (hidden 64, 2 layers; init std 0.02, embeddings 0.3), built once."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_base"), seed=0, **TINY_KWARGS)


def _write_generated_counting(root: Path, n: int, size: int, seed: int) -> Path:
    """Random-pixel images with 0..3 bright squares and counting questions (answer: the number of squares)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        pixels = rng.integers(0, 60, size=(size, size), dtype=np.uint8)
        count = i % 4
        boxes = []
        for k in range(count):
            y, x = 4 + 12 * k, 4 + 10 * k
            pixels[y : y + 8, x : x + 8] = 250
            boxes.append([x, y, x + 8, y + 8])
        path = root / "images" / f"{i:03d}.png"
        Image.fromarray(pixels).convert("RGB").save(path)
        records.append(
            Triplet(
                id=f"generated/{i:03d}",
                image=path,
                question=counting_prompt("square"),
                answer=str(count),
                coordinate_size=size,
                task="counting",
                meta={"generated": True, "boxes": boxes},
            )
        )
    manifest = root / "generated_counting.jsonl"
    write_manifest(manifest, records)
    return manifest


@pytest.fixture
def generated_counting_manifest(tmp_path: Path) -> Callable[..., Path]:
    """``make(n=8, size=56, seed=0)`` -> a manifest of generated counting triplets (56 x 56 images)."""

    def make(n: int = 8, size: int = 56, seed: int = 0) -> Path:
        return _write_generated_counting(tmp_path / f"counting_{n}_{size}_{seed}", n, size, seed)

    return make
