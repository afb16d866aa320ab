"""``python -m training``: dataset building, tiny base models and model export (the helpers around
``fusarbatch train`` / ``fusarbatch eval``)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fusarbatch.errors import FusarbatchError

app = typer.Typer(
    name="training",
    help="FUSAR-GPT training helpers: build triplet datasets, a tiny base model, export a merged model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

BASE_PRESETS: dict[str, dict[str, Any]] = {
    # the tests' tiny model (STACK section 2): 0.26 M parameters
    "test": {},
    # the shipped demo model: sized so that stages 1 + 2 fit in ~30 min on 2 CPU cores (training/RESULTS.md)
    "demo": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "vision_hidden_size": 64,
        "vision_intermediate_size": 128,
        "vision_depth": 4,
        "vision_heads": 4,
        "init_std": 0.02,
        "embed_std": 0.15,
        "vocab_size": 1000,
        # M-RoPE that lets a 12 x 12-token image's rows and columns be told apart: Qwen's theta 1e4 with
        # head size 32 turns the width section by at most 0.04 rad across a row (training/RESULTS.md)
        "rope_theta": 10.0,
        "mrope_section": [2, 7, 7],
    },
}
"""Tiny Qwen2.5-VL configurations for :func:`fusarbatch.model.build_tiny_model`."""


@app.command()
def build(
    source: Annotated[Path, typer.Argument(help="Labelled chips: a Pascal VOC folder or class folders.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (images/, stage*_<split>.jsonl).")],
    kind: Annotated[str, typer.Option("--kind", help="voc, folders or auto.")] = "auto",
    name: Annotated[str | None, typer.Option("--name", help="Source name in ids (default: folder).")] = None,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="caption, counting, grounding, classification, detection (repeatable)."),
    ] = None,
    class_map: Annotated[
        Path | None, typer.Option("--class-map", help="classes.json: VOC/folder names -> class names.")
    ] = None,
    coarse: Annotated[str | None, typer.Option("--coarse", help="Category for detection/counting.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=1.0)] = 0.2,
    augment: Annotated[str, typer.Option("--augment", help="none or dihedral (train split).")] = "none",
    max_per_class: Annotated[int | None, typer.Option("--max-per-class", min=1)] = None,
    split: Annotated[
        list[str] | None,
        typer.Option("--split", help="Split to write (repeatable): train, val, test, ... Default: all."),
    ] = None,
    grid: Annotated[
        int, typer.Option("--grid", help="Model input and box grid side in pixels (multiple of 28).")
    ] = 504,
) -> None:
    """Render labelled chips and write triplet manifests for every task (training/builders.py)."""
    from training.builders import TASK_NAMES, build_dataset

    summary = build_dataset(
        source,
        out,
        kind=kind,
        name=name,
        tasks=tuple(task) if task else ("caption", *TASK_NAMES),
        class_map=class_map,
        coarse=coarse,
        val_fraction=val_fraction,
        augment=augment,
        max_per_class=max_per_class,
        splits=tuple(split) if split else None,
        grid=grid,
    )
    typer.echo(f"{summary.images} image(s) rendered into {summary.out}")
    for fname, counts in summary.manifests.items():
        typer.echo(f"  {fname}: {sum(counts.values())} records {counts}")


@app.command()
def generated(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    n_train: Annotated[int, typer.Option("--n-train", min=1)] = 256,
    n_val: Annotated[int, typer.Option("--n-val", min=1)] = 128,
    image_size: Annotated[int, typer.Option("--image-size", min=28)] = 504,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a generated task whose answer depends only on the anchors (training/synthetic.py)."""
    from training.synthetic import build_generated_anchor_task

    paths = build_generated_anchor_task(out, n_train=n_train, n_val=n_val, image_size=image_size, seed=seed)
    for split, path in paths.items():
        typer.echo(f"{split}: {path}")


BASE_INFO_FILE = "fusarbatch_base.json"
"""What ``base`` writes beside the model: an ``--out`` holding it may be replaced by a new ``base``."""


def _remove_stale_builds(target: Path) -> None:
    """Remove the ``.NAME.tmp-PID`` (and ``.NAME.tmp-PID-old``) folders next to ``target`` left by a ``base``
    that was killed: those whose process is gone, and this process's own; a live build's stay."""
    import os
    import re

    from training.staging import process_alive

    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)(-old)?")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return  # no parent folder yet (created below) or unreadable: nothing of ours there
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(found.group(1))
        if pid == os.getpid() or not process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _base_target(out: Path) -> Path:
    """The real path ``base`` writes to, or a one-line :class:`UsageError` for an ``--out`` it must not
    replace: a symbolic link, the current folder or one above it, a file, or a folder that is neither empty
    nor a model written by an earlier ``base`` (holding :data:`BASE_INFO_FILE`)."""
    from fusarbatch.errors import UsageError

    if out.is_symlink():
        raise UsageError(
            f"--out {out}: a symbolic link; give the folder it should be written to (a new or empty one, "
            "or an earlier base model), not a link"
        )
    try:
        target = out.resolve()
        here = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop among the parents
        raise UsageError(f"--out {out}: cannot resolve the path ({exc}); choose another --out") from None
    if target == here or target in here.parents:
        raise UsageError(
            f"--out {out}: the current folder or one above it ({target}); give a new folder for the model"
        )
    if not target.exists():
        return target
    if not target.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another --out")
    try:
        names = {p.name for p in target.iterdir()}
    except OSError as exc:
        raise UsageError(
            f"--out {out}: cannot read the folder ({exc.strerror or exc}); choose another --out"
        ) from None
    if names and BASE_INFO_FILE not in names:
        raise UsageError(
            f"--out {out}: a folder that holds other files (it is neither empty nor a base model with "
            f"{BASE_INFO_FILE}); nothing was replaced; give a new or empty folder"
        )
    return target


