"""Quick-look PNG per scene: the tiles mosaicked at reduced resolution, detections drawn on top.

For a person to look at, not for analysis. The mosaic uses the same rendering as the model
(:func:`fusarbatch.render.render`, grey, first polarisation); tiles later in raster order overwrite the
overlap of earlier ones. Detections are outlined in red, one outline per detection polygon.
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

from fusarbatch.outputs import check_inside
from fusarbatch.render import render


def write_quicklook(
    store: Path,
    group: str,
    detections_map: Sequence[Polygon],
    path: Path,
    *,
    max_side: int = 1024,
    staged: list[tuple[Path, Path]] | None = None,
) -> Path:
    """Write ``path`` (PNG, atomically) for one scene group of the tile store.

    :param detections_map: detection polygons in the scene CRS (``Detection.geometry_map``).
    :param max_side: the longer side of the PNG in pixels (the scene is decimated by an integer factor).
    :param staged: as in :func:`fusarbatch.outputs.geoparquet.write_table`: leave the file under its
        temporary name and append ``(temporary, final)`` here.
    :raises UsageError: the quick-look folder leads outside the output folder (a symbolic link).
    """
    g = zarr.open_group(str(store / group), mode="r", zarr_format=3)
    height, width = (int(v) for v in g.attrs["scene_shape"])
    size = int(g.attrs["tile_size"])
    factor = max(1, math.ceil(max(height, width, size) / max_side))
    canvas = Image.new("RGB", (math.ceil(max(width, size) / factor), math.ceil(max(height, size) / factor)))
    rows, cols = g["row_off"][:], g["col_off"][:]
    pols, units = list(g.attrs["pols"]), str(g.attrs.get("units", "dB"))
    backscatter = g["backscatter"]
    for i in range(len(rows)):
        tile = backscatter[i, :1, ::factor, ::factor]
        canvas.paste(
            render(tile, pols[:1], units=units, size=None), (int(cols[i]) // factor, int(rows[i]) // factor)
        )
    to_px = ~Affine(*g.attrs["scene_transform"])
    draw = ImageDraw.Draw(canvas)
    for poly in detections_map:
        pts = [to_px @ (x, y) for x, y in np.asarray(poly.exterior.coords)]
        draw.polygon([(c / factor, r / factor) for c, r in pts], outline=(255, 40, 40), width=2)
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
