"""Backscatter -> the RGB image the model sees (DESIGN 3.2, "Rendering for the model").

One function, :func:`render`, used by inference (tiles from the Zarr store) and by training (labelled
chips), so that the model is served exactly the images it was trained on.

- dB input: each polarisation is mapped linearly from a fixed range to 0..255 and clipped
  (:data:`DB_RANGES`: co-pol VV/HH -25..+5 dB, cross-pol VH/HV -32..-2 dB). NaN (nodata) becomes 0.
- ``dn`` input (uncalibrated 8-bit data such as quick-looks and the MSTAR / SAR-Ship chips): values are
  clipped to 0..255 and kept.
- ``mode="grey"`` (default, what FUSAR-GPT and the demo model were trained on): the first polarisation,
  replicated to 3 channels. ``mode="false-colour"``: R = co-pol, G = cross-pol, B = co/cross ratio
  (co - cross in dB, 0..15 dB); a single-polarisation input falls back to grey.
- The image is resized to ``size`` x ``size`` with bicubic resampling, as the FUSAR-GPT training data was
  (PAPER 1.3): the model's own input size (``image_size`` of its ``tlm_config.json``;
  :data:`MODEL_SIZE` = 504, FUSAR-GPT's: 36 x 36 patches of 14 px = 324 visual tokens, is only the
  default). Boxes answered on that grid are scaled back per axis
  (:func:`fusarbatch.inference.geo.boxes_to_polygons`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

#: Fixed dB display range per polarisation (min, max).
DB_RANGES: dict[str, tuple[float, float]] = {
    "VV": (-25.0, 5.0),
    "HH": (-25.0, 5.0),
    "VH": (-32.0, -2.0),
    "HV": (-32.0, -2.0),
}
RATIO_RANGE_DB = (0.0, 15.0)
MODEL_SIZE = 504
"""FUSAR-GPT's input size, the default of :func:`render`; inference passes the model's own size."""


def _to_byte(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (np.nan_to_num(values.astype(np.float32), nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def render(
    values: np.ndarray,
    pols: Sequence[str],
    *,
    units: Literal["dB", "dn"] = "dB",
    mode: Literal["grey", "false-colour"] = "grey",
    size: int | None = MODEL_SIZE,
) -> Image.Image:
    """Render one tile or chip for the model.

    :param values: ``(pol, y, x)`` float array, backscatter in dB (NaN = nodata) or 8-bit-range DN; a 2-D
        ``(y, x)`` array is taken as one polarisation.
    :param pols: polarisation names in the order of ``values`` (``VV``, ``VH``, ``HH``, ``HV``).
    :param units: ``dB`` (fixed ranges, :data:`DB_RANGES`) or ``dn`` (clipped to 0..255).
    :param mode: ``grey`` (first polarisation on 3 channels) or ``false-colour`` (co, cross, ratio).
    :param size: output edge in pixels (bicubic resize); ``None`` keeps the input size.
    :returns: an RGB ``PIL.Image`` of ``size`` x ``size`` (uint8).
    :raises ValueError: ``values`` and ``pols`` disagree, or an unknown polarisation in dB mode.
    """
    arr = np.asarray(values)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != len(pols) or arr.shape[0] == 0:
        raise ValueError(f"values of shape {arr.shape} do not match polarisations {list(pols)}")
    pols = [p.upper() for p in pols]

    def channel(i: int) -> np.ndarray:
        if units == "dn":
            return _to_byte(arr[i], 0.0, 255.0)
        if pols[i] not in DB_RANGES:
            raise ValueError(
                f"no dB display range for polarisation {pols[i]!r}; expected one of {list(DB_RANGES)}"
            )
        return _to_byte(arr[i], *DB_RANGES[pols[i]])

    co = next((i for i, p in enumerate(pols) if p in ("VV", "HH")), 0)
    cross = next((i for i, p in enumerate(pols) if p in ("VH", "HV")), None)
    if mode == "false-colour" and cross is not None and cross != co:
        ratio = arr[co].astype(np.float32) - arr[cross].astype(np.float32)
        rgb = np.stack([channel(co), channel(cross), _to_byte(ratio, *RATIO_RANGE_DB)], axis=-1)
    else:
        grey = channel(co)
        rgb = np.stack([grey, grey, grey], axis=-1)
    image = Image.fromarray(rgb, mode="RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image
