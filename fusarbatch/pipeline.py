"""``fusarbatch run``: search -> tile -> features -> infer -> write, one scene at a time through the stages
(DESIGN 1, 3 and 3.7).

Scenes stream: while the engine answers the tiles of one scene, the next scene is tiled and its anchors are
sampled, so the task graph holds at most two scenes whatever the archive size. The engine
(``--engine``, :mod:`fusarbatch.engines`: the model, through transformers (``hf``, the default) or vLLM,
or CFAR) gives two tasks per batch of tiles: a CPU task that reads (and renders) them, and the answer
task, which asks for the engine's Dask resources (the model: ``GPU=1``,
:mod:`fusarbatch.inference.workers`; CFAR: none). A batch that does not
finish within ``task_timeout_s`` fails its scene instead of hanging the run.

**Ledger and reruns** (:mod:`fusarbatch.outputs.ledger`). A run holds ``<out>/run.lock`` and records every
scene's stages in ``<out>/ledger.sqlite``. A scene is skipped when the ledger has it done with the same
config hash (:meth:`RunConfig.output_hash`) and model hash, and its output files are on disk; otherwise
(new, failed, interrupted, changed, files missing, its Zarr group re-tiled or re-anchored since its
outputs were made (e.g. by ``fusarbatch tile --tile-size``), ``--force``) it is redone. A redone scene
reuses its Zarr group when the ledger has its tiling (and anchors) done with the same stage hash and the
group is ``complete`` (``aef_complete``); everything after that is recomputed, and every output file is
replaced atomically, so a run killed at any point and started again ends with the outputs of an
uninterrupted run. Leftovers of killed runs (temporary files, partial Zarr groups of dead processes) are
removed at start.

**Windows.** ``--start``/``--end`` (calendar dates or ``-P2D``-style rolling windows), or
``--since-last-run``: from the search time of the last finished run minus ``since_margin`` (scenes
already done there are skipped; the margin catches scenes published late). ``--retry-failed`` searches
nothing: it retries the ledger's failed and interrupted scenes. An incremental run (rolling window or
``--since-last-run``) that finds nothing new ends with exit 0.

**Test hook** (used by tests/test_ops.py to SIGKILL a real run at a known point; inert unless set):
``FUSARBATCH_TEST_PAUSE_AT=<point>[:<n>]`` with ``FUSARBATCH_TEST_PAUSE_FILE=<path>``. The ``n``-th time
(default 1) a scene reaches ``point``, the run writes ``{"pid", "point", "scene"}`` to the file and sleeps
while the file exists (600 s at most): kill it then, or delete the file to let it go on. Points: ``tile``
(inside tiling: the first tiles are written to the scene's partial Zarr group, which is not complete;
LocalCluster only), ``infer`` (the first answers of the scene arrived, the others are still computed),
``write`` (the scene's detections file is replaced, its tiles/counts files and quick-look not yet).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import zarr
from affine import Affine
from distributed.diagnostics.plugin import WorkerPlugin

from fusarbatch.catalog import Scene
from fusarbatch.config import RunConfig
from fusarbatch.engines import Engine, open_engine
from fusarbatch.engines.prescreen import prescreen_skips
from fusarbatch.errors import AOIError, FusarbatchError, ModelError, NoWorkerError, UsageError, disk_full
from fusarbatch.features import open_source, write_scene_features_or_empty
from fusarbatch.inference.geo import Detection, MapProjector, TileGeometry, scene_detections
from fusarbatch.inference.workers import (
    start_client,
)
from fusarbatch.outputs import (
    AEF_ARRAYS,
    SCENE_ARRAYS,
    discard_staged,
    group_attrs,
    missing_arrays,
    publish_staged,
    zarr_temp_files,
)
from fusarbatch.outputs.geoparquet import KINDS, count_column, write_table
from fusarbatch.outputs.ledger import Ledger, RunLock, new_run_id, prepare_out, utc_now
from fusarbatch.outputs.provenance import OUTPUTS_MADE_FROM, outputs_out_of_step
from fusarbatch.outputs.quicklook import write_quicklook
from fusarbatch.tiling import tile_scene
from fusarbatch.tiling.clip import aoi_digest, aoi_in_map, centres_inside
from fusarbatch.tiling.landmask import surface_skips
from fusarbatch.tiling.store import left_by_gone_process

log = logging.getLogger(__name__)

#: Anchor grid layout: nodes on the tile border, as the official training data (min-max positions).
ANCHOR_GRID = "edges"

Progress = Callable[[str, dict[str, Any]], None]
"""``progress(event, fields)``: events ``scenes`` (total, to_do, skipped), ``skipped`` (scene, reason),
``stage`` (scene, stage), ``scene_done`` (scene, status, error, seconds)."""

PAUSE_ENV = "FUSARBATCH_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "FUSARBATCH_TEST_PAUSE_FILE"


@dataclass
class SceneOutcome:
    """What happened to one scene."""

    scene_id: str
    status: str = "ok"
    """``ok`` or ``failed``."""
    error: str | None = None
    stage: str = "tile"
    """The stage reached (where it failed, for a failed scene)."""
    tiles: int = 0
    tiles_inferred: int = 0
    detections: Counter[str] = field(default_factory=Counter)
    parse_failures: int = 0
    aef_coverage: float = 0.0
    outputs: list[Path] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    """Stages taken over from an earlier attempt (``tile``, ``features``)."""


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
    skipped: list[str] = field(default_factory=list)
    """Scenes found but already done with the same hashes (not redone)."""
    window: tuple[dt.datetime | None, dt.datetime | None] = (None, None)
    mode: str = "window"
    took_over: str | None = None
    """Who left the lock behind when this run took it over from a dead run."""

    @property
    def failed(self) -> list[SceneOutcome]:
        return [s for s in self.scenes if s.status != "ok"]

    @property
    def detections(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for s in self.scenes:
            total.update(s.detections)
        return total

    @property
    def exit_code(self) -> int:
        """0 every scene done (or skipped), 1 some scenes failed."""
        return 1 if self.failed else 0


@dataclass
class _Pending:
    scene: Scene
    group: str
    outcome: SceneOutcome
    futures: list[Any]
    started: float
    skipped: dict[int, str] = field(default_factory=dict)
    """Tiles kept from the model, with the reason (``--surface``)."""


@dataclass
class _Context:
    cfg: RunConfig
    store: Path
    run_id: str
    model_id: str
    config_hash: str
    model_hash: str
    ledger: Ledger
    notify: Progress
    engine: Engine
    source: Any = None
    client: Any = None
    searched_at: str = ""
    aoi: Any = None
    """The AOI (EPSG:4326 geometry) that clips tiling and outputs; None: whole scenes."""
    no_worker: str | None = None
    """Set when the cluster lost its workers: the scenes not tiled yet fail with it, untried."""


def run(
    cfg: RunConfig,
    progress: Progress | None = None,
    *,
    lock: RunLock | None = None,
    run_id: str | None = None,
    argv: Sequence[str] | None = None,
) -> RunSummary:
    """Run the whole job described by ``cfg``; returns a summary (per-scene failures do not raise).

    :param lock: the folder's lock, already held (the CLI takes it before the heavy imports); default:
        taken here (``cfg.wait`` decides between waiting and :class:`~fusarbatch.outputs.ledger.LockedError`).
    :raises FusarbatchError: bad AOI/dates/catalog/config, unusable model directory, unwritable output
        folder, ``--out`` locked (exit 75), unreachable scheduler, ``--require-gpu`` without a GPU.
    """
    run_id = run_id or new_run_id()
    own_lock = lock is None
    prepare_out(cfg.out)
    if lock is None:
        lock = RunLock(cfg.out).acquire(wait=cfg.wait, run_id=run_id)
    try:
        lock.set_run_id(run_id)
        return _run_locked(cfg, progress, lock, run_id, list(argv if argv is not None else sys.argv))
    finally:
        if own_lock:
            lock.release()


def _run_locked(
    cfg: RunConfig, progress: Progress | None, lock: RunLock, run_id: str, argv: list[str]
) -> RunSummary:
    notify = progress or (lambda event, fields: None)
    started = time.perf_counter()
    ledger = Ledger.open(cfg.out)
    try:
        dead = ledger.recover(run_id)
        if dead:
            log.warning("ledger: run(s) %s did not finish (process gone); their scenes will be redone", dead)
        removed = sweep_leftovers(cfg.out)
        if removed:
            log.info("removed %d leftover(s) of killed runs: %s", len(removed), ", ".join(removed[:5]))
        # the engine's files checked (for the model: headers, JSON) before any scene is tiled
        engine = open_engine(cfg)
    except BaseException:
        ledger.close()
        raise
    mode = "retry-failed" if cfg.retry_failed else "since-last-run" if cfg.since_last_run else "window"
    ctx = _Context(
        cfg=cfg,
        store=cfg.out / "tiles.zarr",
        run_id=run_id,
        model_id=engine.model_id,
        config_hash=cfg.output_hash(),
        model_hash=engine.fingerprint,
        ledger=ledger,
        notify=notify,
        engine=engine,
    )
    if cfg.aoi is not None and not cfg.whole_scenes:  # --retry-failed without --aoi: whole scenes
        from fusarbatch.catalog import load_aoi

        try:
            ctx.aoi = load_aoi(Path(str(cfg.aoi))).geometry
        except BaseException:
            ledger.close()
            raise
    ledger.start_run(
        run_id,
        argv=argv,
        config=cfg.model_dump(mode="json"),
        config_hash=ctx.config_hash,
        model_hash=ctx.model_hash,
        model_id=ctx.model_id,
        mode=mode,
    )
    summary = RunSummary(run_id, cfg.out, ctx.model_id, [], 0.0, 0.0, 0, mode=mode)
    summary.took_over = lock.stale.describe() if lock.stale else None
    status, error, exit_code = "error", None, 1
    try:
        ctx.engine = engine.start()  # e.g. the device (--require-gpu)
        client, cluster = start_client(
            cfg.scheduler,
            workers=cfg.workers,
            connect_timeout_s=cfg.scheduler_timeout_s,
            gpu=ctx.engine.resources is not None,
            dashboard=cfg.dashboard,
        )
        try:
            ctx.client = client
            _arm_tile_pause(client, cluster)
            scenes, window = _find_scenes(ctx)
            summary.window = window
            to_do, skipped = _plan(ctx, scenes, summary)
            summary.skipped = [s.item_id for s, _ in skipped]
            ledger.searched(
                run_id,
                searched_at=ctx.searched_at,
                window_start=window[0],
                window_end=window[1],
                found=len(scenes),
                skipped=len(skipped),
            )
            notify("scenes", {"total": len(scenes), "to_do": len(to_do), "skipped": len(skipped)})
            for s, why in skipped:
                notify("skipped", {"scene": s.item_id, "reason": why})
            if to_do:
                ctx.source = open_source(cfg.aef_index, on_unavailable="null")
                _stream(ctx, to_do, summary)
        finally:
            close_source = getattr(ctx.source, "close", None)  # COG handles and reader threads
            if close_source is not None:
                with contextlib.suppress(Exception):
                    close_source()
            client.close()
            if cluster is not None:
                cluster.close()
        status = "failed" if summary.failed else "ok"
        exit_code = summary.exit_code
    except KeyboardInterrupt:
        status, error, exit_code = "interrupted", "interrupted (Ctrl-C or SIGTERM)", 130
        with contextlib.suppress(Exception):
            ledger.interrupt(run_id, f"run {run_id} was interrupted (Ctrl-C or SIGTERM); redone next run")
        raise
    except FusarbatchError as exc:
        status, error, exit_code = "error", str(exc), exc.exit_code
        raise
    except Exception as exc:
        status, error = "error", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        summary.seconds = time.perf_counter() - started
        with contextlib.suppress(Exception):
            ledger.finish_run(
                run_id,
                status=status,
                exit_code=exit_code,
                done=sum(s.status == "ok" for s in summary.scenes),
                failed=len(summary.failed),
                error=error,
            )
        ledger.close()
    return summary


# ------------------------------------------------------------------------------------- finding the work


def _find_scenes(ctx: _Context) -> tuple[list[Scene], tuple[dt.datetime | None, dt.datetime | None]]:
    """The scenes of this run and the search window (``(None, None)`` for ``--retry-failed``)."""
    from fusarbatch.catalog import load_aoi, resolve_catalog, save_scenes, search
    from fusarbatch.catalog.dates import parse_duration, parse_end, parse_period, shift

    cfg = ctx.cfg
    ctx.searched_at = ""  # --retry-failed searches nothing: the next --since-last-run must not start here
    if cfg.retry_failed:
        # each scene is rebuilt with the catalog definition it was found with (asset keys, signing),
        # unless --catalog says otherwise
        specs: dict[tuple[str | None, tuple[str, ...]], Any] = {}
        scenes = []
        for rec in ctx.ledger.scenes(("failed", "interrupted")):
            if rec.item is None:
                log.warning("scene %s: no STAC item in the ledger; cannot retry it", rec.scene_id)
                continue
            found_with = ctx.ledger.run_config(rec.run_id)
            key = (
                (cfg.catalog, tuple(cfg.collections))
                if cfg.catalog
                else (found_with.get("catalog"), tuple(found_with.get("collections") or ()))
            )
            try:
                if key not in specs:
                    specs[key] = resolve_catalog(key[0], collections=key[1])
                scenes.append(Scene.from_item(rec.item, specs[key]))
            except FusarbatchError as exc:
                log.warning("scene %s: cannot rebuild it from the ledger (%s)", rec.scene_id, exc)
        log.info("--retry-failed: %d failed or interrupted scene(s) in the ledger", len(scenes))
        return sorted(scenes, key=lambda s: (s.datetime, s.item_id)), (None, None)
    spec = resolve_catalog(cfg.catalog, collections=tuple(cfg.collections))
    ctx.searched_at = utc_now()
    now = dt.datetime.now(dt.UTC)
    incremental = cfg.since_last_run or _relative(cfg.start)
    if cfg.since_last_run and (last := ctx.ledger.last_search_time()) is not None:
        months, delta = parse_duration(cfg.since_margin, what="since_margin")
        first = shift(last, -months, -delta)
        end = parse_end(cfg.end, now=now)
        log.info("--since-last-run: last run searched at %s; searching from %s", last, first)
    elif cfg.start is not None:
        first, end = parse_period(cfg.start, cfg.end, now=now)
    else:
        raise UsageError(
            f"--since-last-run: no finished run is recorded in {ctx.ledger.path}; "
            "give --start for the first run"
        )
    if end is not None and first > end:
        raise UsageError(f"the search window starts after --end {cfg.end}: nothing to search")
    area = load_aoi(Path(str(cfg.aoi)))  # a bad AOI file is an error even in an incremental run
    try:
        result = search(spec, area, first, end, limit=cfg.limit, allow_local_assets=cfg.allow_local_assets)
    except AOIError:
        if not incremental:
            raise
        log.info("no scene over the AOI in the window %s .. %s: nothing new", first, end or "now")
        return [], (first, end)
    save_scenes(result.scenes, cfg.out / "scenes.parquet")
    return list(result.scenes), (first, end)


def _relative(value: str | None) -> bool:
    from fusarbatch.catalog.dates import is_relative

    return is_relative(value)


def _plan(
    ctx: _Context, scenes: list[Scene], summary: RunSummary
) -> tuple[list[Scene], list[tuple[Scene, str]]]:
    """Split the scenes into those to (re)do and those skipped as done (with the reason). A scene whose
    group name (:attr:`Scene.safe_id`) another scene of the run already uses fails (it would overwrite
    the other's outputs)."""
    ledger = ctx.ledger
    ledger.found(scenes, ctx.run_id)
    to_do: list[Scene] = []
    skipped: list[tuple[Scene, str]] = []
    groups: dict[str, str] = {}
    for scene in scenes:
        owner = groups.setdefault(scene.safe_id, scene.item_id)
        if owner != scene.item_id:
            reason = f"tile: group name {scene.safe_id!r} is already used by scene {owner!r} in this run"
            ledger.scene_failed(scene.item_id, "tile", reason, ctx.run_id)
            summary.scenes.append(SceneOutcome(scene.item_id, status="failed", error=reason))
            continue
        rec = ledger.scene(scene.item_id)
        why = _redo_reason(ctx, rec)
        if why is None:
            skipped.append((scene, f"done by run {rec.run_id}" if rec else "done"))
            continue
        if rec is not None and rec.status != "pending":
            log.info("scene %s: %s", scene.item_id, why, extra={"scene": scene.item_id})
        to_do.append(scene)
    return to_do, skipped


def _redo_reason(ctx: _Context, rec: Any) -> str | None:
    """Why a scene must be (re)done; ``None`` when it is done and can be skipped."""
    if rec is None or rec.status == "pending":
        return "new"
    if ctx.cfg.force:
        return "--force: redoing it"
    if rec.status != "done":
        return f"{rec.status} at {rec.stage} ({rec.reason or 'no reason recorded'}): redoing it"
    if rec.config_hash != ctx.config_hash:
        return f"configuration changed since it was done ({rec.config_hash} -> {ctx.config_hash}): redoing it"
    if rec.model_hash != ctx.model_hash:
        return f"model changed since it was done ({rec.model_hash} -> {ctx.model_hash}): redoing it"
    missing = [p for p in rec.outputs if not (ctx.cfg.out / p).is_file()]
    if missing or not rec.outputs:
        return f"output file(s) missing ({', '.join(missing[:2]) or 'none recorded'}): redoing it"
    out_of_step = outputs_out_of_step(group_attrs(ctx.store / rec.group) or {})
    if out_of_step:
        return f"{out_of_step}: redoing it, so that tiles.zarr and the GeoParquet agree"
    return None


# ---------------------------------------------------------------------------------------------- streaming


#: Every this many scenes, the scheduler drops the task groups the run's span keeps (see _stream).
RELEASE_EVERY = 10
PREFETCH_BATCHES = 2
"""Batches of a scene read and rendered ahead of the model (Dask tasks without the GPU resource)."""


def _stream(ctx: _Context, scenes: list[Scene], summary: RunSummary) -> None:
    """Tile scene n+1 while scene n is inferred; write n; repeat. The graph holds at most two scenes.

    Everything the run sends to Dask is tagged with one span (``distributed.span``): without it the
    scheduler opens a new "default" span per computation and keeps each one, and the workers keep
    metrics per span, for ever; a span also keeps every task group it ever had (distributed documents
    this), so the run drops its finished groups every :data:`RELEASE_EVERY` scenes. The scheduler's
    memory then stays flat whatever the archive size (benchmarks/RESULTS.md, "Archive (issue 5)").
    """
    from distributed import span

    with span(f"fusarbatch-run-{ctx.run_id}") as span_id:
        warm = _warm_models(ctx)  # checked, then dropped, once done (_model_loaded)
        pending: _Pending | None = None
        for i, scene in enumerate(scenes, 1):
            nxt = _tile_and_submit(ctx, scene)
            if pending is not None:
                _finish_and_record(ctx, pending, summary)
                _model_loaded(warm)
            pending = nxt
            if i % RELEASE_EVERY == 0:
                _release_span_groups(ctx.client, span_id)
        if pending is not None:
            _finish_and_record(ctx, pending, summary)
            _model_loaded(warm)
        _release_span_groups(ctx.client, span_id)


def _model_loaded(warm: list[Any]) -> None:
    """After each scene, while warm-up tasks are left: a model that could not be loaded (a
    :class:`ModelError` from the warm-up task, e.g. weights that do not match config.json) ends the run
    with that one line (exit 2) instead of failing every scene the same way. Finished warm-ups are
    dropped from ``warm``."""
    for future in [f for f in warm if f.done()]:
        warm.remove(future)
        if future.status == "error" and isinstance(exc := future.exception(), FusarbatchError):
            warm.clear()
            raise exc


def _warm_models(ctx: _Context) -> list[Any]:
    """Start loading the model on every worker that declares the engine's resources (one task each,
    pinned to it), while the main thread tiles the first scene. A load that fails here also fails the
    scene's model tasks; :func:`_model_loaded` then ends the run with its message. An engine without
    resources (``cfar``) loads nothing."""
    resources = ctx.engine.resources
    if not resources:
        return []
    workers = ctx.client.scheduler_info(n_workers=-1)["workers"]
    gpu_workers = [
        a for a, info in workers.items() if all(info.get("resources", {}).get(r) for r in resources)
    ]
    return [
        ctx.client.submit(
            ctx.engine.warm,
            workers=[address],
            allow_other_workers=False,
            resources=resources,
            pure=False,
            key=f"warm-model-{ctx.run_id}-{n}",
        )
        for n, address in enumerate(gpu_workers)
    ]


def _release_span_groups(client: Any, span_id: str) -> None:
    """Let the scheduler forget the finished task groups of this run's span (a span keeps references to
    every group it had; the groups the scheduler itself has forgotten are dropped). Best effort: on a
    scheduler that cannot run it (another distributed version), nothing happens."""

    def release(dask_scheduler: Any, span_id: str = span_id) -> int:  # runs on the scheduler
        ext = dask_scheduler.extensions.get("spans")
        found = ext.spans.get(span_id) if ext is not None else None
        if found is None:
            return 0
        gone = [tg for tg in found.groups if dask_scheduler.task_groups.get(tg.name) is not tg]
        found.groups.difference_update(gone)
        return len(gone)

    try:
        client.run_on_scheduler(release)
    except Exception as exc:  # never fail a run for this
        log.debug("could not release the span's task groups: %s", exc)


def _finish_and_record(ctx: _Context, p: _Pending, summary: RunSummary) -> None:
    g, n = _finish(ctx, p)
    summary.generate_seconds += g
    summary.prompts += n
    summary.scenes.append(p.outcome)
    p.futures.clear()  # release the results on the cluster


def _stage(ctx: _Context, p: _Pending, stage: str, **fields: Any) -> None:
    p.outcome.stage = stage
    config_hash = ctx.cfg.stage_hash(stage) if stage in ("tile", "features") else ctx.config_hash
    ctx.ledger.stage_started(p.scene.item_id, stage, ctx.run_id, config_hash)
    ctx.notify("stage", {"scene": p.scene.item_id, "stage": stage, **fields})


def _fail(ctx: _Context, p: _Pending, exc: BaseException | str) -> None:
    outcome = p.outcome
    outcome.status = "failed"
    if isinstance(exc, str):
        outcome.error = exc
    elif (full := disk_full(exc, f"the {outcome.stage} stage's files")) is not None:
        outcome.error = full
    else:
        outcome.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not isinstance(exc, FusarbatchError):
            log.debug("scene %s failed", outcome.scene_id, exc_info=exc)
    outcome.error = f"{outcome.stage}: {outcome.error}"
    ctx.ledger.scene_failed(outcome.scene_id, outcome.stage, outcome.error, ctx.run_id)


def _tile_and_submit(ctx: _Context, scene: Scene) -> _Pending:
    cfg = ctx.cfg
    outcome = SceneOutcome(scene.item_id)
    p = _Pending(scene, scene.safe_id, outcome, [], time.perf_counter())
    if ctx.no_worker is not None:
        _fail(ctx, p, f"not tried: {ctx.no_worker}")
        return p
    try:
        t0 = time.perf_counter()
        reuse_tiles = _reusable(ctx, scene, "tile")  # before _stage resets the stage rows
        reuse_features = reuse_tiles and _reusable(ctx, scene, "features")
        _stage(ctx, p, "tile")
        if reuse_tiles:
            outcome.reused.append("tile")
            n_tiles = int(zarr.open_group(str(ctx.store / p.group), mode="r", zarr_format=3).attrs["n_tiles"])
        else:
            _pause_hook_arm("tile", scene.item_id)
            tiled = tile_scene(
                scene,
                ctx.store,
                tile_size=cfg.tile_size,
                overlap=cfg.overlap,
                min_valid=cfg.min_valid,
                aoi=ctx.aoi,
                max_tiles=cfg.max_tiles,
                timeout_s=cfg.task_timeout_s,
            )
            p.group = tiled.group
            if tiled.status != "ok":
                _fail(ctx, p, str(tiled.error))
                return p
            n_tiles = tiled.n_tiles
        outcome.tiles = n_tiles
        ctx.ledger.stage_done(scene.item_id, "tile", time.perf_counter() - t0, reused=bool(reuse_tiles))
        t0 = time.perf_counter()
        _stage(ctx, p, "features")
        g = zarr.open_group(str(ctx.store / p.group), mode="r", zarr_format=3)
        if reuse_features:
            outcome.reused.append("features")
            mask = g["aef_mask"][:]
            outcome.aef_coverage = float(mask.mean()) if mask.size else 0.0
        else:
            # a source that fails (e.g. a COG the index lists is gone) is said once; the run goes on
            feats, ctx.source = write_scene_features_or_empty(
                ctx.store, p.group, ctx.source, n=cfg.anchors, grid=ANCHOR_GRID
            )
            outcome.aef_coverage = feats.coverage
        ctx.ledger.stage_done(
            scene.item_id, "features", time.perf_counter() - t0, reused="features" in outcome.reused
        )
        vf = g["valid_fraction"][:]
        inferable = [int(i) for i in np.flatnonzero(vf >= cfg.min_valid)]
        p.skipped = surface_skips(
            cfg.surface, str(g.attrs["crs"]), g["transform"][:], cfg.tile_size, inferable
        )
        inferable = [i for i in inferable if i not in p.skipped]
        p.skipped.update(prescreen_skips(ctx.client, cfg, str(ctx.store), p.group, inferable))
        inferable = [i for i in inferable if i not in p.skipped]
        outcome.tiles_inferred = len(inferable)
        _stage(ctx, p, "infer", tiles=len(inferable))
        for k, start in enumerate(range(0, len(inferable), cfg.batch_size)):
            batch = inferable[start : start + cfg.batch_size]
            # CPU task (read + render) on a free thread while the model answers the batch before; it
            # waits for the answers of batch k - PREFETCH_BATCHES, so at most that many batches of a
            # scene are prepared ahead (memory stays flat whatever the scene size)
            after = p.futures[k - PREFETCH_BATCHES] if k >= PREFETCH_BATCHES else None
            engine = ctx.engine
            prepared = ctx.client.submit(engine.prepare, str(ctx.store), p.group, batch, after, pure=False)
            p.futures.append(
                ctx.client.submit(engine.answer, prepared, resources=engine.resources, pure=False)
            )
    except Exception as exc:  # one scene's failure never stops the run
        _fail(ctx, p, exc)
        if isinstance(exc, NoWorkerError):
            ctx.no_worker = str(exc)
    return p


def _reusable(ctx: _Context, scene: Scene, stage: str) -> bool:
    """Whether an earlier attempt's ``stage`` can be taken over: done with the same stage hash (ledger),
    and the Zarr group is complete for it (``complete`` / ``aef_complete``) with the same tiling."""
    if ctx.cfg.force or ctx.ledger.stage_hash(scene.item_id, stage) != ctx.cfg.stage_hash(stage):
        return False
    group = ctx.store / scene.safe_id
    attrs = group_attrs(group)
    if attrs is None:
        return False
    missing = missing_arrays(group, attrs) or [
        name for name in (AEF_ARRAYS if stage == "features" else SCENE_ARRAYS) if not (group / name).is_dir()
    ]
    if missing:  # e.g. deleted by hand: tile (or sample) it again instead of failing on it every run
        log.warning(
            "scene %s: tiles.zarr/%s lacks %s; doing its %s again", scene.item_id, group.name, missing, stage
        )
        return False
    same_tiling = (
        attrs.get("complete") is True
        and attrs.get("item_id") == scene.item_id
        and attrs.get("tile_size") == ctx.cfg.tile_size
        and attrs.get("overlap") == ctx.cfg.overlap
        and (attrs.get("clip") or {}).get("aoi_digest") == aoi_digest(ctx.aoi)
    )
    if stage == "features":
        return same_tiling and attrs.get("aef_complete") is True and attrs.get("aef_n") == ctx.cfg.anchors
    return same_tiling


def _finish(ctx: _Context, p: _Pending) -> tuple[float, int]:
    """Collect a scene's answers, write its three tables and quick-look, record it done.
    Returns (generate s, prompts)."""
    from distributed import wait

    cfg, outcome = ctx.cfg, p.outcome
    if outcome.status != "ok":
        _scene_done_event(ctx, p)
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
                f"{len(not_done)} batch(es) not done after {cfg.task_timeout_s:.0f} s "
                "(no worker with the GPU resource, or a hung GPU)"
            ) from None
        for i, fut in enumerate(p.futures):
            res = fut.result()
            generate_s += res.generate_s
            prompts += res.prompts
            answers.update({a.tile_id: a for a in res.answers})
            if i == 0:
                _pause_hook("infer", outcome.scene_id)
        t0 = time.perf_counter()
        ctx.ledger.stage_done(outcome.scene_id, "infer", time.perf_counter() - p.started)
        _stage(ctx, p, "write")
        before = ctx.ledger.scene(outcome.scene_id)
        _write_scene(ctx, p, answers)
        _remove_outputs_moved(cfg.out, before.outputs if before else (), outcome.outputs)
        group = zarr.open_group(str(ctx.store / p.group), mode="r+", zarr_format=3)
        group.attrs[OUTPUTS_MADE_FROM] = {  # what these outputs were made from (outputs_out_of_step)
            "tiling_id": group.attrs.get("tiling_id"),
            "aef_id": group.attrs.get("aef_id"),
            "run_id": ctx.run_id,
        }
        ctx.ledger.scene_done(
            outcome.scene_id,
            ctx.run_id,
            config_hash=ctx.config_hash,
            model_hash=ctx.model_hash,
            outputs=[str(path.relative_to(cfg.out)) for path in outcome.outputs],
            tiles=outcome.tiles,
            tiles_inferred=outcome.tiles_inferred,
            detections=sum(outcome.detections.values()),
            parse_failures=outcome.parse_failures,
            seconds=time.perf_counter() - t0,
        )
        if cfg.prune_tiles:  # outputs written and recorded: the tiles can go (a rerun re-tiles)
            shutil.rmtree(ctx.store / p.group, ignore_errors=True)
    except Exception as exc:  # one scene's failure never stops the run ...
        _fail(ctx, p, exc)
        if isinstance(exc, ModelError):  # ... but a broken model would fail every scene the same way
            _scene_done_event(ctx, p)
            raise
    _scene_done_event(ctx, p)
    return generate_s, prompts


