"""Typed run configuration (pydantic): what ``fusarbatch run`` does, validated before anything runs.

Values come from the defaults here, then an optional TOML file, then command-line flags (flags win). Unknown
keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fusarbatch.errors import UsageError


class RunConfig(BaseModel):
    """Configuration of one ``fusarbatch run`` (DESIGN 1 and 3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aoi: Path = Field(description="AOI GeoJSON file (any CRS; reprojected to EPSG:4326).")
    start: str = Field(description="First day, UTC: YYYY-MM or YYYY-MM-DD.")
    end: str | None = Field(None, description="Last day, inclusive, UTC.")
    catalog: str | None = Field(None, description="Catalog name, STAC API URL, catalog.json or .parquet.")
    collections: tuple[str, ...] = Field((), description="Collections to search; empty: the catalog's.")
    limit: int | None = Field(None, ge=1, description="At most this many scenes.")
    out: Path = Field(Path("out"), description="Output folder.")
    model: Path | None = Field(None, description="Model directory; default: the packaged demo model.")
    aef_index: str | None = Field(None, description="AlphaEarth index (GeoParquet/CSV) path or URL.")
    anchors: int = Field(8, ge=1, le=64, description="Anchor grid is anchors x anchors per tile.")
    labels: tuple[str, ...] = Field(("ship",), description="Object labels to detect.")
    classes: tuple[str, ...] = Field(
        (), description="Tile classes asked with the whole tile as the box; default: the labels + background."
    )
    tile_size: int = Field(504, ge=28, description="Tile edge, pixels.")
    overlap: int = Field(56, ge=0, description="Overlap between tiles, pixels.")
    min_valid: float = Field(0.05, ge=0, le=1, description="Tiles with less valid data are not inferred.")
    batch_size: int = Field(8, ge=1, le=256, description="Tiles per generate() call.")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Generation budget per prompt.")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="Cross-tile NMS IoU threshold.")
    scheduler: str | None = Field(None, description="Dask scheduler address; default: a LocalCluster.")
    workers: int = Field(1, ge=1, description="Model workers of the LocalCluster (one per GPU).")
    device: str | None = Field(None, description="cuda, cpu or None (cuda when available).")
    require_gpu: bool = Field(False, description="Fail instead of falling back to CPU.")
    task_timeout_s: float = Field(1800.0, gt=0, description="Seconds before one batch counts as hung.")
    quicklooks: bool = Field(True, description="Write a PNG per scene with the detections drawn.")

    @field_validator("labels")
    @classmethod
    def _labels_not_empty(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        cleaned = tuple(s.strip() for s in v if s.strip())
        if not cleaned:
            raise ValueError("give at least one label")
        return cleaned


def load_config(path: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults <- TOML file <- ``overrides`` (flags given on the command line; ``None`` values ignored).

    :raises UsageError: unreadable TOML, unknown key, wrong type or value; the message names the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"--config {path}: cannot read it ({exc}); fix the TOML") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        where = f"--config {path}" if path is not None else "options"
        raise UsageError(f"{where}: {key}: {err['msg']}") from None
