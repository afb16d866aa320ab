"""Per-box confidence: token character ranges from incremental decoding, the box's coordinate tokens, the
geometric mean of their probabilities; on hand-set log-probabilities and on a real generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from fusarbatch.model import (
    FusarGPT,
    box_confidences,
    decoded_token_spans,
    detection_prompt,
    load_processor,
    parse_detection,
    span_confidence,
)
from tests.conftest import FIXED_ANSWER

TWO_BOXES = (
    'Found: [{"bbox_2d": [102, 267, 161, 328], "label": "ship"}, '
    '{"label": "boat", "bbox_2d": [5, 6, 70, 80]}] é'
)


@pytest.fixture(scope="module")
def tokenizer(generated_tiny_model_dir):
    return load_processor(generated_tiny_model_dir).tokenizer


def test_token_spans_cover_the_text_and_match_the_tokenizer_offsets(tokenizer) -> None:
    enc = tokenizer(TWO_BOXES, add_special_tokens=False, return_offsets_mapping=True)
    spans = decoded_token_spans(tokenizer, enc["input_ids"])
    # a different method (the fast tokenizer's own offsets at encoding) gives the same ranges, except that
    # the two byte tokens of "é" share its one character: the first is empty, the second holds it
    assert spans[:-2] == tuple(tuple(o) for o in enc["offset_mapping"][:-2])
    assert [TWO_BOXES[s:e] for s, e in spans[-2:]] == ["", "é"]
    assert "".join(TWO_BOXES[s:e] for s, e in spans) == TWO_BOXES
    # special tokens decode to nothing; leading white space is stripped as in Generation.text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer(" 42", add_special_tokens=False)["input_ids"], im_end]
    assert [(s, e) for s, e in decoded_token_spans(tokenizer, ids) if e > s] == [(0, 1), (1, 2)]


def test_each_box_scores_the_geometric_mean_of_its_coordinate_tokens(tokenizer) -> None:
    ids = tokenizer(TWO_BOXES, add_special_tokens=False)["input_ids"]
    spans = decoded_token_spans(tokenizer, ids)
    parsed = parse_detection(TWO_BOXES, grid=504)
    assert [b.label for b in parsed.value] == ["ship", "boat"]
    first, second = parsed.spans
    assert [TWO_BOXES[s:e] for s, e in first] == ["102", "267", "161", "328"]
    assert [TWO_BOXES[s:e] for s, e in second] == ["5", "6", "70", "80"]
    # hand-set probabilities: 0.5 on the first box's digits, 0.9 and 0.6 alternating on the second's,
    # 0.01 everywhere else (keys, brackets, labels: they must not count)
    logprobs = [math.log(0.01)] * len(ids)
    digits_second = []
    for k, (s, e) in enumerate(spans):
        if any(s < b and e > a for a, b in first):
            logprobs[k] = math.log(0.5)
        elif any(s < b and e > a for a, b in second):
            digits_second.append(k)
            logprobs[k] = math.log(0.9 if len(digits_second) % 2 else 0.6)
    assert len(digits_second) == 6  # 5, 6, 7, 0, 8, 0: one token per digit (Qwen's digit split)
    scores = box_confidences(logprobs, spans, parsed.spans)
    assert scores[0] == pytest.approx(0.5)
    assert scores[1] == pytest.approx((0.9 * 0.6) ** 0.5)  # geometric mean of 0.9, 0.6, 0.9, 0.6, 0.9, 0.6
    assert span_confidence(logprobs, spans, [(0, 0)]) is None  # no token there


def test_generated_boxes_get_their_own_scores(generated_fixed_answer_model) -> None:
    fusar = FusarGPT.from_pretrained(generated_fixed_answer_model, device="cpu")
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    [gen] = fusar.generate_detailed([image], [detection_prompt("ship")], [None], max_new_tokens=80)
    assert gen.text == FIXED_ANSWER and gen.finished
    assert len(gen.token_logprobs) == len(gen.token_ids)
    assert all(lp <= 0 for lp in gen.token_logprobs)
    # the answer's log-probability is the tokens' plus the end token's
    assert sum(gen.token_logprobs) >= gen.logprob > sum(gen.token_logprobs) + math.log(0.5)
    parsed = parse_detection(gen.text, grid=fusar.image_size)
    scores = box_confidences(gen.token_logprobs, fusar.token_spans(gen), parsed.spans)
    assert len(scores) == 2 and all(0 < s <= 1 for s in scores)
    assert scores[0] != scores[1]
    assert all(s > math.exp(gen.logprob) for s in scores)  # a mean of some tokens, not the product of all
