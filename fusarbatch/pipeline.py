"""``fusarbatch run``: search -> tile -> features -> infer -> write, one scene at a time through the stages
(DESIGN 1, 3).

Scenes stream: while the model answers the tiles of one scene, the next scene is tiled and its anchors are
sampled, so the task graph holds at most two scenes whatever the archive size. Model tasks go to Dask
workers with the ``GPU=1`` resource (:mod:`fusarbatch.inference.workers`); a batch that does not finish
within ``task_timeout_s`` fails its scene instead of hanging the run.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr
from affine import Affine

from fusarbatch.catalog import Scene, search_scenes
from fusarbatch.config import RunConfig
from fusarbatch.errors import FusarbatchError, UsageError
from fusarbatch.features import open_source, write_scene_features
from fusarbatch.inference.geo import Detection, MapProjector, TileGeometry, scene_detections
from fusarbatch.inference.workers import (
    GPU_RESOURCE,
    ModelSpec,
    TaskSpec,
    infer_tiles,
    resolve_device,
    start_client,
)
from fusarbatch.outputs.geoparquet import count_column, write_table
from fusarbatch.outputs.quicklook import write_quicklook
from fusarbatch.tiling import tile_scene

log = logging.getLogger(__name__)

#: Anchor grid layout: nodes on the tile border, as the official training data (min-max positions).
ANCHOR_GRID = "edges"

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(event, fields)``: events ``scenes`` (total), ``stage`` (scene, stage), ``scene_done``."""


@dataclass
class SceneOutcome:
    """What happened to one scene."""

    scene_id: str
    status: str = "ok"
    """``ok`` or ``failed``."""
    error: str | None = None
    tiles: int = 0
    tiles_inferred: int = 0
    detections: Counter[str] = field(default_factory=Counter)
    parse_failures: int = 0
    aef_coverage: float = 0.0
    outputs: list[Path] = field(default_factory=list)


