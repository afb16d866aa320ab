"""Baselines of ``fusarbatch eval`` on small hand-made manifests with known answers: majority answers,
the median box, the shuffled-image pairing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusarbatch.model.prompts import (
    Box,
    classification_prompt,
    counting_prompt,
    detection_prompt,
    grounding_prompt,
)
from training.answers import Prediction
from training.baselines import (
    ALL,
    derangement,
    majority_predictions,
    median_box_predictions,
    pair_prediction,
    priors_from,
    shuffled_pairs,
)
from training.evaluate import baseline_metrics
from training.manifest import Triplet


def rec(rid, task, answer, label="ship", size=504):
    question = {
        "counting": counting_prompt(label),
        "grounding": grounding_prompt(label),
        "detection": detection_prompt(label),
        "classification": classification_prompt([0, 0, size, size], ["T72", "BMP2"], grid=size),
    }[task]
    return Triplet(
        rid, image=Path("unused.png"), question=question, answer=answer, coordinate_size=size, task=task
    )


def det(*boxes, label="ship"):
    return json.dumps([{"bbox_2d": list(b), "label": label} for b in boxes])


TRAIN = [
    rec("c1", "counting", "1"),
    rec("c2", "counting", "1"),
    rec("c3", "counting", "2"),
    rec("c4", "counting", "0"),
    rec("c5", "counting", "3", label="vehicle"),
    rec("c6", "counting", "3", label="vehicle"),
    rec("g1", "grounding", "[5]"),
    rec("g2", "grounding", "[5]"),
    rec("g3", "grounding", "[1, 5]"),
    rec("k1", "classification", "T72"),
    rec("k2", "classification", "BMP2"),
    rec("k3", "classification", "T72"),
    # boxes as fractions of their grid: (0.1, 0.2, 0.3, 0.4), (0.5, 0.1, 0.9, 0.2), (0.2, 0.3, 0.4, 0.9)
    rec("d1", "detection", det((50.4, 100.8, 151.2, 201.6))),
    rec("d2", "detection", det((168, 33.6, 302.4, 67.2), (67.2, 100.8, 134.4, 302.4)), size=336),
    rec("d3", "detection", "None"),
]


def test_majority_answers_and_median_box_from_the_training_records():
    p = priors_from(TRAIN, "train.jsonl")
    # ship counts 1, 1, 2, 0 -> 1; vehicle 3, 3 -> 3; over all labels 1 and 3 tie (twice each): the smaller
    assert p.counts == {"ship": 1, "vehicle": 3, ALL: 1}
    assert p.cells == {"ship": (5,), ALL: (5,)}
    assert p.classes == "T72"
    # per coordinate: x1 median(0.1, 0.5, 0.2) = 0.2, y1 median(0.2, 0.1, 0.3) = 0.2, x2 0.4, y2 0.4
    assert p.boxes["ship"] == pytest.approx((0.2, 0.2, 0.4, 0.4))
    evaluated = [
        rec("e1", "counting", "1"),
        rec("e2", "counting", "4", label="plane"),  # unseen label: the majority over all labels
        rec("e3", "grounding", "[5]"),
        rec("e4", "classification", "BMP2"),
        rec("e5", "detection", "None", size=336),
    ]
    majority = majority_predictions(evaluated, p)
    assert [m.value if m else None for m in majority] == [1, 1, (5,), "T72", None]
    median = median_box_predictions(evaluated, p)
    assert median[:4] == [None] * 4
    [box] = median[4].value
    assert box.label == "ship" and box.as_list() == pytest.approx([67.2, 67.2, 134.4, 134.4])
    assert median[4].scores == (1.0,)


def test_derangement_and_shuffled_pairs_stay_within_the_question():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        perm = derangement(n, rng)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    with pytest.raises(ValueError):
        derangement(1, rng)
    records = [
        rec("a", "counting", "1"),
        rec("b", "counting", "2"),
        rec("c", "counting", "3"),
        rec("v", "counting", "3", label="vehicle"),  # alone in its group: left out
        rec("d", "detection", "None"),
        rec("e", "detection", "None"),
    ]
    pairs = shuffled_pairs(records, seed=0)
    assert pairs == shuffled_pairs(records, seed=0)  # fixed seed: the same pairing every run
    assert sorted(p for p, _ in pairs) == sorted(t for _, t in pairs) == [0, 1, 2, 4, 5]
    assert all(p != t and records[p].task == records[t].task for p, t in pairs)
    assert {(4, 5), (5, 4)} <= set(pairs)
    assert all((p < 3) == (t < 3) for p, t in pairs)  # ship counting with ship counting


def test_a_box_answer_moves_to_the_other_records_grid():
    own, other = rec("a", "detection", "None", size=504), rec("b", "detection", "None", size=336)
    moved = pair_prediction(Prediction((Box("ship", 252, 0, 504, 126),), scores=(0.7,)), own, other)
    assert moved.value[0].as_list() == pytest.approx([168, 0, 336, 84]) and moved.scores == (0.7,)


def test_baseline_metrics_on_known_records():
    evaluated = [
        rec("e1", "counting", "1"),
        rec("e2", "counting", "2"),
        rec("e3", "counting", "1"),
        rec("e4", "detection", det((67.2, 67.2, 134.4, 134.4)), size=336),  # the median box exactly
        rec("e5", "detection", det((0, 0, 10, 10))),
    ]
    # the engine's answers: counts right on e1 and e2 only
    engine = [Prediction(1), Prediction(2), Prediction(3), Prediction(()), Prediction(())]
    m = baseline_metrics(evaluated, engine, train_records=TRAIN, train_source="train.jsonl", with_cfar=False)
    assert set(m) == {"majority", "median_box", "shuffled"}
    assert m["majority"]["source"] == "training manifest(s) train.jsonl"
    assert m["majority"]["tasks"]["counting"]["accuracy"] == pytest.approx(2 / 3)  # always 1: e1, e3
    assert "detection" not in m["majority"]["tasks"]
    d = m["median_box"]["tasks"]["detection"]
    assert d["iou_0.5"]["overall"] == {"tp": 1, "fp": 1, "fn": 1, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert d["ap_0.5"]["map"] == pytest.approx(0.25)  # both score 1: one point, P 1/2 at R 1/2
    # shuffled: counts paired with other records' truths (1, 2, 1 deranged); detection answers are empty
    sh = m["shuffled"]["tasks"]
    assert sh["counting"]["n"] == 3 and sh["detection"]["iou_0.5"]["overall"]["tp"] == 0
    pairs = shuffled_pairs(evaluated, 0)
    truths = [1, 2, 1, None, None]
    hits = sum(engine[p].value == truths[t] for p, t in pairs if t < 3)
    assert sh["counting"]["accuracy"] == pytest.approx(hits / 3)
    without = baseline_metrics(evaluated, engine, with_cfar=False)
    assert without["majority"]["source"].startswith("the evaluated records")
