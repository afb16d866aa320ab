"""Answers that do not come from the evaluated model, for ``fusarbatch eval`` to print beside its metrics.

Every baseline answers the same records as the model and is scored by the same code:

- **majority answers** -- per label asked, the most frequent counting answer and the most frequent grounding
  answer (the cell list as written, the most-targets cell first); the most frequent class for
  classification. Taken from the training manifests when ``--train-data`` gives them, else from the
  evaluated records themselves (then said so: the baseline has seen the answers it is scored on). A label
  that the source lacks falls back to the majority over all labels. Ties: the smallest value
  (count, then cell list, then name) wins, so the result does not depend on record order.
- **median box** -- per label asked, the per-coordinate median of the ground-truth boxes of the source's
  detection records, each divided by its record's grid (``coordinate_size``); predicted once per
  evaluated detection record, scaled to its grid, with score 1. Since ``x1 < x2`` for every box, the
  median ``x1`` is at most the median ``x2`` (order statistics), so the median box is a box.
- **shuffled images** (:func:`shuffled_pairs`) -- the evaluated engine's own predictions paired with the
  ground truth of another record asking the same question (same task and label asked), by a derangement
  (a permutation without fixed points) drawn with a fixed seed: what the answers are worth when they do
  not look at their image. Records that are alone in their group are left out (the table's ``n`` says so).
- **CFAR** (:func:`cfar_predictions`) -- the classical detector of :mod:`fusarbatch.engines.cfar` on the
  record's image (linear intensity from the image values): detection boxes with its scores, counting = the
  number of boxes, grounding = the cells of the boxes' centres. It does not answer classification.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusarbatch.model.prompts import Box, grounding_cells
from training.answers import Prediction, label_of, regrid_boxes, truth_of
from training.manifest import Triplet

__all__ = [
    "SHUFFLE_SEED",
    "Priors",
    "cfar_predictions",
    "derangement",
    "majority_predictions",
    "median_box_predictions",
    "pair_prediction",
    "priors_from",
    "shuffled_pairs",
]

SHUFFLE_SEED = 0
"""Seed of the shuffled-image derangement (fixed: reruns pair the same records)."""
ALL = "*"
"""Key of the value over all labels (the fallback for a label the source lacks)."""


@dataclass(frozen=True)
class Priors:
    """What the majority and median-box baselines take from their source records.

    :ivar source: where they come from, in words (training manifests, or the evaluated records).
    :ivar counts: label asked -> majority count (:data:`ALL`: over every label).
    :ivar cells: label asked -> majority grounding answer (cells in answer order).
    :ivar classes: majority class of the classification records (None: no such record).
    :ivar boxes: label asked -> median box ``(x1, y1, x2, y2)`` as fractions of the grid.
    """

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    cells: dict[str, tuple[int, ...]] = field(default_factory=dict)
    classes: str | None = None
    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "counts": self.counts,
            "cells": {k: list(v) for k, v in self.cells.items()},
            "class": self.classes,
            "median_boxes": {k: [round(x, 6) for x in v] for k, v in self.boxes.items()},
        }


def _majority(values: Sequence[Any]) -> Any:
    """Most frequent value; ties: the smallest (values of one kind are comparable)."""
    counts = Counter(values)
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


def _per_label(pairs: Sequence[tuple[str, Any]], reduce: Any) -> dict[str, Any]:
    groups: dict[str, list[Any]] = defaultdict(list)
    for label, v in pairs:
        groups[label].append(v)
    out = {label: reduce(vs) for label, vs in sorted(groups.items())}
    if pairs:
        out[ALL] = reduce([v for _, v in pairs])
    return out


def _median_box(boxes: Sequence[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    return tuple(float(statistics.median(b[k] for b in boxes)) for k in range(4))  # type: ignore[return-value]


def priors_from(records: Sequence[Triplet], source: str) -> Priors:
    """The majority answers and median boxes of ``records`` (module docstring); ``source`` describes them."""
    counts = [(label_of(r), int(truth_of(r))) for r in records if r.task == "counting"]
    cells = [(label_of(r), tuple(truth_of(r))) for r in records if r.task == "grounding"]
    classes = [str(truth_of(r)) for r in records if r.task == "classification"]
    boxes = [
        (label_of(r), tuple(v / r.coordinate_size for v in b.as_list()))
        for r in records
        if r.task == "detection"
        for b in truth_of(r)
    ]
    return Priors(
        source=source,
        counts=_per_label(counts, _majority),
        cells=_per_label(cells, lambda vs: _majority([tuple(v) for v in vs])),
        classes=_majority(classes) if classes else None,
        boxes=_per_label(boxes, _median_box),
    )


def _lookup(table: dict[str, Any], label: str) -> Any:
    return table.get(label, table.get(ALL))


def majority_predictions(records: Sequence[Triplet], priors: Priors) -> list[Prediction | None]:
    """The majority answer per record; None for the records it does not answer (detection, captions, and
    tasks the source has no record of)."""
    out: list[Prediction | None] = []
    for r in records:
        value: Any = None
        if r.task == "counting":
            value = _lookup(priors.counts, label_of(r))
        elif r.task == "grounding":
            value = _lookup(priors.cells, label_of(r))
        elif r.task == "classification":
            value = priors.classes
        out.append(None if value is None else Prediction(value))
    return out


def median_box_predictions(records: Sequence[Triplet], priors: Priors) -> list[Prediction | None]:
    """One median box per detection record (its label asked, score 1); None for the other records."""
    out: list[Prediction | None] = []
    for r in records:
        frac = _lookup(priors.boxes, label_of(r)) if r.task == "detection" else None
        if frac is None:
            out.append(None)
            continue
        s = r.coordinate_size
        out.append(Prediction((Box(label_of(r), *(v * s for v in frac)),), scores=(1.0,)))
    return out


def derangement(n: int, rng: np.random.Generator) -> list[int]:
    """A uniformly drawn permutation of ``range(n)`` with no fixed point (rejection sampling: about
    ``e`` draws on average). :raises ValueError: ``n < 2`` (no derangement exists)."""
    if n < 2:
        raise ValueError(f"no derangement of {n} item(s)")
    while True:
        perm = rng.permutation(n).tolist()
        if all(p != i for i, p in enumerate(perm)):
            return perm


def shuffled_pairs(records: Sequence[Triplet], seed: int = SHUFFLE_SEED) -> list[tuple[int, int]]:
    """``(prediction index, truth index)`` pairs: within each group of records with the same task and label
    asked (captions excluded), a :func:`derangement` drawn from ``seed``. Groups of one are left out."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.task != "caption":
            groups[(r.task, label_of(r) if r.task != "classification" else "")].append(i)
    rng = np.random.default_rng(seed)
    pairs: list[tuple[int, int]] = []
    for key in sorted(groups):
        idx = groups[key]
        if len(idx) < 2:
            continue
        perm = derangement(len(idx), rng)
        pairs += [(idx[k], idx[perm[k]]) for k in range(len(idx))]
    return sorted(pairs)