@dataclass
class RunSummary:
    """The end-of-run summary (printed by :func:`fusarbatch.report.print_run_summary`)."""

    run_id: str
    out: Path
    model_id: str
    scenes: list[SceneOutcome]
    seconds: float
    generate_seconds: float
    prompts: int

    @property
    def failed(self) -> list[SceneOutcome]:
        return [s for s in self.scenes if s.status != "ok"]

    @property
    def detections(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for s in self.scenes:
            total.update(s.detections)
        return total


@dataclass
class _Pending:
    scene: Scene
    group: str
    outcome: SceneOutcome
    futures: list[Any]
    started: float


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {out}: not writable ({exc.strerror}); choose another folder") from None


def run(cfg: RunConfig, progress: Progress | None = None) -> RunSummary:
    """Run the whole job described by ``cfg``; returns a summary (per-scene failures do not raise).

    :raises FusarbatchError: bad AOI/dates/catalog/config, unusable model directory, unwritable output
        folder, unreachable scheduler, ``--require-gpu`` without a GPU.
    """
    from fusarbatch.model.demo import demo_model_dir
    from fusarbatch.model.fusar_gpt import check_model_dir

    notify = progress or (lambda event, fields: None)
    started = time.perf_counter()
    run_id = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    _prepare_out(cfg.out)
    model_dir = Path(cfg.model) if cfg.model else demo_model_dir()
    check_model_dir(model_dir)
    model_id = model_dir.resolve().name
    device = resolve_device(cfg.device, require_gpu=cfg.require_gpu) if not cfg.scheduler else cfg.device
    result = search_scenes(
        aoi=cfg.aoi,
        start=cfg.start,
        end=cfg.end,
        catalog=cfg.catalog,
        collections=cfg.collections,
        limit=cfg.limit,
        save=cfg.out / "scenes.parquet",
    )
    notify("scenes", {"total": len(result.scenes)})
    source = open_source(cfg.aef_index, on_unavailable="null")
    model_spec = ModelSpec(
        str(model_dir), device=device, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
    )
    task = TaskSpec(labels=cfg.labels, classes=cfg.classes or (*cfg.labels, "background"))
    store = cfg.out / "tiles.zarr"
    client, cluster = start_client(cfg.scheduler, workers=cfg.workers)
    outcomes: list[SceneOutcome] = []
    generate_s, prompts = 0.0, 0
    pending: _Pending | None = None
    try:
        for scene in result.scenes:
            nxt = _tile_and_submit(scene, cfg, store, source, client, model_spec, task, notify)
            if pending is not None:
                g, p = _finish(pending, cfg, store, run_id, model_id, notify)
                generate_s, prompts = generate_s + g, prompts + p
                outcomes.append(pending.outcome)
            pending = nxt
        if pending is not None:
            g, p = _finish(pending, cfg, store, run_id, model_id, notify)
            generate_s, prompts = generate_s + g, prompts + p
            outcomes.append(pending.outcome)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return RunSummary(run_id, cfg.out, model_id, outcomes, time.perf_counter() - started, generate_s, prompts)


def _tile_and_submit(
    scene: Scene,
    cfg: RunConfig,
    store: Path,
    source: Any,
    client: Any,
    model_spec: ModelSpec,
    task: TaskSpec,
    notify: Progress,
) -> _Pending:
    outcome = SceneOutcome(scene.item_id)
    started = time.perf_counter()
    notify("stage", {"scene": scene.item_id, "stage": "tile"})
    tiled = tile_scene(scene, store, tile_size=cfg.tile_size, overlap=cfg.overlap, min_valid=cfg.min_valid)
    pending = _Pending(scene, tiled.group, outcome, [], started)
    if tiled.status != "ok":
        outcome.status, outcome.error = "failed", f"tiling: {tiled.error}"
        return pending
    outcome.tiles = tiled.n_tiles
    notify("stage", {"scene": scene.item_id, "stage": "features"})
    feats = write_scene_features(store, tiled.group, source, n=cfg.anchors, grid=ANCHOR_GRID)
    outcome.aef_coverage = feats.coverage
    vf = zarr.open_group(str(store / tiled.group), mode="r", zarr_format=3)["valid_fraction"][:]
    inferable = [int(i) for i in np.flatnonzero(vf >= cfg.min_valid)]
    outcome.tiles_inferred = len(inferable)
    notify("stage", {"scene": scene.item_id, "stage": "infer", "tiles": len(inferable)})
    for start in range(0, len(inferable), cfg.batch_size):
        batch = inferable[start : start + cfg.batch_size]
        pending.futures.append(
            client.submit(
                infer_tiles,
                model_spec,
                task,
                str(store),
                tiled.group,
                batch,
                resources=GPU_RESOURCE,
                pure=False,
            )
        )
    return pending


def _finish(
    p: _Pending, cfg: RunConfig, store: Path, run_id: str, model_id: str, notify: Progress
) -> tuple[float, int]:
    """Collect a scene's answers, write its three tables and quick-look. Returns (generate s, prompts)."""
    from distributed import wait

    outcome = p.outcome
    if outcome.status != "ok":
        notify("scene_done", {"scene": outcome.scene_id, "status": outcome.status, "error": outcome.error})
        return 0.0, 0
    answers: dict[int, Any] = {}
    generate_s, prompts = 0.0, 0
    try:
        try:
            wait(p.futures, timeout=cfg.task_timeout_s)
        except TimeoutError:
            not_done = [f for f in p.futures if not f.done()]
            for f in not_done:
                f.cancel()
            raise FusarbatchError(
                f"inference: {len(not_done)} batch(es) not done after {cfg.task_timeout_s:.0f} s "
                "(no worker with the GPU resource, or a hung GPU)"
            ) from None
        for fut in p.futures:
            res = fut.result()
            generate_s += res.generate_s
            prompts += res.prompts
            answers.update({a.tile_id: a for a in res.answers})
        notify("stage", {"scene": outcome.scene_id, "stage": "write"})
        _write_scene(p, answers, cfg, store, run_id, model_id)
    except Exception as exc:  # one scene's failure never stops the run
        outcome.status = "failed"
        outcome.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, FusarbatchError):
            log.debug("scene %s failed", outcome.scene_id, exc_info=True)
    notify(
        "scene_done",
        {
            "scene": outcome.scene_id,
            "status": outcome.status,
            "error": outcome.error,
            "seconds": time.perf_counter() - p.started,
        },
    )
    return generate_s, prompts


