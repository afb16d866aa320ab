"""Tile grid math (DESIGN 3.2): where the tiles of a scene start, and the affine of each tile. Pure: no I/O.

A scene of ``H x W`` pixels is cut into square tiles of ``T`` pixels (default 504, the FUSAR-GPT input
size) that overlap their neighbours by at least ``O`` pixels (default 56). Along an axis of length ``L``,
with stride ``S = T - O``:

- ``L <= T``: one tile at 0; the part past ``L`` is padded with NaN by the tiler;
- ``L > T``: the fewest tiles that cover the axis with overlaps of at least ``O``,
  ``n = ceil((L - T) / S) + 1``, spread evenly from ``0`` to ``L - T``: origin ``k`` is
  ``floor(k * (L - T) / (n - 1))``. Every tile is full size, the last one ends exactly at ``L``, and
  neighbours are ``floor(d)`` or ``ceil(d)`` pixels apart, ``d = (L - T) / (n - 1) <= S``: they overlap
  by ``O`` or more, and (for ``n >= 3``) are at least ``S // 2`` apart. (Origins ``0, S, 2S, ...`` then
  ``L - T`` left the last tile up to 1 px from its neighbour: a whole extra row of tiles for one pixel.)
  With ``n = 2`` the two tiles are ``L - T`` apart, which full-size tiles cannot avoid.

The grid depends only on the scene size, tile size and overlap: an AOI-clipped run
(:mod:`fusarbatch.tiling.clip`) picks tiles of this grid, so runs over overlapping AOIs give identical
tiles where they overlap.

Tiles are numbered row-major: ``tile = i * len(cols) + j`` for row origin ``rows[i]`` and column origin
``cols[j]``.

Affines follow rasterio / :mod:`affine` (and STAC ``proj:transform``): a pixel's map coordinates are
``x = a*col + b*row + c``, ``y = d*col + e*row + f`` with (col, row) the pixel's upper-left corner. Stored
transforms are the six coefficients ``(a, b, c, d, e, f)``; GDAL's ``GetGeoTransform`` order would be
``(c, a, b, f, d, e)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from affine import Affine

from fusarbatch.errors import UsageError

#: Default tile edge in pixels: 504 = 18 x 28 (the FUSAR-GPT training size: 324 visual tokens).
DEFAULT_TILE_SIZE = 504
#: Default minimum overlap between neighbouring tiles, in pixels.
DEFAULT_OVERLAP = 56


#: Largest tile edge accepted (pixels): one tile of 4 polarisations is then 1 GiB of float32.
MAX_TILE_SIZE = 8192


class TilingParameterError(UsageError, ValueError):
    """Invalid ``--tile-size`` / ``--overlap`` (a usage error, exit code 2; also a ValueError)."""


def validate_tiling(tile_size: int, overlap: int) -> None:
    """Check a tile size and overlap.

    :raises TilingParameterError: unless ``MAX_TILE_SIZE >= tile_size > overlap >= 0`` (integers).
    """
    if not isinstance(tile_size, int | np.integer) or not isinstance(overlap, int | np.integer):
        raise TilingParameterError(
            f"--tile-size and --overlap must be integers, got {tile_size!r} and {overlap!r}"
        )
    if overlap < 0:
        raise TilingParameterError(f"--overlap {overlap}: must be >= 0 pixels")
    if tile_size <= overlap:
        raise TilingParameterError(
            f"--overlap {overlap} must be smaller than --tile-size {tile_size}; lower the overlap"
        )
    if tile_size > MAX_TILE_SIZE:
        raise TilingParameterError(f"--tile-size {tile_size}: at most {MAX_TILE_SIZE} pixels")


def tile_origins(
    length: int, tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_OVERLAP
) -> list[int]:
    """Tile origins (first pixel index) along one axis of ``length`` pixels, ascending and distinct.

    ``length <= tile_size`` gives ``[0]`` (one padded tile); otherwise ``n = ceil((length - tile_size) /
    S) + 1`` origins (``S = tile_size - overlap``) spread evenly from ``0`` to ``length - tile_size``
    (module docstring), so the last tile ends exactly at ``length``.

    :raises ValueError: ``length < 1`` or an invalid tile size / overlap (:func:`validate_tiling`).
    """
    validate_tiling(tile_size, overlap)
    if length < 1:
        raise ValueError(f"axis length must be >= 1 pixel, got {length}")
    last = length - tile_size
    if last <= 0:
        return [0]
    stride = tile_size - overlap
    steps = -(-last // stride)  # ceil: the fewest steps of at most one stride
    return [k * last // steps for k in range(steps + 1)]


def tile_count(
    height: int, width: int, tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_OVERLAP
) -> int:
    """Number of tiles of a ``height x width`` scene, computed without building the grid (constant time
    and memory, for any claimed size): per axis 1 when ``L <= T``, else ``ceil((L - T) / S) + 1``, the
    length of :func:`tile_origins`.

    :raises ValueError: non-positive scene size or invalid tile size / overlap.
    """
    validate_tiling(tile_size, overlap)
    stride = tile_size - overlap
    counts = []
    for length in (int(height), int(width)):
        if length < 1:
            raise ValueError(f"axis length must be >= 1 pixel, got {length}")
        counts.append(1 if length <= tile_size else -(-(length - tile_size) // stride) + 1)
    return counts[0] * counts[1]


@dataclass(frozen=True)
class TileGrid:
    """The tiles of a ``height x width`` scene: origins per axis and derived per-tile offsets."""

    height: int
    """Scene rows (pixels)."""
    width: int
    """Scene columns (pixels)."""
    tile_size: int
    overlap: int
    rows: tuple[int, ...]
    """Row origins, ascending."""
    cols: tuple[int, ...]
    """Column origins, ascending."""

    @property
    def n_tiles(self) -> int:
        """Number of tiles, ``len(rows) * len(cols)``."""
        return len(self.rows) * len(self.cols)

    @property
    def row_offsets(self) -> np.ndarray:
        """``(tile,)`` int64: each tile's first row in the scene grid, row-major tile order."""
        return np.repeat(np.asarray(self.rows, dtype=np.int64), len(self.cols))

    @property
    def col_offsets(self) -> np.ndarray:
        """``(tile,)`` int64: each tile's first column in the scene grid, row-major tile order."""
        return np.tile(np.asarray(self.cols, dtype=np.int64), len(self.rows))


