"""The one rendering function shared by training and inference."""

import numpy as np
import pytest

from fusarbatch.render import render


def test_db_ranges_map_linearly_and_nan_is_black():
    vv = np.array([[-25.0, -10.0, 5.0, np.nan, 20.0, -40.0]], np.float32)
    img = np.asarray(render(vv, ["VV"], size=None))
    assert img.shape == (1, 6, 3)
    assert list(img[0, :, 0]) == [0, 128, 255, 0, 255, 0]
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_false_colour_uses_co_cross_and_ratio():
    arr = np.stack([np.full((4, 4), -10.0), np.full((4, 4), -17.0)]).astype(np.float32)
    img = np.asarray(render(arr, ["VV", "VH"], mode="false-colour", size=None))
    # VV -10 -> 127.5 -> 128; VH -17 -> (15/30)*255 = 127.5 -> 128; ratio 7 dB -> 7/15*255 = 119
    assert tuple(img[0, 0]) == (128, 128, 119)
    grey = np.asarray(render(arr, ["VV", "VH"], size=None))
    assert tuple(grey[0, 0]) == (128, 128, 128)


def test_dn_mode_keeps_bytes_and_resizes_to_model_grid():
    chip = np.arange(128 * 128, dtype=np.float32).reshape(128, 128) % 256
    img = render(chip, ["VV"], units="dn")
    assert img.size == (504, 504) and img.mode == "RGB"
    small = np.asarray(render(chip, ["VV"], units="dn", size=None))
    assert (small[..., 0] == chip.astype(np.uint8)).all()


def test_mismatched_pols_raise():
    with pytest.raises(ValueError, match="polarisations"):
        render(np.zeros((2, 4, 4)), ["VV"])
    with pytest.raises(ValueError, match="display range"):
        render(np.zeros((1, 4, 4)), ["XX"])
