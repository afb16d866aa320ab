"""Quick-look PNG per scene: the tiles mosaicked at reduced resolution, detections drawn on top.

For a person to look at, not for analysis. The mosaic uses the same rendering as the model
(:func:`fusarbatch.render.render`, grey, first polarisation); tiles later in raster order overwrite the
overlap of earlier ones. The picture covers the stored tiles (the AOI's surroundings in an AOI-clipped
run, the whole scene otherwise). Detections are outlined in red, one outline per detection polygon; the
AOI (within the scene) in yellow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from affine import Affine
from PIL import Image, ImageDraw
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from fusarbatch.outputs import check_inside
from fusarbatch.render import render


def write_quicklook(
    store: Path,
    group: str,
    detections_map: Sequence[Polygon],
    path: Path,
    *,
    max_side: int = 1024,
    aoi_map: BaseGeometry | None = None,
    staged: list[tuple[Path, Path]] | None = None,
) -> Path:
    """Write ``path`` (PNG, atomically) for one scene group of the tile store.

    :param detections_map: detection polygons in the scene CRS (``Detection.geometry_map``).
    :param aoi_map: the AOI in the scene CRS (polygons; drawn as outlines), or ``None``.
    :param max_side: the longer side of the PNG in pixels (the scene is decimated by an integer factor).
    :param staged: as in :func:`fusarbatch.outputs.geoparquet.write_table`: leave the file under its
        temporary name and append ``(temporary, final)`` here.
    :raises UsageError: the quick-look folder leads outside the output folder (a symbolic link).
    """
    g = zarr.open_group(str(store / group), mode="r", zarr_format=3)
    size = int(g.attrs["tile_size"])
    rows, cols = g["row_off"][:], g["col_off"][:]
    r0, c0 = (int(rows.min()), int(cols.min())) if len(rows) else (0, 0)
    height = int(rows.max()) + size - r0 if len(rows) else size
    width = int(cols.max()) + size - c0 if len(cols) else size
    factor = max(1, math.ceil(max(height, width) / max_side))
    canvas = Image.new("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    pols, units = list(g.attrs["pols"]), str(g.attrs.get("units", "dB"))
    backscatter = g["backscatter"]
    for i in range(len(rows)):
        tile = backscatter[i, :1, ::factor, ::factor]
        canvas.paste(
            render(tile, pols[:1], units=units, size=None),
            ((int(cols[i]) - c0) // factor, (int(rows[i]) - r0) // factor),
        )
    to_px = ~Affine(*g.attrs["scene_transform"])
    draw = ImageDraw.Draw(canvas)

    def outline(poly: Polygon, colour: tuple[int, int, int]) -> None:
        pts = [to_px @ (x, y) for x, y in np.asarray(poly.exterior.coords)]
        draw.polygon([((c - c0) / factor, (r - r0) / factor) for c, r in pts], outline=colour, width=2)

    for part in getattr(aoi_map, "geoms", [aoi_map] if aoi_map is not None else []):
        if isinstance(part, Polygon) and not part.is_empty:
            outline(part, (255, 220, 0))
    for poly in detections_map:
        outline(poly, (255, 40, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    check_inside(path.parent.parent, path)  # <out>/quicklooks/<name>.png
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        canvas.save(tmp, format="PNG")
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.append((tmp, path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
