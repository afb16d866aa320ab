"""The expected answers of a manifest (training/answers.py ``truth_of``): parsed strictly, so a broken
manifest is a usage error and not a silent baseline."""

from __future__ import annotations

import pytest

from fusarbatch.errors import UsageError
from fusarbatch.model.prompts import grounding_prompt
from training.answers import truth_of
from training.manifest import Triplet


def _grounding(answer: str) -> Triplet:
    return Triplet(
        "g", "generated.png", grounding_prompt("ship"), answer, coordinate_size=336, task="grounding"
    )


@pytest.mark.parametrize("answer, cells", [("[5, 1]", (5, 1)), ("[]", ()), ("None", ())])
def test_grounding_truth(answer, cells):
    assert truth_of(_grounding(answer)) == cells


@pytest.mark.parametrize(
    "answer",
    [
        '{"bbox_2d": "abc"}',  # hostile round 3: read as cell 2 (the "2" of bbox_2d), scored, majority 100 %
        "[0, 12]",  # no cell 1..9: was an empty truth, i.e. "no target"
        "[5, 5]",
        "not an answer",
    ],
)
def test_grounding_truth_that_does_not_parse_is_a_usage_error(answer):
    with pytest.raises(UsageError, match="is not a JSON list of distinct cells"):
        truth_of(_grounding(answer))


def _detection(answer: str) -> Triplet:
    from fusarbatch.model.prompts import detection_prompt

    return Triplet(
        "d", "generated.png", detection_prompt("ship"), answer, coordinate_size=336, task="detection"
    )


def test_detection_truth():
    boxes = truth_of(_detection('[{"bbox_2d": [10, 20, 30, 40], "label": "ship"}]'))
    assert [(b.x1, b.y1, b.x2, b.y2, b.label) for b in boxes] == [(10, 20, 30, 40, "ship")]
    assert truth_of(_detection("None")) == ()


@pytest.mark.parametrize(
    "answer",
    [
        '[{"bbox_2d": [-50, -50, 9999, 9999], "label": "ship"}]',  # hostile round 3: clipped to the grid
        '[{"bbox_2d": [100, 100, 10, 10], "label": "ship"}]',  # hostile round 3: corners swapped
        '[{"bbox_2d": [1, 2, 3], "label": "ship"}]',
        '[{"bbox_2d": [5, 5, 5, 5], "label": "ship"}]',
    ],
)
def test_detection_truth_that_the_parser_would_repair_is_a_usage_error(answer):
    with pytest.raises(UsageError, match="is not a clean list of boxes"):
        truth_of(_detection(answer))