@app.command()
def base(
    out: Annotated[Path, typer.Option("--out", help="Folder for the base model.")],
    preset: Annotated[str, typer.Option("--preset", help="demo or test.")] = "demo",
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1)] = 0,
) -> None:
    """Write a tiny, randomly initialised Qwen2.5-VL base model (offline; fusarbatch/model/tiny.py). Built
    under a temporary name next to ``--out``, then renamed: a failed build leaves no half-written model. An
    existing ``--out`` is replaced only when it is empty or an earlier base model (fusarbatch_base.json)."""
    import os

    from fusarbatch.errors import UsageError, as_os_error, disk_full
    from fusarbatch.model.tiny import build_tiny_model

    if preset not in BASE_PRESETS:
        raise UsageError(f"--preset {preset!r}: choose {', '.join(BASE_PRESETS)}")
    target = _base_target(out)
    _remove_stale_builds(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.tmp-{os.getpid()}-old"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        d = build_tiny_model(tmp, seed=seed, **BASE_PRESETS[preset])
        (d / BASE_INFO_FILE).write_text(
            json.dumps(
                {
                    "builder": "fusarbatch.model.tiny.build_tiny_model",
                    "preset": preset,
                    "seed": seed,
                    "kwargs": BASE_PRESETS[preset],
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        # the earlier model (checked by _base_target) is moved aside, not deleted, until the new one is in
        # place; a kill in between leaves it as .NAME.tmp-PID-old, which the next base removes
        if target.exists():
            _base_target(out)  # still empty or a base model
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if old.exists() and not target.exists():
                old.rename(target)
            raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = as_os_error(exc)
        full = disk_full(cause, f"the base model in {out}")
        if full is not None:
            raise FusarbatchError(full) from None
        if isinstance(cause, OSError):
            raise UsageError(f"--out {out}: cannot write ({cause.strerror or cause})") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    cfg = json.loads((target / "config.json").read_text())
    typer.echo(f"tiny base model ({preset}, seed {seed}, vocab {cfg['text_config']['vocab_size']}) in {out}")


@app.command()
def export(
    model: Annotated[Path, typer.Option("--model", help="Training output (LoRA adapter + TLM).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged, self-contained model.")],
    base_model: Annotated[Path | None, typer.Option("--base-model")] = None,
    card: Annotated[
        Path | None, typer.Option("--card", help="Markdown model card copied as README.md.")
    ] = None,
) -> None:
    """Merge the LoRA adapter into the base model and write a self-contained model folder (base weights,
    processor, TLM): what ``fusarbatch run --model`` and the packaged demo model use."""
    from training.evaluate import load_model_for_eval

    fusar = load_model_for_eval(model, base_model, "cpu")
    fusar.merge_lora()
    if out.exists():
        shutil.rmtree(out)
    fusar.save_full(out)
    info = model / "fusarbatch_train.json"
    if info.is_file():
        shutil.copy2(info, out / "fusarbatch_train.json")
    if card is not None:
        shutil.copy2(card, out / "README.md")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    typer.echo(f"merged model written to {out} ({size / 1e6:.1f} MB)")


@app.command()
def summary(
    dirs: Annotated[list[Path], typer.Argument(help="fusarbatch eval output folders (metrics.json).")],
) -> None:
    """One markdown table (values in %) of several evaluations, each beside its baselines."""
    from training.summary import summary_table

    typer.echo(summary_table(dirs), nl=False)


@app.command()
def heads(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint-<step> of train --stage 0 --vision-only.")],
    data: Annotated[list[Path], typer.Option("--data", help="Manifest of the images to score (repeatable).")],
    train_data: Annotated[
        list[Path] | None,
        typer.Option("--train-data", help="Training manifest: source of the majority baselines."),
    ] = None,
) -> None:
    """What a vision-only tower knows, through its training-only heads: dense AUC, count and class accuracy,
    beside the majority answers (JSON on stdout)."""
    from training.manifest import read_manifests
    from training.vision import evaluate_heads

    result = evaluate_heads(
        checkpoint, read_manifests(data), read_manifests(train_data) if train_data else None
    )
    typer.echo(json.dumps(result, indent=1))


def main() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger("fusarbatch").addHandler(handler)  # training logs as fusarbatch.training.*
    logging.getLogger("fusarbatch").setLevel(logging.INFO)
    try:
        app()
    except FusarbatchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
