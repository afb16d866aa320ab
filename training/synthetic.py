"""Generated triplets whose answer depends only on the AlphaEarth anchors (the TLM's information path).

The real labelled chips carry no geolocation, so they have no anchors; this generator checks that the TLM
carries information. Every image is random speckle drawn from the same distribution whatever the answer; the
anchors of an image are unit vectors near one of ``classes`` prototype directions (AEF vectors are unit
length), on a regular grid over the image. The question asks for the land-cover class with the classification
prompt (whole image box, the class names as choices), and the answer is the class of the prototype. A model
that reads the anchors through the TLM can answer; with the TLM switched off it can only guess (chance =
``1 / len(classes)``).

Everything here is generated (numpy ``default_rng(seed)``); the records say so in ``meta.generated``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fusarbatch.features.anchors import write_anchor_npz
from fusarbatch.model.prompts import classification_prompt
from training.manifest import Triplet, write_manifest

__all__ = ["DEFAULT_CLASSES", "build_generated_anchor_task"]

DEFAULT_CLASSES = ("water", "cropland")


def build_generated_anchor_task(
    out: str | Path,
    *,
    n_train: int = 64,
    n_val: int = 32,
    image_size: int = 112,
    classes: Sequence[str] = DEFAULT_CLASSES,
    anchors_per_side: int = 4,
    noise: float = 0.15,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``images/``, ``anchors/`` and ``generated_train.jsonl`` / ``generated_val.jsonl`` to ``out``.

    :param image_size: side of the square images and of the box grid (``coordinate_size``).
    :param anchors_per_side: anchors form an ``n x n`` grid spanning [0, 1] (official min-max positions).
    :param noise: standard deviation of the per-anchor perturbation of the class prototype (before
        re-normalising to unit length).
    :returns: ``{"train": path, "val": path}`` of the manifests.
    """
    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "anchors").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(len(classes), 64))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    axis = np.linspace(0.0, 1.0, anchors_per_side, dtype=np.float32)
    positions = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    prompt = classification_prompt([0, 0, image_size, image_size], list(classes), grid=image_size)
    paths: dict[str, Path] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        records = []
        for i in range(n):
            label = i % len(classes)  # balanced classes
            rid = f"generated/{split}/{i:05d}"
            speckle = rng.gamma(shape=1.0, scale=60.0, size=(image_size, image_size))
            image = Image.fromarray(np.clip(speckle, 0, 255).astype(np.uint8)).convert("RGB")
            image_path = root / "images" / f"{split}_{i:05d}.png"
            image.save(image_path)
            feats = protos[label] + noise * rng.normal(size=(len(positions), 64))
            feats /= np.linalg.norm(feats, axis=1, keepdims=True)
            aef_path = root / "anchors" / f"{split}_{i:05d}.npz"
            write_anchor_npz(aef_path, feats.astype(np.float32), positions)
            records.append(
                Triplet(
                    id=rid,
                    image=image_path,
                    question=prompt,
                    answer=classes[label],
                    aef=aef_path,
                    coordinate_size=image_size,
                    task="classification",
                    meta={"generated": True, "split": split, "class": classes[label]},
                )
            )
        paths[split] = root / f"generated_{split}.jsonl"
        write_manifest(paths[split], records)
    return paths