def _scene_done_event(ctx: _Context, p: _Pending) -> None:
    o = p.outcome
    ctx.notify(
        "scene_done",
        {
            "scene": o.scene_id,
            "status": o.status,
            "stage": o.stage,
            "error": o.error,
            "tiles": o.tiles,
            "detections": sum(o.detections.values()),
            "reused": ",".join(o.reused) or None,
            "seconds": round(time.perf_counter() - p.started, 3),
        },
    )


def _write_scene(ctx: _Context, p: _Pending, answers: dict[int, Any]) -> None:
    cfg, store, scene, outcome = ctx.cfg, ctx.store, p.scene, p.outcome
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
        [answers[i].model_labels for i in ids],
        grid=ctx.engine.grid,
        iou_threshold=cfg.iou_threshold,
        answer_scores_per_tile=[answers[i].answer_scores for i in ids],
        min_score=cfg.min_score,
    )
    # scene_detections numbers tiles by position in the list it was given: map back to store tile ids
    detections = [Detection(**{**d.__dict__, "tile_id": ids[d.tile_id]}) for d in detections]
    if ctx.aoi is not None:  # only those whose centre lies in the AOI
        inside = centres_inside(ctx.aoi, crs, [d.geometry_map for d in detections])
        detections = [d for d, keep in zip(detections, inside, strict=True) if keep]
    outcome.detections = Counter(d.label for d in detections)
    # answers with a problem, not problems: a cut answer that does not parse either is one failure
    outcome.parse_failures = sum(len({e.split(": ", 1)[0] for e in a.errors}) for a in answers.values())
    project = MapProjector(crs)
    corners = ((0, 0), (size, 0), (size, size), (0, size))
    footprints = [project.polygon(shapely.Polygon([t.transform @ xy for xy in corners])) for t in tiles]
    per_tile: dict[int, Counter[str]] = {}
    for d in detections:
        per_tile.setdefault(d.tile_id, Counter())[d.label] += 1
    common = {
        "scene_id": scene.item_id,
        "datetime": scene.datetime,
        "model_id": ctx.model_id,
        "run_id": ctx.run_id,
    }
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
            "reason": None if ans else p.skipped.get(i, f"valid_fraction below min_valid {cfg.min_valid}"),
            "geometry": footprints[i],
        }
        for label in cfg.labels:
            row[count_column(label)] = per_tile.get(i, Counter())[label] if ans else None
        tile_rows.append(row)
    inferred_area = shapely.union_all([footprints[i] for i in ids]) if ids else shapely.Polygon()
    if ctx.aoi is not None:  # counts cover the inferred part of the AOI
        inferred_area = shapely.intersection(inferred_area, ctx.aoi)
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
            "model_label": d.model_label,
            "score": d.score,
            "answer_score": d.answer_score,
            "geometry": d.geometry,
        }
        for d in detections
    ]
    # every file is written to a temporary name first, and renamed into place only when all are: a
    # failure (a full disk) leaves the last good outputs of the scene as they were, none replaced
    out = cfg.out
    staged: list[tuple[Path, Path]] = []
    quicklook = out / "quicklooks" / f"{p.group}.png"
    try:
        write_table(det_rows, out, "detections", scene.datetime, p.group, staged=staged)
        write_table(tile_rows, out, "tiles", scene.datetime, p.group, staged=staged)
        write_table(count_rows, out, "counts", scene.datetime, p.group, staged=staged)
        if cfg.quicklooks:
            write_quicklook(
                store,
                p.group,
                [d.geometry_map for d in detections],
                quicklook,
                aoi_map=None if ctx.aoi is None else _aoi_map(ctx.aoi, g),
                staged=staged,
            )
        publish_staged(staged[:1])
        _pause_hook("write", outcome.scene_id)
        publish_staged(staged[1:])
    finally:
        discard_staged(staged)
    outcome.outputs = [final for _, final in staged]
    if not cfg.quicklooks:
        quicklook.unlink(missing_ok=True)  # outputs equal a run made with this configuration


