"""GeoParquet 1.1 outputs (DESIGN 3.6): detections, tiles and counts.

Layout under the output folder, partitioned by acquisition date (UTC), one file per scene::

    detections/date=YYYY-MM-DD/<scene_id>.parquet
    tiles/date=YYYY-MM-DD/<scene_id>.parquet
    counts/date=YYYY-MM-DD/<scene_id>.parquet

Geometry is EPSG:4326 (lon, lat) WKB with a covering ``bbox`` column (GeoParquet 1.1 ``covering``), so
``geopandas.read_parquet(path, bbox=...)`` filters by row group. Each file is written to a temporary name in
the same folder and renamed over the old one: a crash never leaves a partial file, and rewriting a scene
replaces its rows instead of duplicating them. An empty table is still written (with its schema): a scene
with no detection is told apart from a scene not processed.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from fusarbatch.outputs import check_inside

KINDS = ("detections", "tiles", "counts")
_LABEL_SAFE = re.compile(r"[^\w]")  # letters of any script, digits, _

DETECTION_COLUMNS = {
    "detection_id": "string",
    "scene_id": "string",
    "tile_id": "Int32",
    "datetime": "datetime64[us, UTC]",
    "label": "string",
    "model_label": "string",
    "score": "Float64",
    "answer_score": "Float64",
    "model_id": "string",
    "run_id": "string",
}
TILE_COLUMNS = {
    "scene_id": "string",
    "tile_id": "Int32",
    "datetime": "datetime64[us, UTC]",
    "row_off": "Int64",
    "col_off": "Int64",
    "valid_fraction": "Float32",
    "aef_coverage": "Float32",
    "scene_class": "string",
    "status": "string",
    "error": "string",
    "reason": "string",
    "model_id": "string",
    "run_id": "string",
}
COUNT_COLUMNS = {
    "scene_id": "string",
    "datetime": "datetime64[us, UTC]",
    "label": "string",
    "count": "Int32",
    "tiles_inferred": "Int32",
    "model_id": "string",
    "run_id": "string",
}


def count_column(label: str) -> str:
    """Column name of a label's count in the tiles table: ``count_<label>`` lower-cased, other characters
    than letters, digits and ``_`` replaced by ``_`` (``oil tank`` -> ``count_oil_tank``)."""
    return "count_" + _LABEL_SAFE.sub("_", label.lower())


def partition_path(out: Path, kind: str, when: dt.datetime, scene_id: str) -> Path:
    """``<out>/<kind>/date=YYYY-MM-DD/<scene_id>.parquet`` for a UTC acquisition time."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} not one of {KINDS}")
    day = when.astimezone(dt.UTC).strftime("%Y-%m-%d")
    return out / kind / f"date={day}" / f"{scene_id}.parquet"


def _frame(rows: Sequence[dict[str, Any]], columns: dict[str, str]) -> gpd.GeoDataFrame:
    geometry = [r["geometry"] for r in rows]
    extra = sorted({k for r in rows for k in r} - set(columns) - {"geometry"})
    data = {}
    for name, dtype in columns.items():
        values = [r.get(name) for r in rows]
        data[name] = pd.Series(values, dtype=dtype) if values else pd.Series([], dtype=dtype)
    for name in extra:
        data[name] = pd.Series([r.get(name, 0) for r in rows], dtype="Int32")
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries(geometry, crs="EPSG:4326"))


def write_table(
    rows: Sequence[dict[str, Any]],
    out: Path,
    kind: str,
    when: dt.datetime,
    scene_id: str,
    *,
    staged: list[tuple[Path, Path]] | None = None,
) -> Path:
    """Write one scene's rows of ``kind`` atomically; returns the final path.

    Each row is a dict with the columns of the kind (``DETECTION_COLUMNS``, ``TILE_COLUMNS``,
    ``COUNT_COLUMNS``) plus ``geometry`` (shapely, EPSG:4326); the tiles table also takes ``count_<label>``
    integer columns. Missing values become nulls.

    :param staged: when given, the file is left under its temporary name and ``(temporary, final)`` is
        appended here, for :func:`fusarbatch.outputs.publish_staged` to rename once every file of the
        scene is written (or :func:`~fusarbatch.outputs.discard_staged` to drop).
    :raises UsageError: the partition folder leads outside ``out`` (a symbolic link).
    """
    columns = {"detections": DETECTION_COLUMNS, "tiles": TILE_COLUMNS, "counts": COUNT_COLUMNS}[kind]
    path = partition_path(out, kind, when, scene_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_inside(out, path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _frame(rows, columns).to_parquet(tmp, index=False, write_covering_bbox=True, schema_version="1.1.0")
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.append((tmp, path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_dataset(out: str | Path, kind: str) -> gpd.GeoDataFrame:
    """Read every scene file of ``kind`` under ``out`` into one GeoDataFrame (``date`` column from the
    partition folder). Temporary files (leading dot) are ignored. Empty when nothing was written."""
    files = sorted((Path(out) / kind).glob("date=*/[!.]*.parquet"))
    frames = []
    for f in files:
        frame = gpd.read_parquet(f)
        frame["date"] = f.parent.name.removeprefix("date=")
        frames.append(frame)
    if not frames:
        return gpd.GeoDataFrame({"date": []}, geometry=gpd.GeoSeries([], crs="EPSG:4326"))
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")
