"""Tiling stage (DESIGN 3.2): scenes -> overlapping fixed-size tiles in a Zarr v3 store.

- :mod:`~fusarbatch.tiling.grid`: tile origins and affines (pure math);
- :mod:`~fusarbatch.tiling.scaling`: backscatter -> dB;
- :mod:`~fusarbatch.tiling.source`: a scene as a lazy ``(pol, y, x)`` dask array on one grid;
- :mod:`~fusarbatch.tiling.store`: the ``tiles.zarr`` layout, :func:`tile_scene`, :func:`tile_scenes`.
"""

from fusarbatch.tiling.grid import (
    DEFAULT_OVERLAP,
    DEFAULT_TILE_SIZE,
    TileGrid,
    tile_grid,
    tile_origins,
    tile_transform,
    tile_transforms,
)
from fusarbatch.tiling.scaling import SCALES, output_units, to_db
from fusarbatch.tiling.source import SourceRaster, open_scene, utm_crs
from fusarbatch.tiling.store import (
    DEFAULT_MIN_VALID,
    TileResult,
    build_tiles,
    scene_groups,
    tile_scene,
    tile_scenes,
    valid_fractions,
)

__all__ = [
    "DEFAULT_MIN_VALID",
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE_SIZE",
    "SCALES",
    "SourceRaster",
    "TileGrid",
    "TileResult",
    "build_tiles",
    "open_scene",
    "output_units",
    "scene_groups",
    "tile_grid",
    "tile_origins",
    "tile_scene",
    "tile_scenes",
    "tile_transform",
    "tile_transforms",
    "to_db",
    "utm_crs",
    "valid_fractions",
]
