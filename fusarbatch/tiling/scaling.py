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
"""

from __future__ import annotations

from typing import Literal, TypeVar

import dask.array as da
import numpy as np

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
