"""The paper's metrics against hand-computed cases (empty/None/unparseable answers, boxes outside the image,
duplicates)."""

from __future__ import annotations

import pytest

from fusarbatch.model import parse_detection
from fusarbatch.model.prompts import (
    Box,
    caption_prompt,
    classification_prompt,
    counting_prompt,
    detection_prompt,
    grounding_prompt,
)
from training.answers import read_answer
from training.evaluate import metrics_markdown, score_predictions
from training.manifest import Triplet
from training.metrics import (
    DetectionCounts,
    average_precision,
    classification_metrics,
    counting_metrics,
    detection_metrics,
    grounding_metrics,
    grounding_scores,
    iou,
    match_detections,
)


def B(x1, y1, x2, y2, label="ship"):
    return Box(label, x1, y1, x2, y2)


def test_iou_hand_computed_and_clipped():
    assert iou(B(0, 0, 10, 10), B(0, 0, 10, 10)) == 1.0
    assert iou(B(0, 0, 10, 10), B(5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou(B(0, 0, 10, 10), B(20, 20, 30, 30)) == 0.0
    # outside the image: clipped to [0, 504] first. (500, 0, 520, 10) -> (500, 0, 504, 10)
    assert iou(B(500, 0, 520, 10), B(500, 0, 504, 10)) == 1.0
    assert iou(B(510, 0, 530, 10), B(510, 0, 530, 10)) == 0.0  # entirely outside: no area, matches nothing
    assert iou(B(0, 0, 0, 10), B(0, 0, 0, 10)) == 0.0  # degenerate


def test_greedy_one_to_one_matching_and_duplicates():
    truths = [B(0, 0, 10, 10), B(100, 100, 120, 120)]
    # a duplicate of the first box: only one of the two can match -> 1 FP
    preds = [B(0, 0, 10, 10), B(0, 0, 10, 10), B(100, 100, 119, 120)]
    c = match_detections(preds, truths, 0.5)["ship"]
    assert (c.tp, c.fp, c.fn) == (2, 1, 0)
    assert c.precision == pytest.approx(2 / 3) and c.recall == 1.0 and c.f1 == pytest.approx(0.8)
    # greedy by IoU, not by answer order: the first prediction overlaps both truths, the second only one
    truths = [B(0, 0, 10, 10), B(6, 0, 16, 10)]
    preds = [B(3, 0, 13, 10), B(0, 0, 10, 10)]
    # IoUs: p0-t0 = 7/13, p0-t1 = 7/13, p1-t0 = 1 -> p1-t0 first, then p0-t1
    c = match_detections(preds, truths, 0.5)["ship"]
    assert (c.tp, c.fp, c.fn) == (2, 0, 0)


def test_labels_must_agree():
    counts = match_detections([B(0, 0, 10, 10, "plane")], [B(0, 0, 10, 10, "ship")], 0.25)
    assert (counts["plane"].tp, counts["plane"].fp, counts["plane"].fn) == (0, 1, 0)
    assert (counts["ship"].tp, counts["ship"].fp, counts["ship"].fn) == (0, 0, 1)


def test_detection_metrics_thresholds_empty_and_unparseable():
    truths = [[B(0, 0, 10, 10)], [B(0, 0, 20, 20, "plane")], [], []]
    preds = [
        [B(0, 0, 10, 15)],  # IoU 100/150 = 0.667: TP at 0.25 and 0.5
        None,  # unparseable: no box -> 1 FN (plane)
        [],  # None answer, no truth: nothing
        [B(0, 0, 10, 10)],  # hallucination: FP
    ]
    m = detection_metrics(preds, truths)
    assert m["images"] == 4
    o = m["iou_0.25"]["overall"]
    assert (o["tp"], o["fp"], o["fn"]) == (1, 1, 1)
    assert o["precision"] == 0.5 and o["recall"] == 0.5 and o["f1"] == 0.5
    assert m["iou_0.5"]["overall"]["tp"] == 1
    plane = m["iou_0.5"]["per_class"]["plane"]
    assert (plane["tp"], plane["fp"], plane["fn"], plane["precision"], plane["recall"]) == (0, 0, 1, 0.0, 0.0)
    # IoU 0.4: a TP at 0.25 only
    m = detection_metrics([[B(0, 0, 10, 10)]], [[B(0, 0, 10, 25)]])
    assert m["iou_0.25"]["overall"]["tp"] == 1 and m["iou_0.5"]["overall"]["tp"] == 0
    # nothing predicted and nothing true: undefined, not 0 or 1
    empty = detection_metrics([[], None], [[], []])["iou_0.5"]["overall"]
    assert empty["precision"] is None and empty["recall"] is None and empty["f1"] is None
    assert DetectionCounts(0, 0, 3).precision == 0.0  # no prediction but truths: 0
    with pytest.raises(ValueError):
        detection_metrics([[]], [[], []])


def test_counting():
    m = counting_metrics([3, None, 2, 0], [3, 1, 5, 0], ["ship", "ship", "plane", "plane"])
    assert m["accuracy"] == 0.5 and m["n"] == 4
    assert m["mae_parsed"] == pytest.approx(1.0)  # |3-3| + |2-5| + |0-0| over 3 parsed
    assert m["per_class"] == {"plane": {"n": 2, "accuracy": 0.5}, "ship": {"n": 2, "accuracy": 0.5}}
    assert counting_metrics([], [])["accuracy"] is None


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        ([5, 1], [1, 5], (True, True, True)),
        ([5], [5, 1], (False, True, True)),  # half of the true cells
        ([2, 5], [5, 1, 3], (False, False, False)),  # 1 of 3 found; first cell wrong
        ([5, 2, 7], [5, 1], (False, True, True)),  # extra cells do not count against Acc@50
        ([], [5], (False, False, False)),
        (None, [5], (False, False, False)),  # unparseable
        ([], [], (True, True, True)),  # no target, empty answer
        ([3], [], (False, False, False)),
    ],
)
def test_grounding_scores(pred, truth, expected):
    assert grounding_scores(pred, truth) == expected


