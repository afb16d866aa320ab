"""Two-parameter cell-averaging CFAR ship detector on linear intensity (issue 9, "A CFAR engine").

The detector of Crisp, "The state-of-the-art in ship detection in synthetic aperture radar imagery",
DSTO-RR-0272 (2004), section 5.2.1 (the "two-parameter CFAR"), in its cell-averaging form:

1. **Pre-filter.** The intensity is smoothed with a ``prefilter`` x ``prefilter`` mean (nodata left out of
   each mean), which lowers the speckle variance of the cell under test. Everything below runs on the
   smoothed image ``x``.
2. **Background statistics.** Around each pixel, the *background ring* is the ``background`` x
   ``background`` window minus the ``guard`` x ``guard`` window (both square, centred, odd edges); the guard
   window keeps the target itself out of its own background. ``mu_b`` and ``sigma_b`` are the mean and
   the standard deviation of the valid ``x`` over the ring, from box sums of ``x``, ``x**2`` and the
   valid mask (:func:`scipy.ndimage.uniform_filter`: running sums, the integral-image method, O(1) per
   pixel whatever the window size). Windows are truncated at the image edge; a pixel is tested only
   when at least ``min_background`` of its full ring is valid image.
3. **Test.** ``t = (x - mu_b) / sigma_b``; a pixel is a detection when ``t > k`` (Crisp, eq. 5.5).
   Nodata pixels are never detections and never count in any background.
4. **Clean-up and objects.** Binary opening (``open_size``, removes isolated speckle spikes), then closing
   (``close_size``, joins the broken returns of one ship) with square structuring elements; 8-connected
   components (:func:`scipy.ndimage.label`); components with fewer than ``min_area`` pixels dropped.
5. **Boxes and scores.** A box is its component's bounding box on pixel edges: a component covering
   columns ``c0..c1`` and rows ``r0..r1`` (inclusive) gives ``x1 = c0, x2 = c1 + 1, y1 = r0, y2 = r1 + 1``
   in the input's pixel coordinates (origin at the top-left corner of the top-left pixel). Its score is
   ``t_max / (t_max + SCORE_HALF)``, with ``t_max`` the largest CFAR statistic over the component's
   pixels (nodata excluded): monotone in ``t_max``, in [0, 1), 0.5 at ``t_max = SCORE_HALF``, and
   independent of ``k``, so scores compare across thresholds, tiles and scenes.

Two consequences of the method, both visible in the tests: a strong target's box is its pixels grown by
the pre-filter radius (``prefilter // 2`` px on each side: the mean around a pixel next to the target holds
target pixels); and the guard window must be about twice the longest target, or the far end of a target
falls in the background of its other end, raises ``sigma_b`` there and is cut off (Crisp, section 5.2.1).

The counts of a tile are the number of its boxes. Inputs are *linear intensity* (power), not dB and not
amplitude: :func:`db_to_linear` for calibrated dB tiles, :func:`image_to_linear` for 8-bit image chips.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "CHIP_PARAMS",
    "SCORE_HALF",
    "CfarBox",
    "CfarParams",
    "boxes_from_statistic",
    "cfar_statistic",
    "db_to_linear",
    "detect",
    "detect_chip",
    "image_to_linear",
    "metres_to_window",
    "score_of",
]

SCORE_HALF = 20.0
"""The CFAR statistic at which a box scores 0.5 (:func:`score_of`)."""


@dataclass(frozen=True)
class CfarParams:
    """Parameters of :func:`detect` (module docstring); every size is in pixels of the input.

    Defaults: the reference configuration measured on SSDD (guard 61 px, background 121 px, k = 6, 3 x 3
    mean pre-filter, 3 x 3 opening and closing, 20 px minimum area).
    """

    guard: int = 61
    """Guard window edge, pixels (odd, >= 1)."""
    background: int = 121
    """Background window edge, pixels (odd, > guard)."""
    k: float = 6.0
    """Threshold on the CFAR statistic ``(x - mu_b) / sigma_b``."""
    prefilter: int = 3
    """Mean pre-filter edge, pixels (1: none)."""
    min_area: int = 20
    """Smallest component kept, pixels (after opening and closing)."""
    open_size: int = 3
    """Binary opening structuring element edge, pixels (0 or 1: none)."""
    close_size: int = 3
    """Binary closing structuring element edge, pixels (0 or 1: none)."""
    min_background: float = 0.1
    """Smallest share of the full background ring that must be valid image for a pixel to be tested."""

    def __post_init__(self) -> None:
        for name in ("guard", "background", "prefilter"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v < 1 or v % 2 == 0:
                raise ValueError(f"CfarParams.{name}={v!r}: give an odd number of pixels >= 1")
        if self.background <= self.guard:
            raise ValueError(
                f"CfarParams: background window {self.background} px must be larger than the guard "
                f"window {self.guard} px"
            )
        if not math.isfinite(self.k):
            raise ValueError(f"CfarParams.k={self.k!r}: give a finite threshold")
        for name in ("min_area", "open_size", "close_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"CfarParams.{name}={getattr(self, name)!r}: give a number >= 0")
        if not 0.0 < self.min_background <= 1.0:
            raise ValueError(f"CfarParams.min_background={self.min_background!r}: give a share in (0, 1]")


CHIP_PARAMS = CfarParams()
"""The parameters for image chips (``eval``, :func:`detect_chip`), tuned on the SSDD train split
(benchmarks/cfar_ssdd.py; results in benchmarks/RESULTS.md, "CFAR on SSDD")."""


@dataclass(frozen=True)
class CfarBox:
    """One detection: bounding box on pixel edges (input pixel coordinates, origin top-left, x to the
    right = columns, y down = rows) and its score in [0, 1) (module docstring)."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    t_max: float
    """The largest CFAR statistic over the component."""
    area: int
    """Pixels in the component (after opening and closing)."""

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


