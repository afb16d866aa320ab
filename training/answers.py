"""What a manifest record asks and expects, and a prediction read from an answer to it (``fusarbatch eval``).

- :func:`label_of` -- the label asked (``meta.label``, else read from the question); detection and counting
  are scored under it, as ``fusarbatch run`` does: every box of an answer to "detect: ship" is a ship box,
  whatever label the model (or the ground truth) wrote on it.
- :func:`truth_of` -- the expected answer, parsed (detection boxes on the record's ``coordinate_size``).
- :func:`read_answer` -- a :class:`Prediction` from generated text: parsed on the model's own grid
  (``image_size`` of its ``tlm_config.json``), boxes relabelled to the label asked, scaled per axis to the
  record's grid, each with its own score (:mod:`fusarbatch.model.confidence`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fusarbatch.errors import UsageError
from fusarbatch.model.prompts import (
    Box,
    parse_class,
    parse_count,
    parse_detection,
    parse_grounding,
    scale_box_to_tile,
)
from training.manifest import Triplet

__all__ = ["Prediction", "choices_of", "label_of", "read_answer", "regrid_boxes", "truth_of"]

_LABEL_RES = {
    "detection": re.compile(r"detect the following object: (.+?)\. Output", re.DOTALL),
    "counting": re.compile(r"count the (.+?) targets", re.DOTALL),
    "grounding": re.compile(r"Which cells contain an? (.+?)\?", re.DOTALL),
}
_CHOICES_RE = re.compile(r"Choose one of: (.+?)\. Answer with", re.DOTALL)


@dataclass(frozen=True)
class Prediction:
    """One predicted answer to a record, ready for scoring.

    :ivar value: parsed value of the record's task (detection: ``tuple[Box, ...]`` on the record's
        ``coordinate_size`` grid, labelled with the label asked; counting: ``int``; grounding: cells;
        classification: ``str``); None or ``()`` when unparseable.
    :ivar ok: the answer was understood.
    :ivar error: why not.
    :ivar scores: detection: per box of ``value``, its score in [0, 1] (None: unknown).
    :ivar answer_score: probability of the whole answer (models only).
    """

    value: Any
    ok: bool = True
    error: str | None = None
    scores: tuple[float | None, ...] = ()
    answer_score: float | None = None


def label_of(rec: Triplet) -> str:
    """The label the record asks about: ``meta.label`` (not for classification), else read from the
    question; ``"all"`` when neither says."""
    if isinstance(rec.meta.get("label"), str) and rec.task != "classification":
        return rec.meta["label"]
    rx = _LABEL_RES.get(rec.task)
    m = rx.search(rec.question) if rx else None
    return m.group(1).strip() if m else "all"


def choices_of(question: str) -> list[str] | None:
    """The category names a classification question lists ("Choose one of: a, b."), or None."""
    m = _CHOICES_RE.search(question)
    return [c.strip() for c in m.group(1).split(",") if c.strip()] if m else None


def regrid_boxes(boxes: Sequence[Box], from_grid: int, to_grid: int) -> tuple[Box, ...]:
    """Boxes scaled per axis from a ``from_grid`` to a ``to_grid`` square grid (pixels)."""
    if int(from_grid) == int(to_grid):
        return tuple(boxes)
    return tuple(scale_box_to_tile(b, to_grid, to_grid, grid=from_grid) for b in boxes)


def truth_of(rec: Triplet) -> Any:
    """The record's expected answer, parsed: count, cells, class name, or detection boxes on the record's
    grid labelled with the label asked (the ground truth of "detect: X" is a list of X boxes).

    :raises UsageError: an expected answer that does not parse (a broken manifest).
    """
    if rec.task == "counting":
        v = parse_count(rec.answer).value
        if v is None:
            raise UsageError(f"record {rec.id}: counting answer {rec.answer!r} is not an integer")
        return v
    if rec.task == "grounding":
        res = parse_grounding(rec.answer)
        if not res.ok or res.notes:  # the model's answers are read leniently, the truth is not
            why = res.error or "; ".join(res.notes)
            raise UsageError(
                f"record {rec.id}: grounding answer {rec.answer[:60]!r} is not a JSON list of distinct cells "
                f"1..9 ({why}); fix or drop it (the builders write such lists)"
            )
        return res.value
    if rec.task == "classification":
        return rec.answer.strip()
    if rec.task == "detection":
        label = label_of(rec)
        res = parse_detection(rec.answer, default_label=label, grid=rec.coordinate_size)
        if not res.ok or res.notes:  # read leniently from a model, a truth box is not clipped or swapped
            why = res.error or "; ".join(res.notes)
            raise UsageError(
                f"record {rec.id}: detection answer {rec.answer[:60]!r} is not a clean list of boxes on its "
                f"{rec.coordinate_size} px grid ({why}); fix or drop it (the builders write such lists)"
            )
        return tuple(replace(b, label=label) for b in res.value)
    return rec.answer


def read_answer(
    rec: Triplet,
    text: str,
    *,
    grid: int | None = None,
    token_logprobs: Sequence[float] = (),
    token_spans: Sequence[tuple[int, int]] = (),
    answer_score: float | None = None,
) -> Prediction:
    """A :class:`Prediction` from an answer ``text`` to ``rec``. Never raises on the text.

    :param grid: the grid the answer's boxes are on (the model's ``image_size``); default the record's.
    :param token_logprobs: per generated token, its log-probability (for per-box scores).
    :param token_spans: per generated token, its character range in ``text``.
    :param answer_score: the answer's probability, kept as it is.
    """
    from fusarbatch.model.confidence import box_confidences

    if rec.task == "counting":
        r: Any = parse_count(text)
    elif rec.task == "grounding":
        r = parse_grounding(text)
    elif rec.task == "classification":
        r = parse_class(text, choices_of(rec.question))
    elif rec.task == "detection":
        label = label_of(rec)
        on = int(grid or rec.coordinate_size)
        r = parse_detection(text, default_label=label, grid=on)
        boxes = regrid_boxes([replace(b, label=label) for b in r.value], on, rec.coordinate_size)
        scores = box_confidences(token_logprobs, token_spans, r.spans) if boxes else []
        return Prediction(boxes, r.ok, r.error, tuple(scores), answer_score)
    else:
        return Prediction(text, True, None, (), answer_score)
    return Prediction(r.value, r.ok, r.error, (), answer_score)
