"""Per-box confidence of a generated detection answer, from the probabilities of the box's own tokens.

A detection answer is one generated sequence, ``[{"bbox_2d": [x1, y1, x2, y2], "label": "ship"}, ...]``. Its
sequence probability (:attr:`fusarbatch.model.Generation.logprob`) is shared by every box of the answer and
shrinks with the answer's length (about 1e-20 for a tiny model), so it can neither rank boxes nor be
thresholded. Each box gets its own confidence instead:

    score = exp( mean over the box's coordinate tokens of log p(token) )

the geometric mean of the greedy probabilities of the tokens that spell the box's four ``bbox_2d`` numbers
(:attr:`fusarbatch.model.prompts.ParseResult.spans`: every token whose character range overlaps one of the
four numbers; the whole object's text when the parser cannot tell the numbers apart). It lies in [0, 1].

Why these tokens and this mean:

- The coordinate tokens are where the model says where the box is; the keys, brackets and label around them
  are a fixed template that a trained model writes with probability close to 1, so including them would
  only pull every box toward 1 and compress the ranking.
- The geometric mean is the per-token probability normalised for length (the score of length-normalised
  beam search), so boxes written with more digits (``[102, 267, 161, 328]`` against ``[2, 7, 16, 32]``)
  are not penalised for it. The minimum over the tokens was the other candidate: it is decided by the
  single least certain digit, usually a last digit that the model can only guess, so it ranks boxes by
  the precision of one digit rather than by the box.
- It is a greedy-decoding probability, not a calibrated probability that the box is a true target.

The answer-level probability is kept beside it (``answer_score`` in the detections table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["box_confidences", "span_confidence"]


def span_confidence(
    token_logprobs: Sequence[float],
    token_spans: Sequence[tuple[int, int]],
    char_spans: Sequence[tuple[int, int]],
) -> float | None:
    """Geometric mean of the probabilities of the tokens whose character range overlaps ``char_spans``.

    :param token_logprobs: natural-log probability per generated token
        (:attr:`fusarbatch.model.Generation.token_logprobs`).
    :param token_spans: ``(start, end)`` per token in the answer text
        (:meth:`fusarbatch.model.FusarGPT.token_spans`); empty ranges never overlap.
    :param char_spans: ``(start, end)`` ranges of the text of interest (one box's coordinates).
    :returns: ``exp(mean(log p))`` over the overlapping tokens, in [0, 1]; None when no token overlaps
        (e.g. spans from another text) or a log-probability is NaN.
    """
    picked = [
        lp
        for lp, (ts, te) in zip(token_logprobs, token_spans, strict=False)
        if te > ts and any(ts < e and te > s for s, e in char_spans)
    ]
    if not picked or any(math.isnan(lp) for lp in picked):
        return None
    return min(max(math.exp(sum(picked) / len(picked)), 0.0), 1.0)


def box_confidences(
    token_logprobs: Sequence[float],
    token_spans: Sequence[tuple[int, int]],
    box_spans: Sequence[Sequence[tuple[int, int]]],
) -> list[float | None]:
    """:func:`span_confidence` of each box (``box_spans``: :attr:`ParseResult.spans` of the answer)."""
    return [span_confidence(token_logprobs, token_spans, spans) for spans in box_spans]