def pair_prediction(pred: Prediction, own: Triplet, other: Triplet) -> Prediction:
    """``pred`` (an answer to ``own``) as an answer to ``other``: detection boxes moved to ``other``'s grid
    and label asked (the same question: :func:`shuffled_pairs` pairs within a label)."""
    if own.task != "detection" or not pred.value:
        return pred
    boxes = regrid_boxes(pred.value, own.coordinate_size, other.coordinate_size)
    return Prediction(boxes, pred.ok, pred.error, pred.scores, pred.answer_score)


def cfar_predictions(
    records: Sequence[Triplet], params: Any = None, *, min_score: float = 0.0
) -> list[Prediction | None]:
    """The CFAR engine's answers (module docstring); None for classification and caption records.

    Each detection, counting or grounding record's image is read as it is stored (grey values -> linear
    intensity, :func:`fusarbatch.engines.cfar.image_to_linear`), CFAR runs with ``params`` (window sizes in
    pixels of that image; default :data:`~fusarbatch.engines.cfar.CHIP_PARAMS`), and boxes are scaled per
    axis from the image's pixels to the record's grid. Counts and cells use the boxes scored at least
    ``min_score``; detection keeps every box with its score.
    """
    from PIL import Image

    from fusarbatch.engines.cfar import CHIP_PARAMS, detect_chip

    params = params or CHIP_PARAMS
    out: list[Prediction | None] = []
    for r in records:
        if r.task not in ("detection", "counting", "grounding"):
            out.append(None)
            continue
        try:
            with Image.open(r.image) as im:
                image = im.convert("L")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # not an image, truncated, huge
            from training.manifest import ManifestError

            raise ManifestError(f"image {r.image}: unreadable ({str(exc).splitlines()[0][:200]})") from None
        w, h = image.size
        sx, sy = r.coordinate_size / w, r.coordinate_size / h
        label = label_of(r)
        # the windows are in pixels of the chip at its own size (the builders record it; odd dihedral copies
        # swap width and height): the rendered image is resampled back to it, as on the tuning split
        native = _native_size(r)
        found = detect_chip(image, params, native_size=native)
        boxes = tuple(Box(label, b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy) for b in found)
        scores = tuple(float(b.score) for b in found)
        kept = [b for b, s in zip(boxes, scores, strict=True) if s >= min_score]
        if r.task == "detection":
            out.append(Prediction(boxes, scores=scores))
        elif r.task == "counting":
            out.append(Prediction(len(kept)))
        else:
            out.append(Prediction(tuple(grounding_cells(kept, grid=r.coordinate_size))))
    return out


def _native_size(rec: Triplet) -> tuple[int, int] | None:
    """``(width, height)`` of the record's chip before rendering (``meta.width/height``), or None."""
    w, h = rec.meta.get("width"), rec.meta.get("height")
    if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
        return None
    aug = rec.meta.get("aug") or 0
    return (h, w) if isinstance(aug, int) and aug % 2 == 1 else (w, h)