def tile_grid(
    height: int, width: int, tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_OVERLAP
) -> TileGrid:
    """The :class:`TileGrid` of a ``height x width`` scene (see :func:`tile_origins`).

    :raises ValueError: non-positive scene size or invalid tile size / overlap.
    """
    return TileGrid(
        height=int(height),
        width=int(width),
        tile_size=int(tile_size),
        overlap=int(overlap),
        rows=tuple(tile_origins(height, tile_size, overlap)),
        cols=tuple(tile_origins(width, tile_size, overlap)),
    )


def tile_transform(scene_transform: Affine, row_off: int, col_off: int) -> Affine:
    """Affine of the tile whose upper-left pixel is ``(row_off, col_off)`` in the scene:
    ``scene_transform @ Affine.translation(col_off, row_off)`` (same CRS as the scene).

    Pixel ``(r, c)`` of the tile and pixel ``(r + row_off, c + col_off)`` of the scene map to the same point.
    """
    return scene_transform @ Affine.translation(int(col_off), int(row_off))


def tile_transforms(scene_transform: Affine, row_offsets: np.ndarray, col_offsets: np.ndarray) -> np.ndarray:
    """``(tile, 6)`` float64: :func:`tile_transform` of every tile as ``(a, b, c, d, e, f)``."""
    out = np.empty((len(row_offsets), 6), dtype=np.float64)
    for k, (r, c) in enumerate(zip(row_offsets, col_offsets, strict=True)):
        out[k] = tuple(tile_transform(scene_transform, int(r), int(c)))[:6]
    return out
