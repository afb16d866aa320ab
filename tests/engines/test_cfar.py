"""The CA-CFAR detector (fusarbatch.engines.cfar) on GENERATED speckle with targets at known pixels, and on
the committed real ship chips (tests/data/ship_chips)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusarbatch.engines.cfar import (
    CHIP_PARAMS,
    SCORE_HALF,
    CfarParams,
    cfar_statistic,
    db_to_linear,
    detect,
    detect_chip,
    image_to_linear,
    metres_to_window,
    score_of,
)
from fusarbatch.model.prompts import Box
from training.builders import read_voc
from training.metrics import detection_metrics

CHIPS = Path(__file__).resolve().parents[1] / "data" / "ship_chips"
LOOKS = 4.4  # equivalent number of looks of Sentinel-1 IW GRD
#: Windows for the generated targets (at most 30 px long): the guard window is twice the longest target,
#: so that no target pixel falls in the background of another pixel of the same target.
SMALL = CfarParams(guard=61, background=121, k=5.0, prefilter=3, min_area=20, open_size=3, close_size=3)


def generated_speckle(shape: tuple[int, int], seed: int, looks: float = LOOKS) -> np.ndarray:
    """Fully developed speckle of ``looks`` looks: gamma(L, 1/L) intensity, mean 1 (generated)."""
    return np.random.default_rng(seed).gamma(looks, 1.0 / looks, shape)


#: Generated targets (row0, row1, col0, col1), end-exclusive, 40x the sea's mean intensity, further apart
#: than the background window so no target sits in another's background.
TARGETS = [(40, 52, 60, 90), (250, 260, 300, 310), (300, 330, 60, 66)]


def generated_scene_with_targets(seed: int = 1) -> np.ndarray:
    img = generated_speckle((400, 400), seed)
    for r0, r1, c0, c1 in TARGETS:
        img[r0:r1, c0:c1] *= 40.0
    return img


def test_generated_targets_found_at_their_pixels():
    boxes = detect(generated_scene_with_targets(), SMALL)
    # a target's box is its pixels grown by the pre-filter radius (1 px): the 3 x 3 mean of a pixel next
    # to a target holds target pixels (module docstring)
    expected = {(c0 - 1.0, r0 - 1.0, c1 + 1.0, r1 + 1.0) for r0, r1, c0, c1 in TARGETS}
    assert {(b.x1, b.y1, b.x2, b.y2) for b in boxes} == expected
    assert len(boxes) == len(TARGETS)  # the count is the number of boxes
    for b in boxes:
        assert b.t_max > SMALL.k and 0 < b.score < 1 and b.score == score_of(b.t_max)
        # the component fills its box but for corners (a corner's 3 x 3 mean holds one target pixel)
        assert 0.95 * (b.x2 - b.x1) * (b.y2 - b.y1) <= b.area <= (b.x2 - b.x1) * (b.y2 - b.y1)
    assert [b.score for b in boxes] == sorted((b.score for b in boxes), reverse=True)


def test_statistic_equals_the_ring_mean_and_std_computed_directly():
    """Box-sum statistic == (x - mean) / std over the ring pixels, by brute force, also where the ring is
    cut by the image edge and by nodata."""
    img = generated_scene_with_targets(seed=2)
    img[:, :25] = np.nan
    p = dataclasses.replace(SMALL, guard=11, background=31)
    t = cfar_statistic(img, p)
    valid = np.isfinite(img)
    pad = np.pad(np.where(valid, img, 0.0), 1)
    n = np.pad(valid.astype(float), 1)
    smooth = np.full(img.shape, np.nan)
    for r in range(img.shape[0]):  # 3 x 3 mean of the valid pixels
        for c in range(img.shape[1]):
            if valid[r, c]:
                smooth[r, c] = pad[r : r + 3, c : c + 3].sum() / n[r : r + 3, c : c + 3].sum()
    for r, c in [(150, 150), (5, 40), (399, 399), (100, 26), (45, 70), (0, 150)]:
        rr, cc = np.mgrid[r - 15 : r + 16, c - 15 : c + 16]
        ring = (np.maximum(abs(rr - r), abs(cc - c)) > 5) & (rr >= 0) & (cc >= 0) & (rr < 400) & (cc < 400)
        values = smooth[rr[ring], cc[ring]]
        values = values[np.isfinite(values)]
        want = (smooth[r, c] - values.mean()) / values.std()
        assert t[r, c] == pytest.approx(want, rel=1e-7), (r, c)
    assert np.isnan(t[:, :25]).all()  # nodata is never tested


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_detection_on_generated_speckle_at_the_default_k(seed):
    """Pure 4.4-look speckle (a 504 x 504 tile): the statistic exceeds the default k on a bounded share of
    pixels (for the 3 x 3 mean of 4.4-look speckle, a gamma(39.6) variable, the share above
    mean + 4 std is about 1e-4), and those never form an object."""
    img = generated_speckle((504, 504), seed)
    t = cfar_statistic(img, CHIP_PARAMS)
    assert np.isfinite(t).all()
    assert np.mean(t > CHIP_PARAMS.k) < 1e-3
    assert detect(img, CHIP_PARAMS) == []
    assert detect(img, SMALL) == []


def test_nodata_is_never_detected_and_not_in_any_background():
    img = generated_scene_with_targets()
    img[:, 340:] = np.nan  # nodata strip (e.g. past the swath edge)
    img[360:, :] = -1.0  # negative intensity is nodata too
    bright = np.zeros(img.shape, bool)
    bright[150:170, 150:170] = True
    img[bright] = 1e6  # a bright patch masked out by the valid mask
    boxes = detect(img, SMALL, valid=~bright)
    got = {(b.x1, b.y1, b.x2, b.y2) for b in boxes}
    # every target found as without nodata, beside it too (target 2 is 30 px from the strip)
    assert got == {(c0 - 1.0, r0 - 1.0, c1 + 1.0, r1 + 1.0) for r0, r1, c0, c1 in TARGETS}
    t = cfar_statistic(img, SMALL, valid=~bright)
    assert np.isnan(t[:, 340:]).all() and np.isnan(t[360:, :]).all() and np.isnan(t[bright]).all()
    # the masked bright patch is in no background: the statistic beside it is as without the patch
    clean = generated_scene_with_targets()
    clean[:, 340:] = np.nan
    clean[360:, :] = -1.0
    t_clean = cfar_statistic(clean, SMALL, valid=~bright)
    np.testing.assert_allclose(t, t_clean, rtol=1e-9, equal_nan=True)
    # an image that is all nodata: nothing, no warning
    assert detect(np.full((64, 64), np.nan), SMALL) == []


def test_conversions_and_window_sizes():
    np.testing.assert_allclose(db_to_linear(np.array([0.0, 10.0, -10.0, -20.0])), [1.0, 10.0, 0.1, 0.01])
    assert np.isnan(db_to_linear(np.array([np.nan]))).all()
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(image_to_linear(grey), grey.astype(float))
    rgb = np.stack([grey] * 3, axis=-1)
    np.testing.assert_allclose(image_to_linear(rgb), grey, rtol=1e-12)
    np.testing.assert_array_equal(image_to_linear(Image.fromarray(rgb)), grey)
    with pytest.raises(ValueError, match="expected"):
        image_to_linear(np.zeros((2, 2, 2, 2)))
    assert metres_to_window(800, 10.0) == 81  # 80 px -> the next odd size
    assert metres_to_window(790, 10.0) == 79
    assert metres_to_window(800, 10.002) == 81
    assert metres_to_window(5, 10.0) == 1
    assert metres_to_window(5, 10.0, minimum=83) == 83
    with pytest.raises(ValueError):
        metres_to_window(-1, 10.0)
    assert score_of(SCORE_HALF) == 0.5 and score_of(0) == 0.0 and score_of(float("inf")) == 1.0
    assert score_of(3) < score_of(30) < score_of(300) < 1.0
    with pytest.raises(ValueError, match="odd"):
        CfarParams(guard=40)
    with pytest.raises(ValueError, match="larger"):
        CfarParams(guard=121, background=121)


def test_chip_rendered_to_the_model_grid_gives_boxes_on_that_grid():
    """detect_chip(native_size=...) on a generated chip rendered to 504 x 504 (as eval reads records)
    finds the targets where they are on the grid."""
    img = generated_speckle((330, 480), seed=5)
    targets = [(60, 80, 100, 160), (200, 230, 300, 320)]  # (row0, row1, col0, col1)
    for r0, r1, c0, c1 in targets:
        img[r0:r1, c0:c1] *= 40.0
    grey = np.clip(img * 20.0, 0, 255).astype(np.uint8)
    rendered = Image.fromarray(grey).convert("RGB").resize((504, 504), Image.Resampling.BICUBIC)
    params = dataclasses.replace(SMALL, min_area=80)
    boxes = detect_chip(rendered, params, native_size=(480, 330))
    truth = [
        Box("ship", c0 * 504 / 480, r0 * 504 / 330, c1 * 504 / 480, r1 * 504 / 330)
        for r0, r1, c0, c1 in targets
    ]
    preds = [Box("ship", b.x1, b.y1, b.x2, b.y2) for b in boxes]
    m = detection_metrics([preds], [truth], (0.7,), 504)["iou_0.7"]["overall"]
    assert (m["tp"], m["fp"], m["fn"]) == (2, 0, 0)
    # the same chip at its own size: the same boxes, scaled
    native = detect_chip(grey, params)
    assert len(native) == 2


def test_real_ship_chips_find_labelled_ships():
    """The committed real SAR chips (SAR-Ship-Dataset, 256 x 256, 7 labelled ships) with the chip
    parameters tuned on SSDD train: every box on the Gaofen-3 chip (4 ships, calm sea) and on the
    Sentinel-1 VV chip (2 ships) is a ship found at IoU 0.5; the Sentinel-1 HH chip (bright sea clutter)
    gives false alarms and its ship is missed."""
    counts = {}
    for xml in sorted(CHIPS.glob("*.xml")):
        _, _, boxes = read_voc(xml)
        truth = [Box("ship", b.x1, b.y1, b.x2, b.y2) for b in boxes]
        found = detect_chip(Image.open(xml.with_suffix(".jpg")))
        assert all(0 <= b.x1 < b.x2 <= 256 and 0 <= b.y1 < b.y2 <= 256 for b in found)
        preds = [Box("ship", b.x1, b.y1, b.x2, b.y2) for b in found]
        m = detection_metrics([preds], [truth], (0.5,), 256)["iou_0.5"]["overall"]
        counts[xml.stem.split("_0")[0]] = (m["tp"], m["fp"], m["fn"])
    assert counts["Gao_ship_hh"] == (4, 0, 0)
    assert counts["Sen_ship_vv"][0] >= 1 and counts["Sen_ship_vv"][1] == 0
    assert sum(tp for tp, _, _ in counts.values()) >= 5
