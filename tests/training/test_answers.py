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
