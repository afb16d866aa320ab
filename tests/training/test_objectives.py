"""Stage-0 objectives: the per-answer loss mean and the dense target map/loss, on hand-checked values."""

from __future__ import annotations

import math

import pytest
import torch

from training.objectives import TargetHead, answer_mean_loss, target_loss, target_maps


def test_answer_mean_weighs_each_record_once():
    vocab = 4
    logits = torch.zeros((2, 5, vocab))
    # record 0: one answer token (id 1) at p = e^2 / (e^2 + 3); record 1: three tokens at p = 1/4
    logits[0, 2, 1] = 2.0
    labels = torch.full((2, 5), -100)
    labels[0, 3] = 1
    labels[1, 2:5] = torch.tensor([0, 2, 3])
    loss = answer_mean_loss(logits, labels)
    nll0 = -math.log(math.exp(2) / (math.exp(2) + 3))
    nll1 = math.log(4)
    assert math.isclose(float(loss), (nll0 + nll1) / 2, rel_tol=1e-6)
    token_mean = (nll0 + 3 * nll1) / 4  # what the per-token mean would give: record 1 weighs 3x
    assert not math.isclose(float(loss), token_mean, rel_tol=1e-3)


def test_answer_mean_without_supervised_tokens_is_zero():
    logits = torch.randn((1, 3, 5), requires_grad=True)
    loss = answer_mean_loss(logits, torch.full((1, 3), -100))
    assert float(loss) == 0.0
    loss.backward()  # still a graph


def test_target_maps_centre_and_overlap_cells():
    # 336 px input, 24 x 24 patches -> 12 x 12 tokens of 28 px
    m = target_maps([[20, 20, 60, 40]], (1, 24, 24), grid=336).view(12, 12, 2)
    centre = torch.nonzero(m[..., 0]).tolist()
    overlap = torch.nonzero(m[..., 1]).tolist()
    assert centre == [[1, 1]]  # centre (40, 30): column 40 // 28 = 1, row 30 // 28 = 1
    assert overlap == [
        [r, c] for r in (0, 1) for c in (0, 1, 2)
    ]  # x 20..60 -> cols 0-2, y 20..40 -> rows 0-1
    # a box ending exactly on a cell edge does not spill into the next cell
    edge = target_maps([[0, 0, 28, 28]], (1, 24, 24), grid=336).view(12, 12, 2)
    assert torch.nonzero(edge[..., 1]).tolist() == [[0, 0]]
    assert target_maps([], (1, 24, 24), grid=336).sum() == 0


def test_target_loss_skips_images_without_boxes_and_learns():
    torch.manual_seed(0)
    head = TargetHead(8)
    grid_thw = torch.tensor([[1, 4, 4], [1, 4, 4]])  # 2 images of 2 x 2 tokens, 56 px
    tokens = torch.randn(8, 8)
    # only the first image has known boxes; the second's tokens must not reach the loss
    loss_a = target_loss(head, tokens, grid_thw, [[[0, 0, 20, 20]], None], [56, 56])
    tokens_b = tokens.clone()
    tokens_b[4:] = 100.0
    loss_b = target_loss(head, tokens_b, grid_thw, [[[0, 0, 20, 20]], None], [56, 56])
    assert torch.isclose(loss_a, loss_b)
    assert float(target_loss(head, tokens, grid_thw, [None, None], [56, 56])) == 0.0
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = target_loss(head, tokens, grid_thw, [[[0, 0, 20, 20]], None], [56, 56])
        first = first if first is not None else float(loss)
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_image_probe_reads_the_pooled_tokens():
    from training.objectives import ImageProbe, probe_loss

    torch.manual_seed(0)
    probe = ImageProbe(8, ["BMP2", "T72"])
    grid_thw = torch.tensor([[1, 4, 4], [1, 4, 4], [1, 4, 4]])  # 3 images of 4 tokens
    tokens = torch.randn(12, 8)
    boxes = [[[0, 0, 10, 10], [40, 40, 50, 50]], None, None]  # centres in cells 1 and 9 of a 56 px grid
    classes = [None, "T72", "ZIL131"]  # the third image's class is not a probe class: left out
    loss = probe_loss(probe, tokens, grid_thw, boxes, [56, 56, 56], classes)
    with torch.no_grad():
        out0 = probe(torch.nn.functional.rms_norm(tokens[:4], (8,)).mean(dim=0))
        out1 = probe(torch.nn.functional.rms_norm(tokens[4:8], (8,)).mean(dim=0))
    cells = torch.zeros(9)
    cells[[0, 8]] = 1.0
    expected0 = (
        torch.nn.functional.binary_cross_entropy_with_logits(out0[:9], cells) + (out0[9] - math.log1p(2)) ** 2
    )
    expected1 = torch.nn.functional.cross_entropy(out1[10:][None], torch.tensor([1]))
    assert torch.isclose(loss, (expected0 + expected1) / 2, atol=1e-6)
    # the third image's tokens do not matter
    tokens2 = tokens.clone()
    tokens2[8:] = 5.0
    assert torch.isclose(loss, probe_loss(probe, tokens2, grid_thw, boxes, [56, 56, 56], classes))
    assert float(probe_loss(probe, tokens, grid_thw, [None] * 3, [56] * 3, [None] * 3)) == 0.0


def test_position_bins_are_row_and_column_centres_in_raster_order():
    from training.objectives import POSITION_BINS, position_bins

    assert POSITION_BINS == 32
    # image 0: 4 x 6 patches -> 2 rows x 3 columns of merged tokens; image 1: 2 x 2 patches -> 1 token
    # rows: centres 0.25, 0.75 -> bins 8, 24; columns: 1/6, 1/2, 5/6 -> bins 5, 16, 26
    got = position_bins(torch.tensor([[1, 4, 6], [1, 2, 2]])).tolist()
    assert got == [[8, 5], [8, 16], [8, 26], [24, 5], [24, 16], [24, 26], [16, 16]]
    # a 12 x 12-token image (336 px): 12 distinct bins per axis
    assert len({c for _, c in position_bins(torch.tensor([[1, 24, 24]])).tolist()}) == 12


def test_position_loss_reads_only_the_image_tokens_and_learns():
    from training.objectives import PositionProbe, position_loss

    torch.manual_seed(0)
    image_id = 7
    grid_thw = torch.tensor([[1, 4, 4], [1, 4, 4]])  # 2 images of 2 x 2 tokens
    input_ids = torch.tensor([[1, 7, 7, 7, 7, 2], [7, 7, 7, 7, 3, 0]])
    # hidden states that carry the place: one-hot of the token's index within its image
    hidden = torch.zeros(2, 6, 8)
    hidden[0, 1:5, :4] = torch.eye(4)
    hidden[1, 0:4, :4] = torch.eye(4)
    probe = PositionProbe(8)
    other = hidden.clone()
    other[0, 0] = other[0, 5] = other[1, 4:] = 50.0  # text and padding tokens: not read
    first = position_loss(probe, hidden, input_ids, image_id, grid_thw)
    assert torch.isclose(first, position_loss(probe, other, input_ids, image_id, grid_thw))
    assert 2.5 < float(first.detach()) < 5.0  # about ln 32 before training
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss = position_loss(probe, hidden, input_ids, image_id, grid_thw)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05  # bins 8 / 24 recovered from the one-hot
    with pytest.raises(ValueError, match="8 image tokens but image_grid_thw gives 4"):
        position_loss(probe, hidden, input_ids, image_id, grid_thw[:1])
