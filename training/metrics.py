"""The paper's evaluation metrics (DESIGN 4; PAPER 1.5-1.6), as pure functions over parsed answers.

Definitions (the paper defines only the metric names; the grounding ones are fusarbatch's, see DESIGN 4):

- **counting**: exact-match accuracy of the integer; an unparseable answer (``None``) is wrong.
- **grounding** over the 3 x 3 cells (answers are cell lists, the cell with most targets first):
  ``Acc@100`` -- the predicted cell set equals the true set; ``Acc@50`` -- at least half of the true cells
  are predicted (extra predicted cells are not penalised); ``Top-1`` -- the first predicted cell is a true
  cell. With no true cell (no target) all three count as correct only for an empty prediction. An unparseable
  answer is wrong on all three.
- **classification**: accuracy, overall (micro) and per true class; an unparseable answer is wrong.
- **detection**: per image, predictions are matched one-to-one to ground-truth boxes of the same label,
  greedily by decreasing IoU (ties: answer order, then ground-truth order), a pair counting when
  ``IoU >= threshold``. Unmatched predictions are false positives (so are duplicates of a matched box),
  unmatched truths false negatives. Precision, recall and F1 come from the TP/FP/FN summed over images,
  overall and per label. Boxes are clipped to ``[0, grid]`` first (the ground truth runs past the edge);
  a box with no area after clipping matches nothing. When a ratio has a zero denominator it is 0, except
  that with neither predictions nor ground truth all three are ``None`` (no data). An unparseable answer is
  an empty prediction. ``fusarbatch eval`` computes them on the boxes scored at least the score threshold
  (``--min-score``, as ``run``).
- **detection AP** (:func:`average_precision`): PASCAL VOC all-point interpolated average precision
  (Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 88, 2010, section 4.2, and
  the VOC2010+ development kit's ``VOCevaldet``/``VOCap``), per label from every box and its score: boxes of
  all images sorted by decreasing score; each is a true positive when its best-IoU ground-truth box of the
  same label in its image has ``IoU >= threshold`` and is not yet taken, else a false positive (a
  duplicate); AP is the area under the precision-recall curve after precision is made monotone
  (``p(r) = max_{r' >= r} p(r')``), summed where recall changes. Two departures from the devkit: precision
  and recall are taken only after the last box of each distinct score (boxes with equal scores enter
  together, as no threshold can separate them), so the AP of an answer set with tied scores -- a constant
  baseline, an image-blind model -- does not depend on the order of the records; and IoU is the continuous
  one above (the devkit adds one pixel to widths). ``mAP`` is the mean over the labels with ground truth; a
  label without ground truth has no AP (None).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fusarbatch.model.prompts import GRID, Box

__all__ = [
    "AP_IOU",
    "IOU_THRESHOLDS",
    "DetectionCounts",
    "average_precision",
    "classification_metrics",
    "counting_metrics",
    "detection_metrics",
    "grounding_metrics",
    "grounding_scores",
    "iou",
    "match_detections",
]

IOU_THRESHOLDS = (0.25, 0.5)
"""The detection IoU thresholds of the paper (Table 4)."""
AP_IOU = 0.5
"""IoU threshold of the reported average precision (VOC's)."""


def _clip(box: Box, grid: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (min(max(float(v), 0.0), float(grid)) for v in (box.x1, box.y1, box.x2, box.y2))
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def iou(a: Box, b: Box, grid: float = GRID) -> float:
    """Intersection over union of two boxes clipped to ``[0, grid]``; 0 when either has no area."""
    ax1, ay1, ax2, ay2 = _clip(a, grid)
    bx1, by1, bx2, by2 = _clip(b, grid)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    return inter / (area_a + area_b - inter)


@dataclass
class DetectionCounts:
    """True positives, false positives and false negatives, with the derived ratios."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: DetectionCounts) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    @property
    def empty(self) -> bool:
        """Neither predictions nor ground truth."""
        return self.tp + self.fp + self.fn == 0

    @property
    def precision(self) -> float | None:
        if self.empty:
            return None
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float | None:
        if self.empty:
            return None
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def match_detections(
    predictions: Sequence[Box], truths: Sequence[Box], threshold: float, grid: float = GRID
) -> dict[str, DetectionCounts]:
    """Greedy one-to-one same-label matching of one image (module docstring); counts per label."""
    pairs = []
    for i, p in enumerate(predictions):
        for j, t in enumerate(truths):
            if p.label == t.label:
                v = iou(p, t, grid)
                if v >= threshold and v > 0:
                    pairs.append((-v, i, j))
    pairs.sort()
    used_p: set[int] = set()
    used_t: set[int] = set()
    for _, i, j in pairs:
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
    counts: dict[str, DetectionCounts] = defaultdict(DetectionCounts)
    for i, p in enumerate(predictions):
        if i in used_p:
            counts[p.label].tp += 1
        else:
            counts[p.label].fp += 1
    for j, t in enumerate(truths):
        if j not in used_t:
            counts[t.label].fn += 1
    return dict(counts)


def detection_metrics(
    predictions: Sequence[Sequence[Box] | None],
    truths: Sequence[Sequence[Box]],
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    grid: float = GRID,
) -> dict[str, Any]:
    """Precision / recall / F1 per IoU threshold, overall and per label.

    :param predictions: per image, the predicted boxes (``None`` = unparseable answer = no box).
    :param truths: per image, the ground-truth boxes.
    :returns: ``{"iou_0.25": {"overall": {...}, "per_class": {label: {...}}}, ..., "images": n}``.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    out: dict[str, Any] = {"images": len(truths)}
    labels = sorted(
        {b.label for ts in truths for b in ts} | {b.label for ps in predictions for b in ps or ()}
    )
    for thr in thresholds:
        overall = DetectionCounts()
        per: dict[str, DetectionCounts] = {label: DetectionCounts() for label in labels}
        for preds, gts in zip(predictions, truths, strict=True):
            for label, c in match_detections(list(preds or ()), list(gts), thr, grid).items():
                per[label].add(c)
                overall.add(c)
        out[f"iou_{thr:g}"] = {
            "overall": overall.as_dict(),
            "per_class": {label: c.as_dict() for label, c in per.items()},
        }
    return out


def _voc_ap(recall: Sequence[float], precision: Sequence[float]) -> float:
    """Area under the monotone precision envelope, all points (VOC2010+ ``VOCap``)."""
    mrec = [0.0, *recall, 1.0]
    mpre = [0.0, *precision, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def average_precision(
    predictions: Sequence[Sequence[Box] | None],
    scores: Sequence[Sequence[float | None]],
    truths: Sequence[Sequence[Box]],
    threshold: float = 0.5,
    grid: float = GRID,
) -> dict[str, Any]:
    """VOC all-point average precision per label at one IoU threshold (module docstring).

    :param predictions: per image, the predicted boxes (``None`` = unparseable = no box).
    :param scores: per image, one score per predicted box (None counts as 0).
    :param truths: per image, the ground-truth boxes.
    :returns: ``{"iou": threshold, "map": mean AP over labels with ground truth or None, "per_class":
        {label: {"ap", "n_true", "n_pred"}}}``. Boxes of equal score enter the curve together.
    """
    if not len(predictions) == len(scores) == len(truths):
        raise ValueError(f"{len(predictions)} predictions, {len(scores)} score lists, {len(truths)} images")
    labels = sorted(
        {b.label for ts in truths for b in ts} | {b.label for ps in predictions for b in ps or ()}
    )
    per: dict[str, dict[str, Any]] = {}
    for label in labels:
        gts = [[t for t in ts if t.label == label] for ts in truths]
        n_true = sum(len(g) for g in gts)
        dets = []
        for i, (ps, ss) in enumerate(zip(predictions, scores, strict=True)):
            ps = list(ps or ())
            if len(ss) != len(ps):
                raise ValueError(f"image {i}: {len(ss)} scores for {len(ps)} boxes")
            dets += [
                (-(s or 0.0), i, j, p)
                for j, (p, s) in enumerate(zip(ps, ss, strict=True))
                if p.label == label
            ]
        dets.sort(key=lambda d: d[:3])
        taken = [[False] * len(g) for g in gts]
        tp = fp = 0
        recall, precision = [], []
        for k, (neg_score, i, _, p) in enumerate(dets):
            ious = [iou(p, t, grid) for t in gts[i]]
            best = max(range(len(ious)), key=ious.__getitem__, default=None)
            if best is not None and ious[best] >= threshold and ious[best] > 0 and not taken[i][best]:
                taken[i][best] = True
                tp += 1
            else:
                fp += 1
            if k + 1 == len(dets) or dets[k + 1][0] != neg_score:  # the last box of its score
                recall.append(tp / n_true if n_true else 0.0)
                precision.append(tp / (tp + fp))
        ap = _voc_ap(recall, precision) if n_true else None
        per[label] = {"ap": ap, "n_true": n_true, "n_pred": len(dets)}
    aps = [v["ap"] for v in per.values() if v["ap"] is not None]
    return {"iou": threshold, "map": sum(aps) / len(aps) if aps else None, "per_class": per}


def _accuracy(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _by_class(classes: Sequence[str], hits: Sequence[bool]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for c, h in zip(classes, hits, strict=True):
        groups[c].append(h)
    return {c: {"n": len(h), "accuracy": _accuracy(h)} for c, h in sorted(groups.items())}


def counting_metrics(
    predictions: Sequence[int | None], truths: Sequence[int], classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """Exact-match accuracy, overall and per class (the label asked); also the mean absolute error over the
    parseable answers."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} questions")
    hits = [p is not None and int(p) == int(t) for p, t in zip(predictions, truths, strict=True)]
    errors = [abs(int(p) - int(t)) for p, t in zip(predictions, truths, strict=True) if p is not None]
    out: dict[str, Any] = {
        "n": len(hits),
        "accuracy": _accuracy(hits),
        "mae_parsed": sum(errors) / len(errors) if errors else None,
    }
    if classes is not None:
        out["per_class"] = _by_class(classes, hits)
    return out


def grounding_scores(prediction: Sequence[int] | None, truth: Sequence[int]) -> tuple[bool, bool, bool]:
    """``(acc100, acc50, top1)`` of one grounding answer (module docstring for the definitions)."""
    if prediction is None:
        return False, False, False
    pred = list(prediction)
    true = set(truth)
    if not true:
        ok = not pred
        return ok, ok, ok
    found = len(set(pred) & true)
    return set(pred) == true, 2 * found >= len(true), bool(pred) and pred[0] in true


def grounding_metrics(
    predictions: Sequence[Sequence[int] | None],
    truths: Sequence[Sequence[int]],
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Acc@100, Acc@50 and Top-1 over the 3 x 3 cells, overall and per class (the label asked)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} questions")
    scores = [grounding_scores(p, t) for p, t in zip(predictions, truths, strict=True)]
    names = ("acc100", "acc50", "top1")
    out: dict[str, Any] = {"n": len(scores)}
    for k, name in enumerate(names):
        out[name] = _accuracy([s[k] for s in scores])
    if classes is not None:
        per: dict[str, dict[str, Any]] = {}
        groups: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)
        for c, s in zip(classes, scores, strict=True):
            groups[c].append(s)
        for c, ss in sorted(groups.items()):
            per[c] = {"n": len(ss), **{name: _accuracy([s[k] for s in ss]) for k, name in enumerate(names)}}
        out["per_class"] = per
    return out


def classification_metrics(predictions: Sequence[str | None], truths: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall (micro), mean of the per-class accuracies (macro), per true class, and the confusion
    counts ``confusion[true][predicted]`` (``"<unparsed>"`` for answers naming no class)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} questions")
    hits = [p is not None and p == t for p, t in zip(predictions, truths, strict=True)]
    per = _by_class(truths, hits)
    confusion: dict[str, Counter[str]] = defaultdict(Counter)
    for p, t in zip(predictions, truths, strict=True):
        confusion[t][p if p is not None else "<unparsed>"] += 1
    accs = [v["accuracy"] for v in per.values() if v["accuracy"] is not None]
    return {
        "n": len(hits),
        "accuracy": _accuracy(hits),
        "macro_accuracy": sum(accs) / len(accs) if accs else None,
        "per_class": per,
        "confusion": {t: dict(sorted(c.items())) for t, c in sorted(confusion.items())},
    }
