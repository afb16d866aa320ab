"""Backscatter scaling (DESIGN 3.2): asset values -> decibels, with every invalid value as NaN.

Sentinel-1 backscatter comes as linear intensity ("power": sigma0, gamma0, beta0), as linear amplitude
(DN-like ``sqrt(power)``, e.g. GRD digital numbers after calibration to amplitude), or already in decibels.
The conversions are the standard ones (ESA, *Sentinel-1 Level 1 Detailed Algorithm Definition*,
ESA-EOPG-CSCOP-TN-0004, and the SNAP ``LinearToFromdB`` operator):

- ``power``:     ``sigma0_dB = 10 * log10(sigma0)``
- ``amplitude``: ``sigma0_dB = 20 * log10(A)``  (since ``sigma0 = A**2``)
- ``db``:        kept.
- ``dn``:        kept as they are: uncalibrated display values (e.g. 8-bit quick-looks); the tile store
  records ``units = "dn"`` so nothing downstream mistakes them for decibels.

Invalid values become NaN: NaN and +-inf always, and ``x <= 0`` for ``power`` and ``amplitude`` (no
logarithm). Nodata values are masked by the reader (:mod:`fusarbatch.tiling.source`) before this step.
In ``db`` and ``dn`` negative values are valid (``-15 dB`` is typical).

Before that, :func:`prepare_radiometry` settles what the values are: the declared scale (catalog or item),
else the scale :func:`detect_scale` infers from the data (recorded with its reason), and for digital numbers
of a calibrated quantity (sigma0/beta0/gamma0) the calibration of :mod:`fusarbatch.tiling.calibration`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import dask.array as da
import numpy as np

from fusarbatch.errors import SceneError

if TYPE_CHECKING:
    from fusarbatch.catalog.scene import Scene
    from fusarbatch.tiling.source import SourceRaster

log = logging.getLogger(__name__)

Scale = Literal["db", "power", "amplitude", "dn"]
#: Scales that :func:`to_db` accepts.
SCALES: tuple[str, ...] = ("db", "power", "amplitude", "dn")
_FACTOR = {"power": np.float32(10.0), "amplitude": np.float32(20.0)}

ArrayT = TypeVar("ArrayT", np.ndarray, da.Array)


def check_scale(scale: str) -> str:
    """Return ``scale`` lower-cased if it is one of :data:`SCALES`.

    :raises ValueError: an unknown scale (the message lists the known ones).
    """
    value = str(scale).lower()
    if value not in SCALES:
        raise ValueError(f"unknown backscatter scale {scale!r}; expected one of {', '.join(SCALES)}")
    return value


def output_units(scale: str) -> str:
    """Units of :func:`to_db`'s output for an input ``scale``: ``"dn"`` for ``dn``, else ``"dB"``."""
    return "dn" if check_scale(scale) == "dn" else "dB"


def to_db(values: ArrayT, scale: str, *, overwrite: bool = False) -> ArrayT:
    """Convert backscatter to decibels (float32), invalid values to NaN; see the module docstring.

    :param values: any shape, any real dtype; a numpy array or a dask array (converted lazily, block by
        block, without changing the chunks).
    :param scale: ``db``, ``power``, ``amplitude`` or ``dn``.
    :param overwrite: allow writing the result into the input's memory when it is a writeable float32
        array (or, for a dask array, into each block): only for data nothing else uses, such as the fresh
        blocks of a reader. Saves a copy per block.
    :returns: float32 array of the same shape (and chunks): dB, or the unchanged values for ``dn``.
    :raises ValueError: unknown ``scale``.
    """
    scale = check_scale(scale)
    if isinstance(values, da.Array):
        return values.map_blocks(_to_db_block, scale=scale, overwrite=overwrite, dtype=np.float32)
    return _to_db_block(np.asarray(values), scale, overwrite)


def _to_db_block(block: np.ndarray, scale: str, overwrite: bool = False) -> np.ndarray:
    reuse = overwrite and block.dtype == np.float32 and block.flags.writeable
    x = block if reuse else np.array(block, dtype=np.float32, copy=True)
    if scale in _FACTOR:
        invalid = ~(x > 0)  # NaN compares False, so NaN is invalid too
        invalid |= np.isinf(x)
        np.log10(x, out=x, where=~invalid)
        x *= _FACTOR[scale]
        x[invalid] = np.nan
        return x
    # db / dn: +-inf -> NaN (NaN stays NaN)
    np.copyto(x, np.float32(np.nan), where=np.isinf(x))
    return x


