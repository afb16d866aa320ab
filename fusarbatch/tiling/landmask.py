"""Sea/land triage of tiles (``--surface sea|land``, issue 11) with the 1 km GLOBE land mask that the
``global-land-mask`` package (MIT) ships for offline use.

The mask is a ``(21600, 43200)`` bool grid of 1/120 degree cells (``True`` = ocean; lakes count as land),
row ``i`` = ``floor((90 - lat) * 120)``, column ``j`` = ``floor((lon + 180) * 120)``, as the package's own
``globe.is_ocean`` indexes it. Importing the package inflates the whole 933 MB grid (9 s here); this module
instead streams only the rows a scene needs out of the package's ``.npz`` (about 0.1-2 s, a few MB).

A tile is classified from its footprint (the tile square's border, every 1/16 of its edge, in EPSG:4326):
the mask cells of its lon/lat bounding box **plus one cell on every side** are read; all ocean -> ``sea``,
no ocean -> ``land``, else ``coast``. The box contains the footprint, so ``land`` means "land and at least
one mask cell from the coast" (ports and piers next to the coast are always inferred). A footprint across
the antimeridian counts as ``coast``.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from pyproj import CRS, Transformer

Surface = Literal["any", "sea", "land"]
#: Mask cells per degree (GLOBE, 30 arc-seconds).
CELLS_PER_DEG = 120
_ROWS, _COLS = 180 * CELLS_PER_DEG, 360 * CELLS_PER_DEG
#: Why a tile is not inferred, per ``--surface``.
SKIP_REASONS = {
    "sea": "on land, over one 1 km mask cell from the coast (--surface sea)",
    "land": "at sea, over one 1 km mask cell from the coast (--surface land)",
}


@lru_cache(maxsize=1)
def _mask_file() -> str:
    import importlib.util

    spec = importlib.util.find_spec("global_land_mask")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("global-land-mask is not installed (pip install global-land-mask)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "globe_combined_mask_compressed.npz")


def ocean_rows(i0: int, i1: int) -> np.ndarray:
    """Rows ``[i0, i1)`` of the ocean mask, ``(i1 - i0, 43200)`` bool (``True`` = ocean), read by
    streaming the package's compressed ``mask.npy`` up to row ``i1``."""
    i0, i1 = max(0, int(i0)), min(_ROWS, int(i1))
    if i1 <= i0:
        return np.zeros((0, _COLS), dtype=bool)
    with zipfile.ZipFile(_mask_file()) as z, z.open("mask.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if shape != (_ROWS, _COLS) or fortran or dtype != np.dtype(bool):
            raise ValueError(f"{_mask_file()}: unexpected land mask layout {shape} {dtype}")
        f.seek(f.tell() + i0 * _COLS)
        raw = f.read((i1 - i0) * _COLS)
    return np.frombuffer(raw, dtype=bool).reshape(i1 - i0, _COLS)


def classify_tiles(crs: CRS | str, transforms: np.ndarray, tile_size: int) -> list[str]:
    """``sea``, ``land`` or ``coast`` for each tile (module docstring).

    :param crs: the scene CRS; ``transforms``: ``(tile, 6)`` tile affines ``(a, b, c, d, e, f)``.
    """
    n = len(transforms)
    if n == 0:
        return []
    t = np.linspace(0, tile_size, 17)
    zeros, full = np.zeros_like(t), np.full_like(t, tile_size)
    border_c = np.concatenate([t, full, t[::-1], zeros])
    border_r = np.concatenate([zeros, t, full, t[::-1]])
    a, b, c, d, e, f = (np.asarray(transforms, dtype=np.float64)[:, k, None] for k in range(6))
    x = a * border_c + b * border_r + c
    y = d * border_c + e * border_r + f
    to_lonlat = Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True)
    lon, lat = (np.asarray(v).reshape(n, -1) for v in to_lonlat.transform(x.ravel(), y.ravel()))
    i0 = np.floor((90 - lat.max(axis=1)) * CELLS_PER_DEG).astype(np.int64) - 1
    i1 = np.floor((90 - lat.min(axis=1)) * CELLS_PER_DEG).astype(np.int64) + 2
    j0 = np.floor((lon.min(axis=1) + 180) * CELLS_PER_DEG).astype(np.int64) - 1
    j1 = np.floor((lon.max(axis=1) + 180) * CELLS_PER_DEG).astype(np.int64) + 2
    wraps = (lon.max(axis=1) - lon.min(axis=1)) > 180
    i0, i1 = np.clip(i0, 0, _ROWS), np.clip(i1, 0, _ROWS)
    j0, j1 = np.clip(j0, 0, _COLS), np.clip(j1, 0, _COLS)
    band0 = int(i0[~wraps].min()) if (~wraps).any() else 0
    band = ocean_rows(band0, int(i1[~wraps].max())) if (~wraps).any() else None
    out: list[str] = []
    for k in range(n):
        if wraps[k] or band is None:
            out.append("coast")
            continue
        cells = band[i0[k] - band0 : i1[k] - band0, j0[k] : j1[k]]
        out.append("sea" if cells.all() else "land" if not cells.any() else "coast")
    return out


def surface_skips(
    surface: Surface, crs: CRS | str, transforms: np.ndarray, tile_size: int, candidates: Sequence[int]
) -> dict[int, str]:
    """The tiles of ``candidates`` that ``--surface`` keeps from the model, with the reason: ``{}`` for
    ``any``; for ``sea`` the tiles classified ``land``, for ``land`` those classified ``sea``."""
    if surface == "any" or not len(candidates):
        return {}
    ids = [int(i) for i in candidates]
    classes = classify_tiles(crs, np.asarray(transforms)[ids], tile_size)
    drop = "land" if surface == "sea" else "sea"
    return {i: SKIP_REASONS[surface] for i, cls in zip(ids, classes, strict=True) if cls == drop}
