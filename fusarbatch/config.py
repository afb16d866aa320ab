"""Typed run configuration (pydantic): what ``fusarbatch run`` does, validated before anything runs.

Values come from the defaults here, then an optional TOML file (``--config run.toml``), then command-line
flags (flags win). Every field is also a flag of ``fusarbatch run`` (``--tile-size`` for ``tile_size``;
list fields are repeatable flags: ``--label``, ``--collection``, ``--class``). Unknown keys and wrong
types are errors that name the key. In the file, keys may be written with ``_`` or ``-``; relative paths
of the path fields (``aoi``, ``out``, ``model``, ``log_file``) are relative to the file's folder.
``fusarbatch config show`` prints the effective configuration as TOML (:func:`to_toml`), which reads back
to the same configuration.

Two hashes (:meth:`RunConfig.output_hash`, :meth:`RunConfig.stage_hash`) cover exactly the fields that
change what a scene's outputs contain: the ledger (:mod:`fusarbatch.outputs.ledger`) redoes a done scene
when they change, and only then.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusarbatch.errors import UsageError
from fusarbatch.files import MAX_TOML_BYTES, read_capped

_NAME = re.compile(r"[\w][\w .\-/]*")  # labels and classes: words, no control characters or markup

#: Bumped when a code change alters what a scene's outputs contain (part of every output hash), so that
#: reruns redo scenes made by older code.
OUTPUTS_VERSION = (
    3  # 2: per-box score, answer_score, model grid; 3: spread tile origins, AOI clip, float16 store
)

#: Fields that decide the tiles, the anchors, the answers and the tables of a scene. Everything else
#: (where to search, where to run, batch size, timeouts, locking, logging) does not change a scene's
#: outputs and does not cause a redo.
_TILING_FIELDS = ("tile_size", "overlap", "min_valid", "whole_scenes", "aoi")
OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "tile": _TILING_FIELDS,
    "features": (*_TILING_FIELDS, "anchors", "aef_index"),
    "outputs": (
        *_TILING_FIELDS,
        "surface",
        "prescreen",
        "prescreen_k",
        "anchors",
        "aef_index",
        "labels",
        "classes",
        "max_new_tokens",
        "iou_threshold",
        "min_score",
        "quicklooks",
    ),
}
#: The ``outputs`` fields of a run with another engine than the model (:data:`OUTPUT_FIELDS` is the
#: model's, for ``hf`` and ``vllm`` alike: they give the same greedy answers): the model's generation
#: settings and tile classes do not change a CFAR run's outputs, its own parameters do. A model run's hash
#: does not include ``engine`` (the ledger's model hash tells engines apart), so the hashes of existing
#: model runs are unchanged.
ENGINE_OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "cfar": (
        *_TILING_FIELDS,
        "surface",
        "anchors",
        "aef_index",
        "labels",
        "iou_threshold",
        "min_score",
        "quicklooks",
        "engine",
        "cfar_guard_m",
        "cfar_background_m",
        "cfar_k",
        "cfar_min_area_m2",
    ),
}
_PATH_FIELDS = ("aoi", "out", "model", "log_file")


class RunConfig(BaseModel):
    """Configuration of one ``fusarbatch run`` (DESIGN 1, 3 and 3.7)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    aoi: Path | None = Field(None, description="AOI GeoJSON file (any CRS; reprojected to EPSG:4326).")
    start: str | None = Field(
        None,
        description="First day, UTC: YYYY-MM or YYYY-MM-DD; or a rolling window back from now: -P2D, -PT36H.",
    )
    end: str | None = Field(None, description="Last day, inclusive, UTC (same forms as start).")
    catalog: str | None = Field(None, description="Catalog name, STAC API URL, catalog.json or .parquet.")
    collections: tuple[str, ...] = Field((), description="Collections to search; empty: the catalog's.")
    limit: int | None = Field(None, ge=1, description="At most this many scenes.")
    out: Path = Field(Path("out"), description="Output folder (ledger.sqlite, tiles.zarr, GeoParquet).")
    model: Path | None = Field(
        None,
        description="Model directory, or a FUSAR-GPT checkpoint (TLM + LoRA: the official release or a "
        "`fusarbatch train` output) on top of base_model; default: the packaged demo model.",
    )
    base_model: Path | None = Field(
        None,
        description="Base Qwen2.5-VL directory under a checkpoint given as model; default: the one its "
        "training recorded.",
    )
    engine: str = Field(
        "hf",
        description="Detection engine: hf (FUSAR-GPT through transformers: detection, counting, tile "
        "classes), vllm (the same model, its language model served by vLLM: extra fusarbatch[vllm], use a "
        "batch_size of 128 or more) or cfar (two-parameter CA-CFAR ship detector on the CPU, no model: "
        "detection and counting only).",
    )
    cfar_guard_m: float = Field(
        800.0, gt=0, description="--engine cfar: guard window edge, metres on the ground."
    )
    cfar_background_m: float = Field(
        1600.0, gt=0, description="--engine cfar: background window edge, metres (larger than the guard)."
    )
    cfar_k: float = Field(
        4.0, gt=0, le=1000, description="--engine cfar: threshold on (x - mean) / std of the background."
    )
    cfar_min_area_m2: float = Field(
        2000.0, ge=0, description="--engine cfar: smallest detection kept, square metres."
    )
    aef_index: str | None = Field(None, description="AlphaEarth index (GeoParquet/CSV) path or URL.")
    anchors: int = Field(8, ge=1, le=64, description="Anchor grid is anchors x anchors per tile.")
    labels: tuple[str, ...] = Field(("ship",), description="Object labels to detect.")
    classes: tuple[str, ...] = Field(
        (), description="Tile classes asked with the whole tile as the box; default: the labels + background."
    )
    tile_size: int = Field(504, ge=28, description="Tile edge, pixels.")
    overlap: int = Field(56, ge=0, description="Overlap between tiles, pixels.")
    min_valid: float = Field(0.05, ge=0, le=1, description="Tiles with less valid data are not inferred.")
    whole_scenes: bool = Field(
        False, description="Tile and infer whole scenes; default: only the tiles the AOI needs."
    )
    surface: Literal["any", "sea", "land"] = Field(
        "any",
        description="sea: skip tiles entirely on land; land: skip tiles entirely at sea (1 km land mask; "
        "tiles within one mask cell of the coast are inferred).",
    )
    prescreen: Literal["none", "cfar"] = Field(
        "none",
        description="cfar: a tile goes to the model only if CFAR finds a candidate in it at prescreen_k.",
    )
    prescreen_k: float = Field(
        2.5, gt=0, description="--prescreen cfar threshold on the CFAR statistic (chosen on SSDD, 2.5)."
    )
    prune_tiles: bool = Field(
        False, description="Delete a scene's tiles from tiles.zarr once its outputs are written."
    )
    batch_size: int = Field(8, ge=1, le=256, description="Tiles per generate() call.")
    max_new_tokens: int = Field(128, ge=1, le=4096, description="Generation budget per prompt.")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="Cross-tile NMS IoU threshold.")
    min_score: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Boxes whose own score (geometric mean of their coordinate tokens' probabilities) is "
        "below this are dropped before NMS and counts; 0 keeps every box.",
    )
    scheduler: str | None = Field(None, description="Dask scheduler address; default: a LocalCluster.")
    scheduler_timeout_s: float = Field(
        20.0, gt=0, le=3600, allow_inf_nan=False, description="Seconds to reach --scheduler before giving up."
    )
    workers: int = Field(1, ge=1, le=64, description="Model workers of the LocalCluster (one per GPU).")
    dashboard: bool = Field(
        False, description="Serve the LocalCluster's Dask dashboard (on 127.0.0.1, a free port; logged)."
    )
    device: str | None = Field(None, description="cuda, cpu or None (cuda when available).")
    require_gpu: bool = Field(False, description="Fail instead of falling back to CPU.")
    task_timeout_s: float = Field(
        1800.0,
        gt=0,
        le=7 * 86400,
        allow_inf_nan=False,
        description="Seconds before one batch, or a scene's tiling on a cluster without a live worker, "
        "counts as hung.",
    )
    max_tiles: int = Field(
        100_000,
        ge=1,
        description="Most tiles one scene may have; a raster whose header claims more is refused before "
        "any task is built.",
    )
    allow_local_assets: bool = Field(
        False, description="Read assets that a remote (http/https) catalog names as local files."
    )
    quicklooks: bool = Field(True, description="Write a PNG per scene with the detections drawn.")
    since_last_run: bool = Field(
        False,
        description="Search from the last finished run's search time minus since_margin (first run: start).",
    )
    since_margin: str = Field(
        "P1D", description="ISO-8601 duration searched again before the last run (late-published scenes)."
    )
    retry_failed: bool = Field(
        False, description="Only retry the scenes the ledger records as failed or interrupted (no search)."
    )
    force: bool = Field(False, description="Redo every scene found, even those done with the same hashes.")
    wait: bool = Field(False, description="Wait for another run on the same --out instead of exiting 75.")
    log_file: Path | None = Field(None, description="Also append JSON-lines logs to this file.")

    @field_validator(*_PATH_FIELDS, "base_model", mode="before")
    @classmethod
    def _no_empty_path(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str | Path) and not str(v).strip():  # Path("") is "." (the current folder)
            raise ValueError("empty; give a path")
        return v

    @field_validator("labels", "classes")
    @classmethod
    def _plain_names(cls, v: tuple[str, ...], info: Any) -> tuple[str, ...]:
        cleaned = tuple(s.strip() for s in v if s.strip())
        if info.field_name == "labels" and not cleaned:
            raise ValueError("give at least one label")
        for name in cleaned:  # they go into prompts, column names and logs
            if len(name) > 64 or not _NAME.fullmatch(name):
                raise ValueError(f"{name!r}: letters, digits, spaces and - _ . / only, at most 64 characters")
        return cleaned

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", v.strip()):
            raise ValueError(f"{v!r}: expected cpu, cuda, cuda:N or mps")
        return v.strip() if v is not None else v

    @field_validator("since_margin")
    @classmethod
    def _margin_is_a_duration(cls, v: str) -> str:
        from fusarbatch.catalog.dates import parse_duration

        try:
            months, delta = parse_duration(v, what="since_margin")
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        if months < 0 or delta.total_seconds() < 0:
            raise ValueError("since_margin is a positive duration, e.g. P1D")
        return v.strip()

    @model_validator(mode="after")
    def _distinct_labels(self) -> RunConfig:
        from fusarbatch.outputs.geoparquet import count_column

        for field_name, names in (("labels", self.labels), ("classes", self.classes)):
            seen: dict[str, str] = {}
            for name in names:
                key = count_column(name) if field_name == "labels" else name.casefold()
                if key in seen:
                    what = f"the same column {key}" if field_name == "labels" else "the same class"
                    raise ValueError(f"{field_name}: {seen[key]!r} and {name!r} give {what}; keep one")
                seen[key] = name
        return self

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        from fusarbatch.engines import ENGINES

        name = v.strip().lower()
        if name not in ENGINES:
            raise ValueError(f"{v!r}: expected one of {', '.join(ENGINES)}")
        return name

    @model_validator(mode="after")
    def _cfar(self) -> RunConfig:
        if self.cfar_background_m <= self.cfar_guard_m:
            raise ValueError(
                f"cfar_background_m: {self.cfar_background_m:g} m must be larger than cfar_guard_m "
                f"{self.cfar_guard_m:g} m"
            )
        if self.engine == "cfar" and self.prescreen != "none":
            raise ValueError("prescreen: --prescreen cfar is for --engine hf or vllm (CFAR already answers)")
        if self.engine == "cfar" and len(self.labels) != 1:
            raise ValueError(
                f"labels: --engine cfar takes one label (got {', '.join(self.labels)}): CFAR finds bright "
                "targets and cannot tell labels apart"
            )
        return self

    @model_validator(mode="after")
    def _tiling(self) -> RunConfig:
        from fusarbatch.tiling.grid import validate_tiling

        try:
            validate_tiling(self.tile_size, self.overlap)
        except UsageError as exc:  # a model-level message starts with the option it names
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _required_and_period(self) -> RunConfig:
        if self.retry_failed:
            return self
        if self.aoi is None:
            raise ValueError("aoi: required: give --aoi, or `aoi = ...` in --config")
        if self.start is None and not self.since_last_run:
            raise ValueError(
                "start: required: give --start (or --since-last-run), or `start = ...` in --config"
            )
        from fusarbatch.catalog.dates import parse_period

        if self.start is not None:
            try:
                parse_period(self.start, self.end)
            except UsageError as exc:
                raise ValueError(str(exc)) from None
        return self

    def stage_hash(self, stage: str) -> str:
        """Hash of the fields that decide ``stage`` (``tile``, ``features`` or ``outputs``; for ``outputs``
        those of the run's engine, :data:`ENGINE_OUTPUT_FIELDS`): 16 hex digits.

        The AOI counts by its geometry (:func:`fusarbatch.tiling.clip.aoi_digest`), not its path, and not
        at all with ``whole_scenes``.
        """
        fields = OUTPUT_FIELDS[stage]
        if stage == "outputs" and self.engine in ENGINE_OUTPUT_FIELDS:
            fields = ENGINE_OUTPUT_FIELDS[self.engine]
        values = {name: _jsonable(getattr(self, name)) for name in fields}
        if "aoi" in values:
            values["aoi"] = None if self.whole_scenes or self.aoi is None else _aoi_digest(Path(self.aoi))
        text = json.dumps({"v": OUTPUTS_VERSION, "stage": stage, **values}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def output_hash(self) -> str:
        """The config hash the ledger records per scene (:meth:`stage_hash` of ``outputs``)."""
        return self.stage_hash("outputs")


def _aoi_digest(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return "unreadable"  # load_aoi says what is wrong before any scene is done
    return _aoi_digest_of(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _aoi_digest_of(path: str, mtime_ns: int, size: int) -> str | None:
    from fusarbatch.catalog.aoi import load_aoi
    from fusarbatch.errors import FusarbatchError
    from fusarbatch.tiling.clip import aoi_digest

    try:
        return aoi_digest(load_aoi(Path(path)).geometry)
    except FusarbatchError:
        return "invalid"  # likewise


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file as config keys (``-`` -> ``_``; relative path fields resolved against its folder).

    :raises UsageError: unreadable file or TOML, a table where a value is expected, not a regular file
        (a FIFO or device is never opened), larger than :data:`~fusarbatch.files.MAX_TOML_BYTES`.
    """
    path = Path(path)
    try:
        raw_bytes = read_capped(path, "--config", UsageError, MAX_TOML_BYTES, "give a TOML file")
        text = raw_bytes.decode("utf-8-sig")  # a BOM (Windows editors) is not an error
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file; give the path of a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc}); give a UTF-8 TOML file") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc}); fix the TOML") from None
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise UsageError(f"--config {path}: {key}: a table is not a setting; write `key = value` lines")
        if isinstance(value, dt.date):  # TOML reads an unquoted 2015-01-01 as a date (or a datetime)
            raise UsageError(f'--config {path}: {key}: quote the date: {key} = "{value.isoformat()}"')
        if isinstance(value, dt.time):
            raise UsageError(f"--config {path}: {key}: a time of day is no value here; see `config show`")
        if name in _PATH_FIELDS and isinstance(value, str) and value and not Path(value).is_absolute():
            value = str((path.parent / value).resolve())
        data[name] = value
    return data


def load_config(path: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults <- TOML file <- ``overrides`` (flags given on the command line; ``None`` values ignored).

    :raises UsageError: unreadable TOML, unknown key, wrong type or value, a missing required value; the
        message names the key.
    """
    data = read_config_file(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    where = f"--config {path}" if path is not None else "options"
    unknown = sorted(set(data) - set(RunConfig.model_fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(RunConfig.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"{where}: unknown key {key!r}{hint}; `fusarbatch config show` lists the keys")
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if not key:  # a model-level check: its message starts with the key
            raise UsageError(f"{where}: {msg}") from None
        if key.split(".")[0] in data and err["type"] not in ("value_error",):
            msg = f"{msg} (got {data[key.split('.')[0]]!r})"
        raise UsageError(f"{where}: {key}: {msg}") from None


def to_toml(cfg: RunConfig) -> str:
    """The configuration as a TOML document with one commented key per field (unset ones commented out).

    Path fields are written absolute, so the file reads back to the same configuration from anywhere.
    """
    lines = ["# fusarbatch run configuration: defaults <- --config FILE <- flags (fusarbatch config show)"]
    for name, field in RunConfig.model_fields.items():
        value = getattr(cfg, name)
        lines.append(f"# {field.description}")
        if value is None:
            lines.append(f"# {name} =")
            continue
        if isinstance(value, Path):
            value = value.absolute()
        lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