def test_grounding_metrics_per_class():
    m = grounding_metrics([[5, 1], [5], None], [[1, 5], [5, 1], [2]], ["ship", "ship", "plane"])
    assert m["acc100"] == pytest.approx(1 / 3) and m["acc50"] == pytest.approx(2 / 3)
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["per_class"]["plane"] == {"n": 1, "acc100": 0.0, "acc50": 0.0, "top1": 0.0}


def test_classification():
    m = classification_metrics(["T72", None, "BMP2", "T72"], ["T72", "T72", "T72", "BMP2"])
    assert m["accuracy"] == 0.25
    assert m["per_class"]["T72"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}
    assert m["per_class"]["BMP2"] == {"n": 1, "accuracy": 0.0}
    assert m["macro_accuracy"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["confusion"]["T72"] == {"<unparsed>": 1, "BMP2": 1, "T72": 1}


def _rec(task, question, answer, rid, meta=None):
    return Triplet(rid, image=None, question=question, answer=answer, task=task, meta=meta or {})  # type: ignore[arg-type]


def test_score_predictions_from_raw_model_text():
    """End to end from generated text, through the never-raising parsers, to the metrics."""
    choices = ["BMP2", "T72"]
    recs = [
        _rec("counting", counting_prompt("ship"), "3", "c1"),
        _rec("counting", counting_prompt("ship"), "2", "c2"),
        _rec("grounding", grounding_prompt("ship"), "[5, 1]", "g1"),
        _rec("classification", classification_prompt([0, 0, 504, 504], choices), "T72", "k1"),
        _rec("classification", classification_prompt([0, 0, 504, 504], choices), "BMP2", "k2"),
        _rec("detection", detection_prompt("ship"), '[{"bbox_2d": [0, 0, 504, 20], "label": "ship"}]', "d1"),
        _rec("detection", detection_prompt("ship"), "None", "d2"),
        _rec("caption", caption_prompt(), "A harbour.", "cap"),
    ]
    texts = [
        "3.",  # counted right, with punctuation
        "many",  # unparseable
        "```json\n[1, 5]\n```",  # right set, other order
        "The category is t72.",  # case and prose
        "a tank",  # names no choice: unparseable
        '[{"bbox_2d": [0, 0, 504, 20], "label": "ship"}, {"bbox_2d": [0, 0, 50',  # truncated, box past edge
        "None.",
        "Sea.",
    ]
    parsed = [read_answer(r, t) for r, t in zip(recs, texts, strict=True)]
    m = score_predictions(recs, parsed)
    as_tuples = score_predictions(recs, [(p.value, p.ok) for p in parsed])  # (value, ok): no box scores
    assert (
        as_tuples["counting"] == m["counting"]
        and as_tuples["detection"]["iou_0.5"] == m["detection"]["iou_0.5"]
    )
    assert m["counting"]["accuracy"] == 0.5 and m["counting"]["parse"]["failures"] == 1
    assert m["grounding"]["acc100"] == 1.0
    assert m["classification"]["accuracy"] == 0.5 and m["classification"]["parse"]["failures"] == 1
    det = m["detection"]["iou_0.5"]["overall"]
    assert (det["tp"], det["fp"], det["fn"]) == (1, 0, 0)  # the model's box past the edge is clipped to it
    assert m["caption"]["scored"] is False
    assert parse_detection("None").ok
    table = metrics_markdown({"model": "/m", "data": ["/d.jsonl"], "records": 8, "wall_s": 1.0, "tasks": m})
    assert "| counting | 2 | accuracy | 50.00 | 1 | - |" in table  # no baseline given: nothing to beat
    assert "| detection | 2 | F1@0.5 | 100.00 | 0 | - |" in table
    assert "| detection | 2 | AP@0.5 | 100.00 | 0 | - |" in table
    assert "| T72 | 1 | 100.00 |" in table


def test_average_precision_hand_computed_voc_all_points():
    """Two images; truth A in image 0, B and C in image 1. Boxes by decreasing score: 0.9 on A (TP), 0.8 on
    nothing (FP), 0.7 on B (TP), 0.6 a duplicate of A (FP); C is missed. Precision 1, 1/2, 2/3, 1/2 at
    recall 1/3, 1/3, 2/3, 2/3; made monotone: 1 up to recall 1/3, 2/3 up to 2/3, 0 beyond.
    AP = 1/3 * 1 + 1/3 * 2/3 = 5/9."""
    a, b, c = B(0, 0, 10, 10), B(100, 100, 120, 120), B(300, 300, 320, 320)
    truths = [[a], [b, c]]
    preds = [[a, B(1, 0, 11, 10)], [B(200, 200, 210, 210), B(101, 100, 121, 120)]]
    scores = [[0.9, 0.6], [0.8, 0.7]]
    ap = average_precision(preds, scores, truths, 0.5)
    assert ap["per_class"]["ship"] == {"ap": pytest.approx(5 / 9), "n_true": 3, "n_pred": 4}
    assert ap["map"] == pytest.approx(5 / 9)
    # the order of the scores decides, not the order of the answers: swapping the duplicate and the true
    # box of image 0 changes nothing; giving the miss the top score costs precision at every recall
    assert average_precision([[B(1, 0, 11, 10), a], preds[1]], [[0.6, 0.9], [0.8, 0.7]], truths)["map"] == (
        pytest.approx(5 / 9)
    )
    worst = average_precision(preds, [[0.9, 0.6], [0.95, 0.7]], truths)["map"]
    # ranks: FP, TP (P 1/2), TP (P 2/3), FP; the envelope lifts P 1/2 to 2/3: AP = 2/3 * 2/3 = 4/9
    assert worst == pytest.approx(4 / 9)
    # a label with no ground truth has no AP and does not enter the mean; no box at all: AP 0
    other = average_precision([[B(0, 0, 5, 5, "plane")], []], [[0.5], []], truths)
    assert other["per_class"]["plane"]["ap"] is None and other["per_class"]["ship"]["ap"] == 0.0
    assert other["map"] == 0.0
    # equal scores enter together: TP and FP at 0.9 (P 1/2, R 1/3), then TP and FP at 0.5 (P 1/2, R 2/3):
    # AP = 2/3 * 1/2 = 1/3 whatever the order of the tied boxes
    tied = [[0.9, 0.5], [0.9, 0.5]]
    assert average_precision(preds, tied, truths)["map"] == pytest.approx(1 / 3)
    swapped = [preds[1], preds[0]], [tied[1], tied[0]], [truths[1], truths[0]]
    assert average_precision(*swapped)["map"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="scores for"):
        average_precision(preds, [[0.9], [0.8, 0.7]], truths)
