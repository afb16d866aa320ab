"""Triplets -> model batches: the dataset, a seeded sampler, and the collator with answer-only loss.

The collator builds, per record, exactly the text the model sees at inference (the chat template of
:meth:`fusarbatch.model.FusarGPT.chat_text`: system turn, one image, the question, the assistant prefix), runs
the processor on it (image -> ``pixel_values``, image pads expanded to the visual token count), then appends
the answer tokens and the end-of-turn token ``<|im_end|>``. Labels are ``-100`` on every prompt and padding
token: the loss is computed on the answer and its end token only (official ``data.py``; PAPER 1.3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from fusarbatch.features.anchors import read_anchor_npz
from fusarbatch.model.tlm import Anchors
from training.manifest import Triplet

__all__ = ["IGNORE_INDEX", "Collator", "SeededSampler", "TripletDataset", "load_anchors", "load_image"]

log = logging.getLogger(f"fusarbatch.{__name__}")  # shown by the fusarbatch CLI

IGNORE_INDEX = -100
"""Label value the loss ignores (prompt and padding tokens)."""


def load_image(path: Any, size: int | None) -> Image.Image:
    """RGB image, resized to ``size`` x ``size`` (bicubic) when it is not already that size -- the same
    preparation as :meth:`fusarbatch.model.FusarGPT.prepare_image` at inference."""
    from training.manifest import ManifestError

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                # Pillow's RGB conversion clips 16/32-bit values to 255: the model would see a white image
                raise ManifestError(
                    f"image {path}: {im.mode} pixels (16/32-bit); render it to 8-bit grey or RGB first "
                    "(as python -m training build does)"
                )
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, truncated, too large
        raise ManifestError(f"image {path}: unreadable ({str(exc).splitlines()[0][:200]})") from None
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def load_anchors(record: Triplet) -> Anchors:
    """The record's anchors (official npz), or :meth:`Anchors.empty` when it has none (``aef: null``)."""
    if record.aef is None:
        return Anchors.empty()
    features, positions = read_anchor_npz(record.aef)
    return Anchors.of(features, positions)


class TripletDataset(torch.utils.data.Dataset):
    """Records -> ``{"image", "question", "answer", "anchors", "id"}`` items; images and anchors are read on
    access (a 504 x 504 PNG is cheap next to a training step)."""

    def __init__(self, records: Sequence[Triplet]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        return {
            "id": rec.id,
            "image": load_image(rec.image, rec.coordinate_size),
            "question": rec.question,
            "answer": rec.answer,
            "anchors": load_anchors(rec),
            "target_boxes": _target_boxes(rec),
            "target_class": rec.meta.get("class") if isinstance(rec.meta.get("class"), str) else None,
            "grid": rec.coordinate_size,
        }


def _target_boxes(rec: Triplet) -> list[list[float]] | None:
    """The record's target boxes on its grid (``meta.boxes``, from the builders); None when unknown."""
    boxes = rec.meta.get("boxes") if isinstance(rec.meta, dict) else None
    if not isinstance(boxes, list):
        return None
    out = []
    for b in boxes:
        if isinstance(b, list | tuple) and len(b) == 4 and all(isinstance(v, int | float) for v in b):
            out.append([float(v) for v in b])
    return out


class SeededSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch drawn from ``(seed, epoch)`` only, independent of the global RNG: a run
    resumed from a checkpoint sees the same order as an uninterrupted one. The Trainer calls
    :meth:`set_epoch`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        return iter(rng.permutation(self.n).tolist())


@dataclass
class Collator:
    """Batches items of :class:`TripletDataset` for ``Qwen2_5_VLForConditionalGeneration`` + TLM.

    :ivar processor: the model's :class:`~fusarbatch.model.ImageOnlyQwen2_5_VLProcessor`.
    :ivar max_length: longest sequence (tokens); longer ones lose answer tokens from the end (logged). The
        prompt, with its visual tokens, is never cut.
    :ivar padding_side: ``right`` (training default) or ``left``.

    Output: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` ``(B, L)``, ``pixel_values``
    ``(sum of patches, 1176)``, ``image_grid_thw`` ``(B, 3)``, ``anchors`` (a list of :class:`Anchors`),
    ``target_boxes`` (per record its boxes on its grid, or None), ``grids`` (per record its grid side) and
    ``target_classes`` (per record its class, or None).
    """

    processor: Any
    max_length: int = 2048
    padding_side: str = "right"

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        self.eos_id = int(tok.convert_tokens_to_ids("<|im_end|>"))
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_id)
        self._warned = False

    def prompt_text(self, question: str) -> str:
        """The chat-formatted prompt of one image + question, ending with the assistant prefix."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of the answer followed by ``<|im_end|>``."""
        ids = self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return [*ids, self.eos_id]

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        seqs: list[tuple[list[int], list[int], list[int]]] = []  # ids, labels, mm types
        pixel_values, grids = [], []
        for item in items:
            enc = self.processor(
                text=[self.prompt_text(item["question"])], images=[item["image"]], return_tensors="pt"
            )
            prompt = enc["input_ids"][0].tolist()
            mm = enc["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in enc else [0] * len(prompt)
            answer = self.answer_ids(item["answer"])
            room = self.max_length - len(prompt)
            if room < 1:
                raise ValueError(
                    f"record {item.get('id')}: the prompt alone has {len(prompt)} tokens > max_length "
                    f"{self.max_length}"
                )
            if len(answer) > room:
                if not self._warned:
                    log.warning(
                        "record %s: answer cut from %d to %d tokens (max_length %d)",
                        item.get("id"),
                        len(answer),
                        room,
                        self.max_length,
                    )
                    self._warned = True
                answer = answer[:room]
            seqs.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, mm + [0] * len(answer)))
            pixel_values.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
        length = max(len(s[0]) for s in seqs)
        batch = len(seqs)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        mm_types = torch.zeros((batch, length), dtype=torch.long)
        for i, (ids, lab, mm) in enumerate(seqs):
            n = len(ids)
            sl = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[i, sl] = torch.tensor(ids)
            labels[i, sl] = torch.tensor(lab)
            attention[i, sl] = 1
            mm_types[i, sl] = torch.tensor(mm)
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "mm_token_type_ids": mm_types,
            "labels": labels,
            "pixel_values": torch.cat(pixel_values, dim=0),
            "image_grid_thw": torch.cat(grids, dim=0),
            "anchors": [item["anchors"] for item in items],
            "target_boxes": [item.get("target_boxes") for item in items],
            "grids": [int(item.get("grid") or 0) for item in items],
            "target_classes": [item.get("target_class") for item in items],
        }