# ---------------------------------------------------------------------------------- undeclared scales

#: dB: at least this share of the values is negative (sigma0/gamma0 of a scene lies mostly in
#: [-35, +10] dB, below 0 dB: water about -20, fields about -10, towns up to +10).
DB_MIN_NEGATIVE = 0.25
#: dB: the median lies in this range (dB).
DB_MEDIAN_RANGE = (-50.0, 10.0)
#: Linear power: at most this share of the values is negative (thermal-noise subtraction leaves a few).
POWER_MAX_NEGATIVE = 0.05
#: Linear power: the median lies in (0, this] (sigma0 0.001-1: -30 to 0 dB), the 99th percentile below
#: :data:`POWER_MAX_P99` (bright targets reach 10-100).
POWER_MAX_MEDIAN = 1.0
POWER_MAX_P99 = 1000.0
#: Digital numbers: integer rasters with no negative value and a median of at least this.
DN_MIN_MEDIAN = 2.0
#: Fewer valid sampled values than this: too few to tell (the scene is taken as dB, nothing to convert).
MIN_VALUES = 100


def detect_scale(values: np.ndarray, dtypes: tuple[str, ...], *, what: str) -> tuple[str, str]:
    """The scale of backscatter whose catalog and item do not say it, from the values themselves.

    Statistics, per polarisation, over the finite sampled values (``SourceRaster.sample``: 9 windows of
    256 x 256 px spread over the scene): the share of negative values, the median and the 99th percentile;
    and the raster's data type. Rules, in order:

    - **db**: at least :data:`DB_MIN_NEGATIVE` (25 %) negative and the median within
      :data:`DB_MEDIAN_RANGE` (-50..+10 dB): sigma0/gamma0 in dB lies mostly in [-35, +10] dB.
    - **dn** (digital numbers): an integer raster, no negative value, median >= :data:`DN_MIN_MEDIAN`
      (GRD DN are uint16 amplitudes of about 50-500; ``20*log10`` of them would be 40-55 "dB").
    - **power** (linear intensity): a float raster, at most :data:`POWER_MAX_NEGATIVE` (5 %) negative,
      median in (0, :data:`POWER_MAX_MEDIAN`] and 99th percentile <= :data:`POWER_MAX_P99` (linear sigma0
      is mostly 0.001-1). Linear amplitude (sqrt of power) has the same signature: taken as power, and the
      reason says so.
    - anything else (e.g. float amplitudes or DN above 1, integer-coded dB): no guess.

    Polarisations must agree. Fewer than :data:`MIN_VALUES` valid values: ``db`` (nothing to convert).

    :param values: ``(pol, N)`` float, NaN = nodata.
    :param dtypes: data type of each polarisation's raster (``uint16``, ``float32``...).
    :param what: the item, for messages.
    :returns: ``(scale, reason)``, the reason one line with the statistics.
    :raises SceneError: no rule fits, or the polarisations disagree; the message names ``what`` and the
        fix (set ``scale`` in the catalog TOML).
    """
    fix = "set `scale` (db, power, amplitude or dn) in the catalog TOML, or `fusarbatch:scale` in the item"
    found: list[tuple[str, str]] = []
    for band, dtype in zip(np.asarray(values), dtypes, strict=True):
        v = band[np.isfinite(band)].astype(np.float64)
        if v.size < MIN_VALUES:
            continue
        neg = float(np.mean(v < 0))
        p50, p99 = (float(x) for x in np.percentile(v, [50, 99]))
        stats = f"median {p50:.4g}, 99th percentile {p99:.4g}, {100 * neg:.0f}% negative, {dtype}"
        integer = np.dtype(dtype).kind in "iu"
        if neg >= DB_MIN_NEGATIVE and DB_MEDIAN_RANGE[0] <= p50 <= DB_MEDIAN_RANGE[1]:
            found.append(("db", f"values look like dB ({stats})"))
        elif integer and neg == 0 and p50 >= DN_MIN_MEDIAN:
            found.append(("dn", f"values look like uncalibrated digital numbers ({stats})"))
        elif (
            not integer and neg <= POWER_MAX_NEGATIVE and 0 < p50 <= POWER_MAX_MEDIAN and p99 <= POWER_MAX_P99
        ):
            found.append(
                (
                    "power",
                    f"values look like linear intensity ({stats}), not dB: converted as power with "
                    "10*log10 (if they are amplitudes, set scale = 'amplitude')",
                )
            )
        else:
            raise SceneError(
                f"{what}: the scale of the values is not declared and not evident ({stats}); {fix}"
            )
    if not found:
        return "db", f"too few valid values (< {MIN_VALUES}) to inspect; nothing to convert"
    scales = {scale for scale, _ in found}
    if len(scales) > 1:
        raise SceneError(
            f"{what}: polarisations look differently scaled ({', '.join(sorted(scales))}); {fix}"
        )
    return found[0]