def db_to_linear(db: np.ndarray) -> np.ndarray:
    """Backscatter in dB -> linear intensity, ``10 ** (dB / 10)`` (float64; NaN stays NaN).

    :param db: any shape, dB (e.g. sigma0 in dB of a calibrated tile).
    """
    return np.power(10.0, np.asarray(db, dtype=np.float64) / 10.0)


def image_to_linear(image: object) -> np.ndarray:
    """8-bit image chip -> the intensity the CFAR runs on: the grey value itself (float64, ``(y, x)``).

    What the grey values of SAR image chips are (SSDD, SAR-Ship-Dataset JPEGs) is not documented: a
    stretched amplitude or intensity, clipped to 8 bits. The choice is measured: on the SSDD train split,
    with the same parameters, the grey value taken as intensity scores F1 0.49 at IoU 0.5, its square
    (value taken as amplitude) 0.43 (``benchmarks/cfar_ssdd.py``; benchmarks/RESULTS.md, "CFAR on
    SSDD"). The CFAR statistic is scale-invariant, so no calibration constant is needed. A colour input
    (grey stored as RGB) is converted to luma first as PIL's ``convert("L")`` does (ITU-R 601:
    0.299 R + 0.587 G + 0.114 B).

    :param image: a PIL image, or a ``(y, x)`` or ``(y, x, 3|4)`` array (uint8 or float, NaN = nodata).
    :raises ValueError: any other shape.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64)
    values = np.asarray(image, dtype=np.float64)
    if values.ndim == 3 and values.shape[2] in (3, 4):
        return values[..., 0] * 0.299 + values[..., 1] * 0.587 + values[..., 2] * 0.114
    if values.ndim != 2:
        raise ValueError(f"image of shape {values.shape}: expected (y, x) or (y, x, 3)")
    return values


def metres_to_window(metres: float, pixel_size_m: float, *, minimum: int = 1) -> int:
    """A window edge in metres -> the nearest odd number of pixels (at least ``minimum``, made odd).

    :param metres: window edge, metres (> 0).
    :param pixel_size_m: ground size of one pixel, metres (> 0); for non-square pixels pass their
        geometric mean.
    :raises ValueError: non-positive or non-finite inputs.
    """
    if not (math.isfinite(metres) and metres > 0 and math.isfinite(pixel_size_m) and pixel_size_m > 0):
        raise ValueError(f"window {metres!r} m at {pixel_size_m!r} m/px: give positive finite values")
    n = max(int(minimum), round(metres / pixel_size_m))
    return n if n % 2 == 1 else n + 1


def score_of(t_max: float) -> float:
    """Score of a box from its largest CFAR statistic: ``t / (t + SCORE_HALF)`` for ``t > 0``, else 0."""
    t = float(t_max)
    if not t > 0:
        return 0.0
    if math.isinf(t):
        return 1.0
    return t / (t + SCORE_HALF)


def _box_sum(values: np.ndarray, size: int) -> np.ndarray:
    """Sum of ``values`` over the ``size`` x ``size`` window centred on each pixel (zeros outside)."""
    if size == 1:
        return values.copy()
    return ndimage.uniform_filter(values, size=size, mode="constant", cval=0.0) * float(size * size)


def cfar_statistic(
    intensity: np.ndarray, params: CfarParams = CfarParams(), *, valid: np.ndarray | None = None
) -> np.ndarray:
    """The CFAR statistic ``t = (x - mu_b) / sigma_b`` per pixel (module docstring, steps 1-3).

    :param intensity: ``(y, x)`` linear intensity (any real dtype); NaN, +-inf and negative values are
        nodata.
    :param valid: optional ``(y, x)`` bool mask of valid pixels, combined with the above.
    :returns: ``(y, x)`` float64; NaN where the pixel is nodata, where its background has fewer valid
        pixels than ``params.min_background`` of the ring, or where ``sigma_b`` is 0.
    :raises ValueError: ``intensity`` is not 2-D, or ``valid`` has another shape.
    """
    arr, ok = _checked(intensity, valid)
    w = ok.astype(np.float64)
    x0 = np.where(ok, arr, 0.0)
    if params.prefilter > 1:  # normalised convolution: the mean of the valid pixels of each window
        n = _box_sum(w, params.prefilter)
        with np.errstate(invalid="ignore", divide="ignore"):
            x0 = np.where(ok, _box_sum(x0, params.prefilter) / n, 0.0)
    # ring sums = background window sums - guard window sums
    n_b = _box_sum(w, params.background) - _box_sum(w, params.guard)
    s1 = _box_sum(x0, params.background) - _box_sum(x0, params.guard)
    s2 = _box_sum(x0 * x0, params.background) - _box_sum(x0 * x0, params.guard)
    ring = params.background**2 - params.guard**2
    n_b = np.rint(n_b)  # counts are integers; the running sums leave ~1e-12 residues
    tested = ok & (n_b >= max(2.0, params.min_background * ring))
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = s1 / n_b
        var = np.maximum(s2 / n_b - mu * mu, 0.0)
        sigma = np.sqrt(var)
        t = (x0 - mu) / sigma
    # a zero sigma (a constant background) or cancellation noise at its level gives no decision
    tested &= sigma > 1e-12 * np.maximum(np.abs(mu), 1e-300)
    return np.where(tested, t, np.nan)


def _checked(intensity: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``intensity`` as float64 and its valid mask (finite, >= 0, and ``valid``)."""
    arr = np.asarray(intensity, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"intensity of shape {arr.shape}: expected a 2-D (y, x) array")
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(arr) & (arr >= 0)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != arr.shape:
            raise ValueError(f"valid mask of shape {valid.shape} for an image of shape {arr.shape}")
        ok &= valid
    return arr, ok