def _aoi_map(aoi: Any, g: Any) -> Any:
    """The AOI within the scene, in the scene CRS (for the quick-look)."""
    height, width = (int(v) for v in g.attrs["scene_shape"])
    return aoi_in_map(aoi, str(g.attrs["crs"]), Affine(*g.attrs["scene_transform"]), height, width)


def _remove_outputs_moved(out: Path, before: Sequence[str], now: Sequence[Path]) -> None:
    """Delete the files an earlier attempt wrote that this one did not replace (the acquisition date,
    hence the partition, changed in the catalog; or quick-looks were switched off)."""
    keep = {str(p.relative_to(out)) for p in now}
    for rel in before:
        if rel not in keep:
            (out / rel).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- leftovers

_TMP_FILE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)$")
_ZARR_LEFTOVER = re.compile(r"^\..+\.(?:partial|old)-(?P<pid>\d+)$")


def sweep_leftovers(out: Path) -> list[str]:
    """Delete what killed runs left behind: temporary output files (``.<name>.tmp-<pid>``, written by
    :func:`~fusarbatch.outputs.geoparquet.write_table` and the quick-look writer) and partial or old Zarr
    scene groups (``tiles.zarr/.<group>.partial-<pid>`` / ``.old-<pid>``) of processes that are gone, and
    Zarr's own temporary metadata files (``tiles.zarr/zarr.<uuid>.partial``, in the store root, a group or
    an array: :func:`~fusarbatch.outputs.zarr_temp_files`; the caller holds the run lock, so no writer
    is left). Returns the paths removed, relative to ``out``."""
    removed: list[str] = []
    for path in zarr_temp_files(out / "tiles.zarr"):
        path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(out)))
    candidates: list[tuple[Path, re.Pattern[str]]] = []
    for kind in (*KINDS, "quicklooks"):
        base = out / kind
        if base.is_dir():
            candidates += [(p, _TMP_FILE) for p in base.rglob(".*") if p.is_file()]
    store = out / "tiles.zarr"
    if store.is_dir():
        candidates += [(p, _ZARR_LEFTOVER) for p in store.iterdir() if p.name.startswith(".")]
    candidates += [(p, _TMP_FILE) for p in out.glob(".*.tmp") if p.is_file()]  # scenes.parquet (mkstemp)
    for path, pattern in candidates:
        match = pattern.match(path.name)
        if match is None and not path.name.endswith(".tmp"):
            continue
        if match is not None and not left_by_gone_process(int(match["pid"])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(str(path.relative_to(out)))
    return sorted(removed)


# ------------------------------------------------------------------------------------------ test hook

_pause_counts: Counter[str] = Counter()
_tile_pause_armed: list[str] = []


def _pause_spec() -> tuple[str, int] | None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    return point.strip(), int(nth or 1)


def _pause_hook(point: str, scene: str) -> None:
    """The test hook (module docstring): pause here the n-th time ``point`` is reached."""
    spec = _pause_spec()
    if spec is None or spec[0] != point:
        return
    _pause_counts[point] += 1
    if _pause_counts[point] == spec[1]:
        _pause_here(point, scene)


def _pause_here(point: str, scene: str) -> None:
    path = Path(os.environ[PAUSE_FILE_ENV])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "point": point, "scene": scene}))
    os.replace(tmp, path)
    log.warning("test hook %s=%s: paused at %s of scene %s", PAUSE_ENV, point, point, scene)
    deadline = time.monotonic() + 600
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _pause_hook_arm(point: str, scene: str) -> None:
    """For ``tile``: count the scene here, and arm the worker plugin when it is the n-th."""
    spec = _pause_spec()
    if spec is None or spec[0] != point:
        return
    _pause_counts[point] += 1
    if _pause_counts[point] == spec[1]:
        _tile_pause_armed.append(scene)


class _PauseInTiling(WorkerPlugin):
    """Worker plugin behind the ``tile`` pause point: when the first store task of the armed scene's tile
    graph has written its tiles, pause (the worker's event loop, so no other task completes)."""

    name = "fusarbatch-test-pause"

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        name = key[0] if isinstance(key, tuple) else str(key)
        if finish == "memory" and str(name).startswith("store-map") and _tile_pause_armed:
            _pause_here("tile", _tile_pause_armed.pop())


def _arm_tile_pause(client: Any, cluster: Any) -> None:
    """Register :class:`_PauseInTiling` (LocalCluster only; nothing when the hook is unset)."""
    spec = _pause_spec()
    if spec is None or spec[0] != "tile" or cluster is None:
        return
    client.register_plugin(_PauseInTiling())