@dataclass(frozen=True)
class Radiometry:
    """What the tiler stores, once :func:`prepare_radiometry` settled the values."""

    source: SourceRaster
    """The scene to read (calibrated where digital numbers are calibrated)."""
    scale: str
    """Scale of what ``source`` reads, for :func:`to_db`."""
    scale_in: str
    """Scale of the assets (declared or detected)."""
    quantity: str
    """``sigma0``, ``gamma0``, ``beta0`` or ``dn``."""
    attrs: dict[str, Any]
    """Group attributes: ``scale_detected`` (``null`` when declared; else ``{scale, reason}``) and
    ``calibration`` (``null``, or the record of :meth:`SourceRaster.calibrated`)."""


def prepare_radiometry(scene: Scene, source: SourceRaster) -> Radiometry:
    """Settle the scale and quantity of a scene's values (module docstring) before tiling.

    - A declared scale (``scene.scale``) is used as is; a declared ``db`` whose values do not look like
      dB (:func:`detect_scale`) is logged as a warning.
    - An undeclared scale is detected (:func:`detect_scale`); the reason is logged and returned.
    - Digital numbers (``dn``) of a calibrated quantity (sigma0, beta0, gamma0) are calibrated with the
      item's calibration annotations (``scene.calibration``); ``dn`` of quantity ``dn`` are kept raw.

    :raises SceneError: an unknown declared scale, an undetectable one, digital numbers without their
        calibration annotation, or an annotation that is unreadable or does not cover the raster.
    """
    from fusarbatch.tiling.calibration import LUT_NAMES, read_calibration

    what = f"item {scene.item_id!r}"
    detected = None
    if scene.scale:
        try:
            scale = check_scale(scene.scale)
        except ValueError as exc:
            raise SceneError(f"{what}: {exc}") from None
        if scale == "db":
            try:
                seen, why = detect_scale(source.sample(), source.dtypes, what=what)
            except SceneError as exc:
                seen, why = "?", str(exc)
            if seen != "db":
                log.warning("%s: declared dB, but %s", what, why, extra={"scene": scene.item_id})
    else:
        scale, why = detect_scale(source.sample(), source.dtypes, what=what)
        detected = {"scale": scale, "reason": why}
        log.warning("%s: scale not declared; %s", what, why, extra={"scene": scene.item_id})
    quantity = scene.quantity
    attrs: dict[str, Any] = {"scale_detected": detected, "calibration": None}
    if scale != "dn" or quantity == "dn":
        return Radiometry(source, scale, scale, quantity, attrs)
    if quantity not in LUT_NAMES:
        raise SceneError(
            f"{what}: digital numbers cannot be calibrated to {quantity!r}; set quantity in the TOML"
        )
    missing = [pol for pol in source.pols if pol not in scene.calibration]
    if missing:
        key = f"schema-calibration-{missing[0].lower()}"
        raise SceneError(
            f"{what}: uncalibrated digital numbers need the calibration annotation (asset {key!r}) to become "
            f'{quantity}, and the item has none; use a catalog of calibrated data, or set quantity = "dn" '
            'and scale = "dn" in the catalog TOML to keep the raw digital numbers'
        )
    luts = {pol: read_calibration(scene.calibration[pol], quantity, pol) for pol in source.pols}
    shapes = source.reader.file_shapes()
    for pol, lut in luts.items():
        height, width = shapes[pol]
        if not lut.covers(height, width):
            raise SceneError(
                f"{lut.href}: the calibration LUT covers lines {lut.lines[0]}..{lut.lines[-1]} and pixels "
                f"{lut.pixels[0]}..{lut.pixels[-1]}; the {pol} raster has {height} x {width}: not its LUT"
            )
    calibrated = source.calibrated(luts)
    attrs["calibration"] = calibrated.calibration
    hrefs = ", ".join(lut.href for lut in luts.values())
    log.info("%s: digital numbers calibrated to %s (%s)", what, quantity, hrefs)
    return Radiometry(calibrated, "power", scale, quantity, attrs)
