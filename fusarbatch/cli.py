"""The ``fusarbatch`` command line (Typer). Each command parses its arguments and calls one library
function; no logic lives here. Errors a user can cause print one line and exit non-zero
(:mod:`fusarbatch.errors`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fusarbatch import __version__
from fusarbatch.errors import FusarbatchError, UsageError

app = typer.Typer(
    name="fusarbatch",
    help="Batch FUSAR-GPT over SAR archives: STAC search -> Zarr tiles -> AlphaEarth anchors -> GeoParquet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _path(value: str) -> Path:
    """A path option's value; an empty one is refused (``Path("")`` would be the current folder)."""
    if not value.strip():
        raise typer.BadParameter("empty; give a path")
    return Path(value)


# Options shared by several commands, defined once.
AoiOpt = Annotated[
    Path,
    typer.Option(
        "--aoi", parser=_path, help="AOI GeoJSON file: Feature, FeatureCollection or bare geometry, any CRS."
    ),
]
StartOpt = Annotated[
    str,
    typer.Option(
        "--start", help="First day, UTC: YYYY-MM (whole month), YYYY-MM-DD, or back from now: -P2D, -PT36H."
    ),
]
EndOpt = Annotated[
    str | None, typer.Option("--end", help="Last day, inclusive, UTC: YYYY-MM or YYYY-MM-DD. Default: open.")
]
CatalogOpt = Annotated[
    str | None,
    typer.Option(
        "--catalog",
        help="Catalog name (catalogs/*.toml), STAC API URL, catalog.json or .parquet "
        "(default: demo, the embedded demo catalog).",
    ),
]
CollectionOpt = Annotated[
    list[str] | None, typer.Option("--collection", help="Collection id to search (repeatable).")
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="At most this many scenes.")]
LocalAssetsOpt = Annotated[
    bool,
    typer.Option(
        "--allow-local-assets", help="Read assets that a remote (http/https) catalog names as local files."
    ),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"fusarbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """fusarbatch: FUSAR-GPT batch inference over SAR archives."""


@app.command()
def search(
    aoi: AoiOpt,
    start: StartOpt,
    end: EndOpt = None,
    catalog: CatalogOpt = None,
    collection: CollectionOpt = None,
    limit: LimitOpt = None,
    save: Annotated[
        Path | None,
        typer.Option("--save", parser=_path, help="Write the scenes as stac-geoparquet to this file."),
    ] = None,
    allow_local_assets: LocalAssetsOpt = False,
) -> None:
    """Search a STAC catalog for SAR scenes over an AOI and print them."""
    from fusarbatch.catalog import search_scenes
    from fusarbatch.report import print_scenes

    result = search_scenes(
        aoi=aoi,
        start=start,
        end=end,
        catalog=catalog,
        collections=tuple(collection or ()),
        limit=limit,
        save=save,
        allow_local_assets=allow_local_assets,
    )
    print_scenes(console, result)


@app.command()
def tile(
    aoi: AoiOpt,
    start: StartOpt,
    out: Annotated[
        Path,
        typer.Option("--out", parser=_path, help="Output folder: scenes.parquet and tiles.zarr go here."),
    ],
    end: EndOpt = None,
    catalog: CatalogOpt = None,
    collection: CollectionOpt = None,
    limit: LimitOpt = None,
    tile_size: Annotated[int, typer.Option("--tile-size", min=28, help="Tile edge in pixels.")] = 504,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Overlap between tiles in pixels.")] = 56,
    whole_scenes: Annotated[
        bool, typer.Option("--whole-scenes", help="Tile whole scenes (default: only around the AOI).")
    ] = False,
    max_tiles: Annotated[
        int, typer.Option("--max-tiles", min=1, help="Most tiles per scene (a bigger raster is refused).")
    ] = 100_000,
    allow_local_assets: LocalAssetsOpt = False,
) -> None:
    """Search, then tile every scene (the tiles the AOI needs) into <out>/tiles.zarr (DESIGN 3.2)."""
    from fusarbatch.catalog import load_aoi, search_scenes
    from fusarbatch.outputs.ledger import prepare_out
    from fusarbatch.report import print_line, print_scenes, print_tiling
    from fusarbatch.tiling import tile_scenes
    from fusarbatch.tiling.grid import validate_tiling

    validate_tiling(tile_size, overlap)
    prepare_out(out)  # writable, and no symbolic link where it writes

    result = search_scenes(
        aoi=aoi,
        start=start,
        end=end,
        catalog=catalog,
        collections=tuple(collection or ()),
        limit=limit,
        save=out / "scenes.parquet",
        allow_local_assets=allow_local_assets,
    )
    print_scenes(console, result)
    clip = None if whole_scenes else load_aoi(aoi).geometry
    results = tile_scenes(
        result.scenes, out / "tiles.zarr", tile_size=tile_size, overlap=overlap, aoi=clip, max_tiles=max_tiles
    )
    print_tiling(console, results, out / "tiles.zarr")
    if (out / "ledger.sqlite").exists():  # a run folder: its GeoParquet was made from the old groups
        print_line(
            console,
            "note: this folder holds the outputs of `fusarbatch run`; the scenes tiled here are redone by "
            "its next run, so that tiles.zarr and the GeoParquet agree (`fusarbatch status` lists them)",
        )
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


# `run` takes every RunConfig field as a flag (tests/test_ops.py checks it); None = not given, so that
# --config FILE values and the defaults apply (flags > file > defaults).
_RUN_FLAG_FIELDS = {"collection": "collections", "label": "labels", "class_": "classes"}


def _run_overrides(params: dict[str, object]) -> dict[str, object]:
    """``run`` parameters -> RunConfig overrides (lists to tuples, empty lists to not given)."""
    overrides: dict[str, object] = {}
    for name, value in params.items():
        if name == "config":
            continue
        if isinstance(value, list | tuple):  # typer gives lists, a bare click context tuples
            value = tuple(value) or None
        overrides[_RUN_FLAG_FIELDS.get(name, name)] = value
    return overrides


@app.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", parser=_path, help="TOML file with any of these options (flags win)."),
    ] = None,
    aoi: Annotated[
        Path | None,
        typer.Option("--aoi", parser=_path, help="AOI GeoJSON file: Feature, FeatureCollection or geometry."),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option("--start", help="First day, UTC: YYYY-MM, YYYY-MM-DD, or back from now: -P2D, -PT36H."),
    ] = None,
    end: Annotated[str | None, typer.Option("--end", help="Last day, inclusive (same forms).")] = None,
    catalog: CatalogOpt = None,
    collection: CollectionOpt = None,
    limit: LimitOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", parser=_path, help="Output folder (default: out).")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            parser=_path,
            help="Model directory, or a FUSAR-GPT checkpoint (TLM + LoRA) on top of --base-model "
            "(default: the packaged demo model).",
        ),
    ] = None,
    base_model: Annotated[
        Path | None,
        typer.Option("--base-model", parser=_path, help="Base Qwen2.5-VL directory of a checkpoint --model."),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="hf (FUSAR-GPT through transformers, default), vllm (the same model served by vLLM; "
            "extra fusarbatch[vllm]) or cfar (two-parameter CA-CFAR ship detector on the CPU: detection "
            "and counting, no model, no GPU).",
        ),
    ] = None,
    cfar_guard_m: Annotated[
        float | None, typer.Option("--cfar-guard-m", help="--engine cfar: guard window, metres (800).")
    ] = None,
    cfar_background_m: Annotated[
        float | None,
        typer.Option("--cfar-background-m", help="--engine cfar: background window, metres (1600)."),
    ] = None,
    cfar_k: Annotated[
        float | None, typer.Option("--cfar-k", help="--engine cfar: threshold in background std (4).")
    ] = None,
    cfar_min_area_m2: Annotated[
        float | None,
        typer.Option("--cfar-min-area-m2", help="--engine cfar: smallest detection, square metres (2000)."),
    ] = None,
    aef_index: Annotated[
        str | None,
        typer.Option("--aef-index", help="AlphaEarth index (GeoParquet/CSV), local or fsspec URL."),
    ] = None,
    anchors: Annotated[int | None, typer.Option("--anchors", help="N for an N x N anchor grid (8).")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Object label to detect (repeatable).")
    ] = None,
    class_: Annotated[
        list[str] | None, typer.Option("--class", help="Tile class to ask about (repeatable).")
    ] = None,
    tile_size: Annotated[int | None, typer.Option("--tile-size", help="Tile edge, pixels (504).")] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", help="Tile overlap, pixels (56).")] = None,
    min_valid: Annotated[
        float | None, typer.Option("--min-valid", help="Tiles with less valid data are not inferred.")
    ] = None,
    whole_scenes: Annotated[
        bool | None,
        typer.Option("--whole-scenes", help="Tile and infer whole scenes (default: only around the AOI)."),
    ] = None,
    surface: Annotated[
        str | None,
        typer.Option(
            "--surface",
            help="sea: skip tiles entirely on land; land: skip tiles entirely at sea; any (default).",
        ),
    ] = None,
    prune_tiles: Annotated[
        bool | None,
        typer.Option("--prune-tiles", help="Delete a scene's tiles once its outputs are written."),
    ] = None,
    prescreen: Annotated[
        str | None,
        typer.Option("--prescreen", help="cfar: infer only tiles where CFAR finds a candidate (none)."),
    ] = None,
    prescreen_k: Annotated[
        float | None, typer.Option("--prescreen-k", help="--prescreen cfar threshold (2.5, chosen on SSDD).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Tiles per generate call (8).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option("--max-new-tokens", help="Generation budget per prompt (128).")
    ] = None,
    iou_threshold: Annotated[float | None, typer.Option("--iou-threshold", help="Cross-tile NMS.")] = None,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", help="Drop boxes scored below this (0..1) before NMS and counts (0)."),
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option("--scheduler", help="Dask scheduler address (default: a LocalCluster).")
    ] = None,
    scheduler_timeout_s: Annotated[
        float | None, typer.Option("--scheduler-timeout", help="Seconds to reach --scheduler (20).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="LocalCluster model workers, one per GPU (1).")
    ] = None,
    dashboard: Annotated[
        bool | None,
        typer.Option("--dashboard", help="Serve the LocalCluster's Dask dashboard on 127.0.0.1 (off)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cuda or cpu (default: cuda if present).")
    ] = None,
    require_gpu: Annotated[
        bool | None,
        typer.Option("--require-gpu", help="Fail when no GPU is visible instead of using the CPU."),
    ] = None,
    task_timeout_s: Annotated[
        float | None,
        typer.Option(
            "--task-timeout",
            help="Seconds before one batch (or tiling without a live worker) counts as hung.",
        ),
    ] = None,
    max_tiles: Annotated[
        int | None, typer.Option("--max-tiles", help="Most tiles per scene (100000); more is refused.")
    ] = None,
    allow_local_assets: Annotated[
        bool | None,
        typer.Option("--allow-local-assets", help="Read local assets named by a remote catalog (off)."),
    ] = None,
    quicklooks: Annotated[
        bool | None, typer.Option("--quicklooks/--no-quicklooks", help="PNG per scene (on).")
    ] = None,
    since_last_run: Annotated[
        bool | None,
        typer.Option("--since-last-run", help="Search from the last finished run on (--start: first run)."),
    ] = None,
    since_margin: Annotated[
        str | None, typer.Option("--since-margin", help="Searched again before the last run (P1D).")
    ] = None,
    retry_failed: Annotated[
        bool | None, typer.Option("--retry-failed", help="Only retry the ledger's failed scenes.")
    ] = None,
    force: Annotated[bool | None, typer.Option("--force", help="Redo scenes even when done.")] = None,
    wait: Annotated[
        bool | None, typer.Option("--wait", help="Wait for a run holding --out instead of exiting 75.")
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option("--log-file", parser=_path, help="Append JSON-lines logs here.")
    ] = None,
) -> None:
    """Search, tile, attach AlphaEarth anchors, run FUSAR-GPT (or --engine cfar) and write GeoParquet.

    Skips scenes done with the same configuration and model (ledger.sqlite); exit codes: 0 all done,
    1 some scenes failed, 2 usage error, 75 --out locked by another run, 130 interrupted.
    """
    params = dict(locals())  # first: the options only
    import signal

    from fusarbatch.config import load_config
    from fusarbatch.outputs.ledger import RunLock, new_run_id, prepare_out
    from fusarbatch.report import set_log_context, setup_run_logging

    cfg = load_config(config, _run_overrides(params))
    if cfg.engine == "vllm":  # before anything is written: exit 2 naming the extra
        from fusarbatch.engines.vllm_engine import require_vllm

        require_vllm()
    setup_run_logging(json_lines=not err_console.is_terminal, log_file=cfg.log_file)
    run_id = new_run_id()
    set_log_context(run_id=run_id)
    prepare_out(cfg.out)
    lock = RunLock(cfg.out).acquire(wait=cfg.wait, run_id=run_id)  # before the heavy imports: exit 75 at once

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # systemd/cron stop: the ledger records the run as interrupted

    signal.signal(signal.SIGTERM, _terminate)
    try:
        from fusarbatch.pipeline import run as run_pipeline
        from fusarbatch.report import RunProgress, print_run_summary, route_library_logs

        route_library_logs()
        with RunProgress(console) as progress:
            summary = run_pipeline(cfg, progress, lock=lock, run_id=run_id)
    finally:
        lock.release()
    print_run_summary(console, summary)
    if summary.failed:
        raise typer.Exit(1)


config_app = typer.Typer(help="The configuration of `fusarbatch run`.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_show(ctx: typer.Context) -> None:
    """Print, as TOML, the configuration `fusarbatch run` would use with the same options (every `run`
    option is accepted: defaults <- --config FILE <- flags). The output reads back with --config."""
    from fusarbatch.config import load_config, to_toml

    command = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    with command.make_context("fusarbatch config show", list(ctx.args)) as sub:
        params = dict(sub.params)
    cfg = load_config(params.pop("config"), _run_overrides(params))
    sys.stdout.write(to_toml(cfg))


@app.command()
def status(
    out: Annotated[Path, typer.Option("--out", parser=_path, help="Output folder of `fusarbatch run`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    runs: Annotated[int, typer.Option("--runs", min=1, help="How many recent runs to list.")] = 5,
) -> None:
    """Ledger of an output folder: scenes per stage and status, failures with reasons, last runs, the lock,
    and the outputs on disk (checked against the ledger)."""
    import json

    from fusarbatch.outputs.ledger import collect_status
    from fusarbatch.report import print_status

    info = collect_status(out, runs=runs)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
    else:
        print_status(console, info)


@app.command()
def features(
    out: Annotated[Path, typer.Option("--out", parser=_path, help="Output folder holding tiles.zarr.")],
    aef_index: Annotated[
        str | None,
        typer.Option("--aef-index", help="AlphaEarth index (GeoParquet/CSV), local or fsspec URL."),
    ] = None,
    anchors: Annotated[int, typer.Option("--anchors", min=1, max=64, help="N for an N x N anchor grid.")] = 8,
) -> None:
    """Sample AlphaEarth anchors for every complete scene of <out>/tiles.zarr (DESIGN 3.3).

    Unlike ``run`` (which goes on with empty anchors and says so once), an --aef-index that cannot be
    read is an error here, before any scene group is touched: exit 2.
    """
    from fusarbatch.features import AEFUnavailable, compute_features, open_source
    from fusarbatch.pipeline import ANCHOR_GRID
    from fusarbatch.report import print_features

    try:
        source = open_source(aef_index, on_unavailable="raise")
    except AEFUnavailable as exc:
        raise UsageError(f"--aef-index: {exc}") from None
    results = compute_features(out / "tiles.zarr", source, n=anchors, grid=ANCHOR_GRID)
    print_features(console, results)


DataOpt = Annotated[list[Path], typer.Option("--data", help="Triplet manifest (JSON Lines; repeatable).")]


@app.command()
def train(
    stage: Annotated[
        int,
        typer.Option(
            "--stage",
            min=0,
            max=2,
            help="0: all parameters of a small base (not in the paper); 1: captions + TLM; 2: tasks, LoRA.",
        ),
    ],
    data: DataOpt,
    base_model: Annotated[
        Path, typer.Option("--base-model", help="Qwen2.5-VL model directory (frozen in stages 1-2).")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder: checkpoints, final model, log, loss.png.")
    ],
    init: Annotated[
        Path | None, typer.Option("--init", help="Stage-1 output to start from (required for stage 2).")
    ] = None,
    stage1_lora: Annotated[
        bool,
        typer.Option("--stage1-lora/--no-stage1-lora", help="Stage 1 also trains LoRA (official code)."),
    ] = True,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Default: 10 (stage 0), 30 (stage 1), 5 (stage 2).")
    ] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Overrides --epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Default: 1e-3 (0), 1e-4 (1), 1e-5 (2).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1)] = 4,
    warmup: Annotated[float, typer.Option("--warmup", help="Warm-up share of the steps.")] = 0.05,
    save_steps: Annotated[int, typer.Option("--save-steps", min=0, help="Checkpoint every N steps.")] = 500,
    log_steps: Annotated[int, typer.Option("--log-steps", min=1)] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 42,
    lora_r: Annotated[int, typer.Option("--lora-r", min=1)] = 8,
    max_length: Annotated[int, typer.Option("--max-length", min=16)] = 2048,
    no_tlm: Annotated[bool, typer.Option("--no-tlm", help="Train without the TLM (no anchors).")] = False,
    tlm_zero_init: Annotated[
        bool, typer.Option("--tlm-zero-init", help="A new TLM starts as the identity (last layer zeroed).")
    ] = False,
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu.")] = None,
    loss_mean: Annotated[
        str | None,
        typer.Option(
            "--loss-mean", help="token or answer (each record weighs the same). Default: answer in stage 0."
        ),
    ] = None,
    target_loss_weight: Annotated[
        float,
        typer.Option(
            "--target-loss-weight", min=0.0, help="Stage 0: dense target loss on the visual tokens."
        ),
    ] = 0.0,
    spread_loss_weight: Annotated[
        float,
        typer.Option("--spread-loss-weight", min=0.0, help="Stage 0: keep the visual tokens centred."),
    ] = 0.0,
    probe_loss_weight: Annotated[
        float,
        typer.Option(
            "--probe-loss-weight",
            min=0.0,
            help="Stage 0: image probe (cells, count, class) on the pooled visual tokens.",
        ),
    ] = 0.0,
    position_loss_weight: Annotated[
        float,
        typer.Option(
            "--position-loss-weight",
            min=0.0,
            help="Stage 0: the language model's early layers must read each visual token's row and column.",
        ),
    ] = 0.0,
    freeze_language_model: Annotated[
        bool,
        typer.Option("--freeze-language-model", help="Stage 0: train the vision tower and merger only."),
    ] = False,
    task: Annotated[
        list[str] | None, typer.Option("--task", help="Train only on records of this task (repeatable).")
    ] = None,
    vision_only: Annotated[
        bool,
        typer.Option(
            "--vision-only",
            help="Stage 0: the vision tower alone on the target/probe losses (no language model run).",
        ),
    ] = False,
    freeze_vision: Annotated[
        bool,
        typer.Option("--freeze-vision", help="Stage 0: train the language model only (after --vision-only)."),
    ] = False,
) -> None:
    """Train FUSAR-GPT stage 0, 1 or 2 on triplet manifests (DESIGN 4)."""
    from training.train import TrainConfig
    from training.train import train as run_training

    result = run_training(
        TrainConfig(
            stage=stage,
            data=list(data),
            base_model=base_model,
            out=out,
            init=init,
            stage1_lora=stage1_lora,
            epochs=epochs,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup=warmup,
            save_steps=save_steps,
            log_steps=log_steps,
            resume=resume,
            seed=seed,
            lora_r=lora_r,
            max_length=max_length,
            no_tlm=no_tlm,
            tlm_zero_init=tlm_zero_init,
            device=device,
            loss_mean=loss_mean,
            target_loss_weight=target_loss_weight,
            spread_loss_weight=spread_loss_weight,
            probe_loss_weight=probe_loss_weight,
            position_loss_weight=position_loss_weight,
            freeze_language_model=freeze_language_model,
            tasks=list(task) if task else None,
            vision_only=vision_only,
            freeze_vision=freeze_vision,
        )
    )
    console.print(
        f"stage {stage}: {result.steps} steps on {result.records} records in {result.wall_s:.0f} s, "
        f"final loss {result.final_loss}; model in {result.out}",
        highlight=False,
        markup=False,
    )


@app.command(name="eval")
def evaluate(
    data: DataOpt,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Training output or full model directory (not with --engine cfar)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Default: ./eval_<model folder name> (_no_tlm), ./eval_cfar."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine", help="hf (the model, default), or cfar: the CFAR detector alone (no model)."
        ),
    ] = "hf",
    train_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--train-data",
            help="Training manifest (repeatable): source of the majority and median-box baselines "
            "(default: the evaluated records).",
        ),
    ] = None,
    min_score: Annotated[
        float,
        typer.Option("--min-score", min=0.0, max=1.0, help="Box score threshold, as run --min-score (0)."),
    ] = 0.0,
    base_model: Annotated[
        Path | None, typer.Option("--base-model", help="Base model (default: recorded by training).")
    ] = None,
    no_tlm: Annotated[bool, typer.Option("--no-tlm", help="Switch the TLM off (ablation).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 8,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N records per task.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Only this task (repeatable).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu.")] = None,
    cfar_guard: Annotated[
        int | None, typer.Option("--cfar-guard", help="CFAR guard window, pixels of the images (odd).")
    ] = None,
    cfar_background: Annotated[
        int | None, typer.Option("--cfar-background", help="CFAR background window, pixels (odd).")
    ] = None,
    cfar_k: Annotated[float | None, typer.Option("--cfar-k", help="CFAR threshold on the statistic.")] = None,
) -> None:
    """Score a model (or CFAR) on triplet manifests with the paper's metrics, beside the baselines
    (majority answers, median box, shuffled images, CFAR); writes metrics.json, metrics.md and
    predictions.jsonl."""
    import dataclasses

    from fusarbatch.engines.cfar import CHIP_PARAMS
    from training.evaluate import EvalConfig, evaluate_and_report

    cfar_options = {"guard": cfar_guard, "background": cfar_background, "k": cfar_k}
    try:
        cfar = dataclasses.replace(CHIP_PARAMS, **{k: v for k, v in cfar_options.items() if v is not None})
    except ValueError as exc:
        raise UsageError(f"--cfar-*: {exc}") from None
    console.print(
        evaluate_and_report(
            EvalConfig(
                model=model,
                data=list(data),
                out=out,
                base_model=base_model,
                no_tlm=no_tlm,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                limit=limit,
                tasks=task,
                device=device,
                engine=engine,
                train_data=list(train_data) if train_data else None,
                min_score=min_score,
                cfar=cfar,
            )
        ),
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


def main() -> None:
    """Console-script entry point: runs the app, turning :class:`FusarbatchError` into one line."""
    from fusarbatch.report import PlainFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(PlainFormatter("%(levelname)s: %(message)s"))
    logging.getLogger("fusarbatch").addHandler(handler)
    logging.getLogger("fusarbatch").setLevel(logging.INFO)
    try:  # typer >= 0.26 vendors click; older ones use click itself
        from typer._click import exceptions as click_exceptions
    except ImportError:  # pragma: no cover
        import click.exceptions as click_exceptions  # type: ignore[no-redef]

    if sys.argv[1:2] == ["run"] and not err_console.is_terminal:
        from fusarbatch.report import json_errors_from_start

        json_errors_from_start()
    try:
        code = app(standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:  # `fusarbatch`, `fusarbatch config`: their help
        console.print(exc.ctx.get_help() if exc.ctx else str(exc), highlight=False, markup=False)
        sys.exit(0)
    except click_exceptions.UsageError as exc:  # one line, as every other error (not click's framed box)
        from fusarbatch.report import print_error

        command = exc.ctx.command_path if exc.ctx is not None else "fusarbatch"
        print_error(err_console, UsageError(f"{exc.format_message()} (see `{command} --help`)"), 2)
        sys.exit(2)
    except typer.Abort:
        err_console.print("interrupted")
        sys.exit(130)
    except FusarbatchError as exc:
        from fusarbatch.report import print_error

        print_error(err_console, exc, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