def _write_scene(
    p: _Pending, answers: dict[int, Any], cfg: RunConfig, store: Path, run_id: str, model_id: str
) -> None:
    scene, outcome = p.scene, p.outcome
    g = zarr.open_group(str(store / p.group), mode="r", zarr_format=3)
    transforms = g["transform"][:]
    rows, cols, vf = g["row_off"][:], g["col_off"][:], g["valid_fraction"][:]
    aef_cov = g["aef_mask"][:].mean(axis=1) if "aef_mask" in set(g.array_keys()) else np.zeros(len(rows))
    size = int(g.attrs["tile_size"])
    crs = str(g.attrs["crs"])
    tiles = [
        TileGeometry(Affine(*transforms[i]), int(rows[i]), int(cols[i]), size, size) for i in range(len(rows))
    ]
    ids = sorted(answers)
    detections: list[Detection] = scene_detections(
        scene.item_id,
        crs,
        [tiles[i] for i in ids],
        [answers[i].boxes for i in ids],
        [answers[i].scores for i in ids],
        iou_threshold=cfg.iou_threshold,
    )
    # scene_detections numbers tiles by position in the list it was given: map back to store tile ids
    detections = [Detection(**{**d.__dict__, "tile_id": ids[d.tile_id]}) for d in detections]
    outcome.detections = Counter(d.label for d in detections)
    outcome.parse_failures = sum(len(a.errors) for a in answers.values())
    project = MapProjector(crs)
    corners = ((0, 0), (size, 0), (size, size), (0, size))
    footprints = [project.polygon(shapely.Polygon([t.transform @ xy for xy in corners])) for t in tiles]
    per_tile: dict[int, Counter[str]] = {}
    for d in detections:
        per_tile.setdefault(d.tile_id, Counter())[d.label] += 1
    common = {"scene_id": scene.item_id, "datetime": scene.datetime, "model_id": model_id, "run_id": run_id}
    tile_rows = []
    for i in range(len(tiles)):
        ans = answers.get(i)
        row = {
            **common,
            "tile_id": i,
            "row_off": int(rows[i]),
            "col_off": int(cols[i]),
            "valid_fraction": float(vf[i]),
            "aef_coverage": float(aef_cov[i]),
            "scene_class": ans.scene_class if ans else None,
            "status": "ok" if ans else "skipped",
            "error": "; ".join(ans.errors)[:1000] or None if ans else None,
            "geometry": footprints[i],
        }
        for label in cfg.labels:
            row[count_column(label)] = per_tile.get(i, Counter())[label] if ans else None
        tile_rows.append(row)
    inferred_area = shapely.union_all([footprints[i] for i in ids]) if ids else shapely.Polygon()
    count_rows = [
        {
            **common,
            "label": label,
            "count": outcome.detections[label],
            "tiles_inferred": len(ids),
            "geometry": inferred_area,
        }
        for label in cfg.labels
    ]
    det_rows = [
        {
            **common,
            "detection_id": d.detection_id,
            "tile_id": d.tile_id,
            "label": d.label,
            "score": d.score,
            "geometry": d.geometry,
        }
        for d in detections
    ]
    out = cfg.out
    outcome.outputs = [
        write_table(det_rows, out, "detections", scene.datetime, p.group),
        write_table(tile_rows, out, "tiles", scene.datetime, p.group),
        write_table(count_rows, out, "counts", scene.datetime, p.group),
    ]
    if cfg.quicklooks:
        outcome.outputs.append(
            write_quicklook(
                store, p.group, [d.geometry_map for d in detections], out / "quicklooks" / f"{p.group}.png"
            )
        )