def _square(size: int) -> np.ndarray | None:
    return np.ones((size, size), bool) if size > 1 else None


def detect(
    intensity: np.ndarray, params: CfarParams = CfarParams(), *, valid: np.ndarray | None = None
) -> list[CfarBox]:
    """Detect bright targets in one image: two-parameter CA-CFAR, clean-up, components, boxes and scores
    (module docstring).

    :param intensity: ``(y, x)`` linear intensity (:func:`db_to_linear`, :func:`image_to_linear`); NaN,
        +-inf and negative values are nodata: never detected, never part of a background.
    :param params: :class:`CfarParams` (window sizes in pixels of ``intensity``).
    :param valid: optional ``(y, x)`` bool mask of valid pixels.
    :returns: the boxes in input pixel coordinates (pixel edges), sorted by decreasing score, then by
        position (y1, x1).
    :raises ValueError: ``intensity`` is not 2-D, or ``valid`` has another shape.
    """
    arr, ok = _checked(intensity, valid)
    return boxes_from_statistic(cfar_statistic(arr, params, valid=ok), params, valid=ok)


def boxes_from_statistic(
    t: np.ndarray, params: CfarParams = CfarParams(), *, valid: np.ndarray | None = None
) -> list[CfarBox]:
    """Steps 3-5 of the module docstring on a statistic made by :func:`cfar_statistic`: threshold at
    ``params.k``, opening, closing, components, boxes and scores. Lets a caller try several thresholds
    (or morphology settings) on one statistic; :func:`detect` is ``cfar_statistic`` then this.

    :param t: ``(y, x)`` CFAR statistic, NaN = not tested.
    :param valid: ``(y, x)`` bool mask of valid pixels (closing never grows into the others); default:
        the pixels where ``t`` is not NaN.
    :returns: as :func:`detect`.
    """
    t = np.asarray(t, dtype=np.float64)
    ok = ~np.isnan(t) if valid is None else np.asarray(valid, dtype=bool)
    hit = np.nan_to_num(t, nan=-np.inf) > params.k
    if params.open_size > 1:
        hit = ndimage.binary_opening(hit, structure=_square(params.open_size))
    if params.close_size > 1:
        # border_value=0 with padding: closing must not grow detections out of the image edge
        pad = params.close_size
        closed = ndimage.binary_closing(np.pad(hit, pad), structure=_square(params.close_size))
        hit = closed[pad:-pad, pad:-pad]
    hit &= ok  # closing never reaches into nodata
    labels, n = ndimage.label(hit, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    t_max = ndimage.maximum(np.nan_to_num(t, nan=-np.inf), labels, index)
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None or areas[i] < params.min_area:
            continue
        rows, cols = sl
        tm = float(t_max[i])
        boxes.append(
            CfarBox(
                x1=float(cols.start),
                y1=float(rows.start),
                x2=float(cols.stop),
                y2=float(rows.stop),
                score=score_of(tm),
                t_max=tm,
                area=int(areas[i]),
            )
        )
    boxes.sort(key=lambda b: (-b.score, b.y1, b.x1))
    return boxes


def detect_chip(
    image: object, params: CfarParams = CHIP_PARAMS, *, native_size: tuple[int, int] | None = None
) -> list[CfarBox]:
    """Detect ships in an 8-bit image chip: :func:`image_to_linear`, then :func:`detect` with ``params``
    (window sizes in pixels of the chip at its own size).

    ``fusarbatch eval`` reads chips rendered to the model's square grid (504 x 504, bicubic), which
    stretches them (an SSDD chip of about 480 x 330 px by 1.05 x 1.5) and correlates neighbouring speckle
    samples: CFAR run on that image loses about 0.08 F1 on SSDD train. Give the chip's own size as
    ``native_size`` and the image is resampled back to it (bicubic) before detection, which recovers the
    score of the original chip (within 0.01 F1 on SSDD train); the boxes are then scaled back per axis.

    :param image: a PIL image or a ``(y, x)`` / ``(y, x, 3)`` array.
    :param native_size: ``(width, height)`` of the chip before it was rendered, pixels (a record's
        ``meta["width"]``, ``meta["height"]``); None: ``image`` is at its own size.
    :returns: boxes in ``image`` pixel coordinates (pixel edges), sorted by decreasing score.
    """
    from PIL import Image

    if native_size is None:
        return detect(image_to_linear(image), params)
    width, height = (int(v) for v in native_size)
    if width < 1 or height < 1:
        raise ValueError(f"native_size {native_size!r}: give (width, height) in pixels")
    if isinstance(image, Image.Image):
        pil = image if image.mode in ("L", "F") else image.convert("L")
    else:  # float image of the grey values (NaN, nodata, stays NaN around its area)
        pil = Image.fromarray(image_to_linear(image).astype(np.float32), mode="F")
    if pil.size == (width, height):
        return detect(image_to_linear(pil), params)
    sx, sy = pil.size[0] / width, pil.size[1] / height
    boxes = detect(image_to_linear(pil.resize((width, height), Image.Resampling.BICUBIC)), params)
    return [dataclasses.replace(b, x1=b.x1 * sx, y1=b.y1 * sy, x2=b.x2 * sx, y2=b.y2 * sy) for b in boxes]
