"""Training objectives beyond the model's own next-token loss (stage 0, DESIGN 4; not in the paper).

- :func:`answer_mean_loss`: cross-entropy averaged over each record's answer tokens first, then over the
  records. With the model's per-token mean, a detection answer (about 31 tokens per box) outweighs a count
  (2 tokens) by 15-100x and the model learns the box format before it learns to look; per answer, every record
  weighs the same.
- :class:`TargetHead` + :func:`target_maps` + :func:`target_loss`: a dense "target here" loss on the merged
  visual tokens (the merger output, before the TLM). A linear head predicts, for each token's
  ``28 x 28`` px cell (patch 14 x spatial merge 2), whether a target's box centre lies in it and whether a
  target box overlaps it; binary cross-entropy against the ground-truth boxes. It gives the vision tower a
  direct, per-token signal about where the targets are, which a 1 M-parameter model does not get from the
  answers alone in the time available on a CPU (training/RESULTS.md). The head is used in training only and
  is not part of the exported model.
- :class:`ImageProbe` + :func:`probe_loss`: image-level facts (cells, count, class) from the pooled visual
  tokens (deep supervision; training only).
- :class:`PositionProbe` + :func:`position_loss`: a linear probe on the language model's hidden states at the
  visual tokens (after layer :data:`POSITION_LAYER`) that must read each token's row and column on its image.
  A visual token enters the language model without its place (Qwen2.5-VL's vision tower has no absolute
  position embedding; M-RoPE only rotates queries and keys), so a box answer needs the early layers to write
  the place into each token, as classes (row and column bins); the probe teaches them that directly
  (training/RESULTS.md, issue 9).
- :func:`spread_loss`: keeps the visual tokens centred (measured: it dominated the loss; off in the shipped
  recipe).

Used in the shipped demo recipe (training/make_demo.sh): the answer mean, the dense target loss and the image
probe (stage 0a, vision only) and the position probe (stage 0b). Trained inside the full model from scratch
(session 3), the target loss and the probe alone did not make a 1 M-parameter model read the image; the
spread loss is off. All are tested options for any base size (training/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ImageProbe",
    "PositionProbe",
    "TargetHead",
    "answer_mean_loss",
    "position_layer",
    "position_loss",
    "probe_loss",
    "spread_loss",
    "target_loss",
    "target_maps",
]

TARGET_CHANNELS = ("centre", "overlap")
"""Channels of the dense target map (one logit each per visual token)."""


def answer_mean_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, mean over each record's supervised tokens, then mean over records.

    :param logits: ``(B, L, V)`` float, the model's logits for ``input_ids``.
    :param labels: ``(B, L)`` int64, the token ids to predict (``ignore_index`` on prompt/padding); shifted
        by one inside, as the causal LM loss does.
    :returns: scalar loss; records with no supervised token are left out (0 when none has one).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != ignore_index).to(per_token.dtype)
    n = mask.sum(dim=1)
    keep = n > 0
    if not bool(keep.any()):
        return per_token.sum() * 0.0
    per_record = (per_token * mask).sum(dim=1)[keep] / n[keep]
    return per_record.mean()


class TargetHead(nn.Module):
    """Linear head: merged visual token ``(N, C)`` -> ``(N, 2)`` logits (:data:`TARGET_CHANNELS`)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, len(TARGET_CHANNELS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # on the RMS-normalised tokens: the language model first RMS-normalises each token, so
        # only a token's direction reaches it; a head on raw tokens could read "target here" from its norm
        return self.proj(F.rms_norm(tokens.float(), (tokens.shape[-1],)))


def spread_loss(tokens: torch.Tensor) -> torch.Tensor:
    """Squared norm of the mean RMS-normalised visual token of the batch, in [0, C] (C = channels).

    Trained from scratch, the merger's output grows a large component shared by every token of every image
    (norms x20-800, training/RESULTS.md); after the language model's RMSNorm all tokens then point the same
    way and any attention over them averages to the same vector, whatever the image. Penalising the mean
    direction keeps the tokens centred, so that what differs between images is what the model reads.
    """
    unit = F.rms_norm(tokens.float(), (tokens.shape[-1],)) / tokens.shape[-1] ** 0.5
    return unit.mean(dim=0).pow(2).sum() * tokens.shape[-1]


def target_maps(
    boxes: Sequence[Sequence[float]], grid_thw: Sequence[int], grid: int, merge: int = 2
) -> torch.Tensor:
    """Ground-truth target map of one image for :class:`TargetHead`.

    :param boxes: ``[x1, y1, x2, y2]`` boxes in pixels of the ``grid`` x ``grid`` model input.
    :param grid_thw: the image's ``(t, h, w)`` in 14 px patches (``image_grid_thw``).
    :param grid: input side in pixels (the record's ``coordinate_size``).
    :param merge: spatial merge size (2 in Qwen2.5-VL): one visual token per ``merge x merge`` patches.
    :returns: ``(t * h/merge * w/merge, 2)`` float32 in {0, 1}, raster order (the merger's output order):
        channel 0 = a box centre lies in the token's cell, channel 1 = a box overlaps the cell.
    """
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = h // merge, w // merge
    cell_y, cell_x = grid / rows, grid / cols
    out = torch.zeros((rows, cols, len(TARGET_CHANNELS)), dtype=torch.float32)
    for x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        r, c = min(max(int(cy // cell_y), 0), rows - 1), min(max(int(cx // cell_x), 0), cols - 1)
        out[r, c, 0] = 1.0
        r0, r1 = max(int(y1 // cell_y), 0), min(int((y2 - 1e-6) // cell_y), rows - 1)
        c0, c1 = max(int(x1 // cell_x), 0), min(int((x2 - 1e-6) // cell_x), cols - 1)
        if r1 >= r0 and c1 >= c0:
            out[r0 : r1 + 1, c0 : c1 + 1, 1] = 1.0
    return out.reshape(rows * cols, len(TARGET_CHANNELS)).repeat(t, 1)


def _tokens_per_image(tokens: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> list[int]:
    """Merged visual tokens per image (``t * h * w / merge**2``); raises ValueError when they do not add up to
    ``tokens``."""
    sizes = [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]
    if sum(sizes) != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} visual tokens but image_grid_thw gives {sum(sizes)}")
    return sizes


def target_loss(
    head: TargetHead,
    tokens: torch.Tensor,
    grid_thw: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]] | None],
    grids: Sequence[int],
    merge: int = 2,
) -> torch.Tensor:
    """Binary cross-entropy of :class:`TargetHead` over the visual tokens of the images with known boxes.

    :param tokens: ``(sum of tokens, C)`` merged visual tokens of the batch, image after image.
    :param grid_thw: ``(B, 3)`` patches per image.
    :param boxes: per image its boxes on its grid, or None when its targets are unknown (left out).
    :param grids: per image its input side in pixels.
    :returns: scalar; 0 (with a graph) when no image has known boxes.
    """
    sizes = _tokens_per_image(tokens, grid_thw, merge)
    logits = head(tokens)
    parts, targets = [], []
    start = 0
    for n, thw, b, g in zip(sizes, grid_thw.tolist(), boxes, grids, strict=True):
        if b is not None:
            parts.append(logits[start : start + n])
            targets.append(target_maps(b, thw, g, merge).to(logits.device))
        start += n
    if not parts:
        return logits.sum() * 0.0
    pred, target = torch.cat(parts), torch.cat(targets)
    # positives are rare (a few cells of 144): weight them up so the head cannot settle on "nothing anywhere"
    pos_weight = torch.tensor([8.0, 4.0], device=pred.device)
    return F.binary_cross_entropy_with_logits(pred, target, pos_weight=pos_weight)


POSITION_LAYER = 2
"""The language model's hidden states read by :class:`PositionProbe`: after this many decoder layers (fewer
in a model that has no more; see :func:`position_layer`)."""


def position_layer(text_config: object) -> int:
    """Index into the language model's ``hidden_states`` read by :class:`PositionProbe`:
    ``min(POSITION_LAYER, layers - 1)`` (the last entry is after the final norm, not a layer's output).

    :raises UsageError: a language model of fewer than 2 layers (nothing between the input and the output).
    """
    from fusarbatch.errors import UsageError

    layers = int(getattr(text_config, "num_hidden_layers", 0) or 0)
    if layers < 2:
        raise UsageError(
            f"--position-loss-weight needs a language model of at least 2 layers (this one has {layers}); "
            "leave it at 0"
        )
    return min(POSITION_LAYER, layers - 1)


POSITION_BINS = 32
"""Classes per axis of :class:`PositionProbe`: a token's row (column) centre, as a fraction of the image
height (width), falls in one of this many equal bins (distinct bins for images up to 32 tokens a side)."""


class PositionProbe(nn.Module):
    """Linear head: a visual token's language-model hidden state ``(N, C)`` -> ``(N, 2, POSITION_BINS)``
    logits of its row and column bins (:func:`position_bins`).

    Classes, not a regressed fraction: a box answer writes each coordinate digit by digit, and a digit (say
    the tens of ``x1``) is a lookup from a categorical place but a sawtooth of a scalar one
    (training/RESULTS.md).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2 * POSITION_BINS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.proj(F.rms_norm(hidden.float(), (hidden.shape[-1],)))
        return out.view(*out.shape[:-1], 2, POSITION_BINS)


def position_bins(grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """Row and column bins of every merged visual token of a batch, image after image, raster order.

    :param grid_thw: ``(B, 3)`` patches per image (``image_grid_thw``).
    :returns: ``(sum of t * h/merge * w/merge, 2)`` int64 in ``[0, POSITION_BINS)``:
        ``floor((row + 0.5) / rows * POSITION_BINS)`` and the same for the column.
    """
    parts = []
    for t, h, w in grid_thw.tolist():
        rows, cols = int(h) // merge, int(w) // merge
        r = ((torch.arange(rows, dtype=torch.float64) + 0.5) / rows * POSITION_BINS).floor().long()
        c = ((torch.arange(cols, dtype=torch.float64) + 0.5) / cols * POSITION_BINS).floor().long()
        grid = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(rows * cols, 2)
        parts.append(grid.repeat(int(t), 1))
    return torch.cat(parts) if parts else torch.zeros((0, 2), dtype=torch.long)


def position_loss(
    probe: PositionProbe,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    grid_thw: torch.Tensor,
    merge: int = 2,
) -> torch.Tensor:
    """Cross-entropy of :class:`PositionProbe` over the row and column bins of every visual token of a batch.

    :param hidden: ``(B, L, C)`` hidden states of the language model (after :data:`POSITION_LAYER` layers).
    :param input_ids: ``(B, L)``; the visual tokens are the ``image_token_id`` positions, in the batch's image
        order (one image per record, as the triplet collator builds them).
    :param grid_thw: ``(B_images, 3)`` patches per image.
    :returns: scalar (``ln 32`` = 3.47 for an uninformed probe); 0 (with a graph) when the batch holds no
        image.
    :raises ValueError: the image tokens and ``grid_thw`` disagree on the number of visual tokens.
    """
    mask = input_ids == image_token_id
    target = position_bins(grid_thw.cpu(), merge).to(hidden.device)
    if int(mask.sum()) != target.shape[0]:
        raise ValueError(f"{int(mask.sum())} image tokens but image_grid_thw gives {target.shape[0]}")
    if target.shape[0] == 0:
        return hidden.sum() * 0.0
    logits = probe(hidden[mask])
    return F.cross_entropy(logits.reshape(-1, POSITION_BINS), target.reshape(-1))


class ImageProbe(nn.Module):
    """Linear heads on the mean of an image's RMS-normalised merged visual tokens: the 3 x 3 cells holding
    targets (9 logits), the number of targets (``log1p``) and, for records with a class, the class
    (``len(classes)`` logits). Deep supervision for stage 0 (training only).

    From scratch, the language model's first way of reading an image is attention spread over all its visual
    tokens, i.e. roughly their mean; a target that only a few tokens show averages away, and the answer
    stays the prior (training/RESULTS.md). A global signal in every token survives: the TLM's anchor
    modulation is learnt in tens of steps that way (tests/training/test_tlm_information.py). The probe asks
    the pooled tokens for the image-level facts the answers need, so the vision tower writes them where
    that first reading finds them.
    """

    def __init__(self, hidden_size: int, classes: Sequence[str]) -> None:
        super().__init__()
        self.classes = list(classes)
        self.proj = nn.Linear(hidden_size, 9 + 1 + len(self.classes))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(pooled.float())


def probe_loss(
    probe: ImageProbe,
    tokens: torch.Tensor,
    grid_thw: torch.Tensor,
    boxes: Sequence[Sequence[Sequence[float]] | None],
    grids: Sequence[int],
    classes: Sequence[str | None],
    merge: int = 2,
) -> torch.Tensor:
    """Loss of :class:`ImageProbe` over a batch: BCE on the cells + squared error on ``log1p(count)`` for
    images with known boxes, cross-entropy on the class for images whose class is in ``probe.classes``.

    :param tokens: ``(sum of tokens, C)`` merged visual tokens of the batch, image after image.
    :param grid_thw: ``(B, 3)`` patches per image.
    :returns: scalar (0 with a graph when no image has a target).
    """
    from fusarbatch.model.prompts import grounding_cell

    sizes = _tokens_per_image(tokens, grid_thw, merge)
    unit = F.rms_norm(tokens.float(), (tokens.shape[-1],))
    terms = []
    for i, part in enumerate(torch.split(unit, sizes)):
        b, g, c = boxes[i], grids[i], classes[i]
        has_class = c is not None and c in probe.classes
        if (b is None or not g) and not has_class:
            continue
        out = probe(part.mean(dim=0))
        if b is not None and g:
            cells = torch.zeros(9, device=out.device)
            for x1, y1, x2, y2 in b:
                cells[grounding_cell((x1 + x2) / 2, (y1 + y2) / 2, grid=g) - 1] = 1.0
            count = torch.tensor(math.log1p(len(b)), device=out.device)
            terms.append(F.binary_cross_entropy_with_logits(out[:9], cells) + (out[9] - count) ** 2)
        if has_class:
            target = torch.tensor(probe.classes.index(c), device=out.device)
            terms.append(F.cross_entropy(out[10:][None], target[None]))
    if not terms:
        return tokens.sum() * 0.0
    return torch.stack(terms).mean()
