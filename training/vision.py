"""Stage 0, vision phase: the vision tower and merger alone, with direct supervision (not in the paper).

``fusarbatch train --stage 0 --vision-only`` stands in for the image pretraining that the 7B base already has.
The language model is not run at all: each batch goes through the vision tower and merger only, and the
losses are the training-only heads of :mod:`training.objectives` on the merged visual tokens -- the dense
"target here" map (:func:`~training.objectives.target_loss`) and the image-level probe (3 x 3 cells, count,
class; :func:`~training.objectives.probe_loss`). Without the language model's forward and backward pass a
step costs about a quarter as much, and the tower gets a direct signal instead of one filtered through an
untrained language model: on SSDD it learns where the ships are in a few thousand images, where the whole
model trained on the answers did not in 6,000 (training/RESULTS.md, issue 9).

Pixels are cut into patches here, in torch, exactly as the model's own image processor does for an image
already at the model's input size (:func:`patchify`); the first image of every run is checked against the
processor and the run stops if they differ (:func:`check_patchify`).

Output: a full model directory (the same layout as stage 0: weights, an identity TLM, the processor,
``fusarbatch_train.json``, ``train_log.jsonl``, ``loss.png``), the ``--base-model`` of the next stage-0 run
(the language model learning to read it). ``checkpoint-<step>/`` folders add the heads and
``vision_state.pt`` (optimizer, schedule, step; read back with ``torch.load(weights_only=True)``);
``--resume`` continues from the latest and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusarbatch.errors import FusarbatchError, UsageError, disk_full

log = logging.getLogger(f"fusarbatch.{__name__}")

__all__ = ["VisionImage", "check_patchify", "evaluate_heads", "patchify", "pretrain_vision", "vision_images"]

STATE_FILE = "vision_state.pt"
"""Checkpoints: optimizer and schedule state and the step (``torch.save`` of tensors and numbers only)."""


@dataclass(frozen=True)
class VisionImage:
    """One training image of the vision phase.

    :ivar path: image file.
    :ivar grid: model input side in pixels (the records' ``coordinate_size``).
    :ivar boxes: target boxes ``[x1, y1, x2, y2]`` on the ``grid`` (``meta.boxes``), or None when unknown.
    :ivar cls: the image's class (``meta.class`` of a classification record), or None.
    """

    path: Path
    grid: int
    boxes: tuple[tuple[float, float, float, float], ...] | None
    cls: str | None


def vision_images(records: Sequence[Any]) -> list[VisionImage]:
    """The distinct images of ``records`` (:class:`training.manifest.Triplet`) that carry a supervision
    signal (boxes or a class), in first-seen order; the boxes and class of all records of an image are
    merged (the builders give every record of an image the same ``meta.boxes``)."""
    by_path: dict[Path, dict[str, Any]] = {}
    for rec in records:
        entry = by_path.setdefault(rec.image, {"grid": rec.coordinate_size, "boxes": None, "cls": None})
        if entry["grid"] != rec.coordinate_size:
            from training.manifest import ManifestError

            raise ManifestError(
                f"record {rec.id!r}: image {rec.image} also appears with coordinate_size "
                f"{entry['grid']}, here {rec.coordinate_size}; one image has one grid (rebuild the manifests "
                "with one --grid)"
            )
        boxes = _checked_boxes(rec)
        if boxes is not None and entry["boxes"] is None:
            entry["boxes"] = tuple(tuple(float(v) for v in b) for b in boxes)
        cls = rec.meta.get("class") if isinstance(rec.meta, dict) else None
        if isinstance(cls, str) and cls.strip() and entry["cls"] is None:
            entry["cls"] = cls
    return [
        VisionImage(path, int(e["grid"]), e["boxes"], e["cls"])
        for path, e in by_path.items()
        if e["boxes"] is not None or e["cls"] is not None
    ]


def _checked_boxes(rec: Any) -> list[list[float]] | None:
    """``meta.boxes`` of a record (None when it has none), each checked: four finite numbers with
    ``x1 < x2``, ``y1 < y2`` (the builders keep at least one pixel), overlapping the ``coordinate_size`` grid.

    :raises ManifestError: a malformed box (it would otherwise be dropped or clamped into an edge cell and
        train the heads on a target that is not there)."""
    from training.manifest import ManifestError

    boxes = rec.meta.get("boxes") if isinstance(rec.meta, dict) else None
    if not isinstance(boxes, list):
        return None
    grid = float(rec.coordinate_size)
    out = []
    for b in boxes:
        ok = (
            isinstance(b, list | tuple)
            and len(b) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        )
        if ok:
            x1, y1, x2, y2 = (float(v) for v in b)
            ok = x1 < x2 and y1 < y2 and x2 > 0 and y2 > 0 and x1 < grid and y1 < grid
        if not ok:
            raise ManifestError(
                f"record {rec.id!r} ({rec.image}): meta.boxes entry {json.dumps(b)[:80]} is not a box "
                f"[x1, y1, x2, y2] of finite numbers, x1 < x2, y1 < y2, on its {rec.coordinate_size} px "
                "grid; fix or drop it (the builders write such boxes)"
            )
        out.append([x1, y1, x2, y2])
    return out


def patchify(images: torch.Tensor, image_processor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL patches of images already at the model's input size, as the image processor cuts them.

    :param images: ``(B, H, W, 3)`` uint8 RGB, ``H`` and ``W`` multiples of ``patch_size * merge_size``.
    :param image_processor: the model's ``Qwen2VLImageProcessor`` (its ``image_mean``, ``image_std``,
        ``rescale_factor``, ``patch_size``, ``temporal_patch_size`` and ``merge_size``).
    :returns: ``pixel_values`` ``(B * h * w, 3 * T * P * P)`` float32 (``h, w`` in patches, ``T`` temporal
        patch, ``P`` patch) in the processor's order (2 x 2 merge windows contiguous), and ``image_grid_thw``
        ``(B, 3)`` int64.
    :raises ValueError: a side is not a multiple of ``patch_size * merge_size``.
    """
    p = int(image_processor.patch_size)
    tp = int(image_processor.temporal_patch_size)
    m = int(image_processor.merge_size)
    b, height, width, c = images.shape
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image {height} x {width} px: not a multiple of {p * m} px")
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, c, 1, 1)
    x = images.permute(0, 3, 1, 2).float() * float(image_processor.rescale_factor)
    x = (x - mean) / std
    gh, gw = height // p, width // p
    x = x[:, None].expand(b, tp, c, height, width)  # one frame repeated to the temporal patch
    x = x.reshape(b, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (b, h/m, w/m, m, m, c, t, p, p)
    pixels = x.reshape(b * gh * gw, c * tp * p * p)
    grid_thw = torch.tensor([[1, gh, gw]] * b, dtype=torch.int64)
    return pixels, grid_thw


def check_patchify(image: Any, processor: Any) -> None:
    """Raise :class:`~fusarbatch.errors.ModelError` when :func:`patchify` does not give the processor's own
    pixels for ``image`` (a PIL RGB image at the model's input size): a processor whose preprocessing differs
    (another resize rule, normalisation or patch order) would otherwise train a tower on inputs it never sees
    at inference."""
    from fusarbatch.errors import ModelError

    ref = processor.image_processor(images=[image], return_tensors="pt")
    mine, thw = patchify(torch.from_numpy(np.asarray(image).copy())[None], processor.image_processor)
    same_grid = torch.equal(ref["image_grid_thw"].to(torch.int64), thw)
    if not same_grid or ref["pixel_values"].shape != mine.shape:
        raise ModelError(
            f"--vision-only: the processor cuts a {image.size[0]} px image into "
            f"{ref['image_grid_thw'].tolist()} patches, the fast path into {thw.tolist()}; train without "
            "--vision-only"
        )
    diff = float((ref["pixel_values"].float() - mine).abs().max())
    if diff > 1e-4:
        raise ModelError(
            f"--vision-only: the fast patches differ from the processor's by {diff:g}; train without "
            "--vision-only"
        )


def _check_grid(grid: int, image_processor: Any) -> None:
    """UsageError unless ``grid`` x ``grid`` images pass the image processor unresized: a multiple of
    ``patch_size * merge_size`` between its minimum and maximum pixel counts (checked before any image is
    read: a wrong ``coordinate_size`` would otherwise resize every image to it, at any size)."""
    unit = int(image_processor.patch_size) * int(image_processor.merge_size)
    size = getattr(image_processor, "size", None) or {}
    low = int(size.get("shortest_edge") or getattr(image_processor, "min_pixels", None) or 0)
    high = int(size.get("longest_edge") or getattr(image_processor, "max_pixels", None) or grid * grid)
    if grid % unit or not low <= grid * grid <= high:
        raise UsageError(
            f"--data: coordinate_size {grid} px: --vision-only needs a multiple of {unit} px with "
            f"{low} <= pixels <= {high} (the model's image processor); rebuild the manifests with such a "
            "--grid"
        )


RESUME_KEYS = (
    "lr",
    "batch_size",
    "seed",
    "weight_decay",
    "warmup",
    "target_loss_weight",
    "probe_loss_weight",
)
"""Settings a ``--resume`` must repeat: the checkpoint's optimizer, schedule and data order follow them."""


def _check_resume_config(ckpt: Path, cfg: Any, info_file: str, keys: Sequence[str] = RESUME_KEYS) -> None:
    """:class:`UsageError` unless ``cfg`` repeats the checkpoint's settings ``keys`` and its ``--base-model``
    and ``--init`` (compared as resolved paths: the frozen weights the checkpoint was trained on)."""
    try:
        info = json.loads((ckpt / info_file).read_text(encoding="utf-8"))
        saved = info["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            f"--resume: checkpoint {ckpt} is incomplete ({info_file}: {type(exc).__name__}); delete that "
            "folder to resume from the one before it"
        ) from None
    now = json.loads(json.dumps(asdict(cfg), default=str))  # as the checkpoint holds it (tuples -> lists)
    differ = [
        f"--{k.replace('_', '-')} {now[k]} (checkpoint: {saved[k]})"
        for k in keys
        if k in saved and saved[k] != now[k]
    ]
    for flag, key in (("--base-model", "base_model"), ("--init", "init")):
        given = getattr(cfg, key, None)
        path = None if given is None else str(Path(given).resolve())
        if key in info and info[key] != path:
            differ.append(f"{flag} {path or 'none'} (checkpoint: {info[key] or 'none'})")
    if differ:
        raise UsageError(
            f"--resume from {ckpt}: {'; '.join(differ)}; repeat the checkpoint's settings, or start a new "
            "--out"
        )


def _batch(images: Sequence[VisionImage], grid: int) -> torch.Tensor:
    from training.data import load_image

    return torch.from_numpy(np.stack([np.asarray(load_image(im.path, grid)) for im in images]))


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def pretrain_vision(config: Any) -> Any:
    """Run the vision phase of stage 0 (module docstring) for a resolved :class:`training.train.TrainConfig`
    with ``vision_only``; returns a :class:`training.train.TrainResult` (``records`` = distinct images).

    Steps: ``max_steps``, else ``epochs`` x ceil(images / ``batch_size``); AdamW at ``lr`` with
    ``weight_decay``, a linear warm-up over ``warmup`` of the steps, then a cosine decay to 0; gradients
    clipped to norm 1. Loss = ``target_loss_weight`` x dense target loss + ``probe_loss_weight`` x probe loss.

    :raises UsageError: no image with boxes or a class, mixed input sizes, an ``out`` that holds checkpoints
        without ``resume`` (or none with it).
    """
    from safetensors.torch import load_file, save_file
    from transformers import get_cosine_schedule_with_warmup, set_seed

    from fusarbatch.model.fusar_gpt import save_tlm
    from training.data import load_image
    from training.manifest import read_manifests
    from training.objectives import probe_loss, target_loss
    from training.plot import plot_loss
    from training.staging import fresh_staging, make_out_dir, move_into
    from training.train import (
        AUX_MODULES,
        LOG_FILE,
        LOSS_PNG,
        TRAIN_INFO_FILE,
        TrainResult,
        _checkpoints,
        _device,
        _load_model,
        _read_losses,
        _trim_log,
    )

    cfg = config
    out = Path(cfg.out)
    records = read_manifests(cfg.data)
    if cfg.tasks:
        records = [r for r in records if r.task in set(cfg.tasks)]
    images = vision_images(records)
    if not images:
        raise UsageError(
            f"--data {', '.join(map(str, cfg.data))}: no image with target boxes (meta.boxes) or a class "
            "(meta.class); --vision-only has nothing to learn from (build the manifests with the builders)"
        )
    grids = sorted({im.grid for im in images})
    if len(grids) > 1:
        raise UsageError(f"--data: the records mix input sizes {grids}; build every manifest with one --grid")
    grid = grids[0]
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a folder; choose a new --out")
    ckpts = _checkpoints(out) if out.is_dir() else []
    if cfg.resume and not ckpts:
        raise UsageError(f"--resume: no checkpoint-* folder in {out}")
    if not cfg.resume and ckpts:
        raise UsageError(f"--out {out} already holds {ckpts[-1].name}; pass --resume or choose a new --out")
    device = _device(cfg.device)
    set_seed(cfg.seed)
    started = time.perf_counter()
    classes = sorted({im.cls for im in images if im.cls is not None})
    fusar = _load_model(cfg, device, image_size=grid, classes=classes)
    for p in fusar.parameters():
        p.requires_grad_(False)
    heads = {name: getattr(fusar, name) for name in AUX_MODULES if getattr(fusar, name, None) is not None}
    trained = [fusar.visual, *heads.values()]
    params = [p for module in trained for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    n_trainable = sum(p.numel() for p in fusar.visual.parameters())
    _check_grid(grid, fusar.processor.image_processor)
    check_patchify(load_image(images[0].path, grid), fusar.processor)
    make_out_dir(out)
    merge = int(fusar.visual.spatial_merge_size)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    total = int(cfg.max_steps or math.ceil(float(cfg.epochs or 1.0) * steps_per_epoch))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # warm-up steps rounded down: a 1-step run must not spend its only step at lr 0
    sched = get_cosine_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    step = 0
    log_path = out / LOG_FILE
    if cfg.resume:
        ckpt = ckpts[-1]
        _check_resume_config(ckpt, cfg, TRAIN_INFO_FILE)
        from transformers import Qwen2_5_VLForConditionalGeneration

        try:
            saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                ckpt, local_files_only=True, dtype=fusar.dtype, device_map="cpu"
            )
            fusar.base_model.load_state_dict(saved.state_dict(), strict=True)
            del saved
            for name, head in heads.items():
                head.load_state_dict(load_file(str(ckpt / AUX_MODULES[name])))
            state = torch.load(ckpt / STATE_FILE, map_location=device, weights_only=True)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            step = int(state["step"])
        except Exception as exc:  # incomplete (killed while saving by an older version) or corrupt
            detail = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise UsageError(
                f"--resume: checkpoint {ckpt} is unreadable ({type(exc).__name__}: {detail}); delete that "
                "folder to resume from the one before it"
            ) from None
        if step > total:
            raise UsageError(
                f"--resume from {ckpt} (step {step}): --max-steps/--epochs give {total} steps in all; give "
                "at least the checkpoint's step"
            )
        log.info("resumed the vision phase from %s (step %d)", ckpt, step)
    _trim_log(log_path, step)
    info = {
        "stage": 0,
        "base_model": str(Path(cfg.base_model).resolve()),
        "init": None,
        "data": [str(Path(p).resolve()) for p in cfg.data],
        "records": len(records),
        "images": len(images),
        "images_with_boxes": sum(im.boxes is not None for im in images),
        "classes": classes,
        "trainable_params": n_trainable,
        "trains": {
            "vision_only": True,
            "target_loss_weight": cfg.target_loss_weight,
            "probe_loss_weight": cfg.probe_loss_weight,
        },
        "image_size": grid,
        "precision": "fp32",
        "device": str(device),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "base_model", "init")},
    }
    log.info(
        "stage 0, vision only: %d images (%d with boxes, %d classes), %d trainable parameters, %d steps",
        len(images),
        info["images_with_boxes"],
        len(classes),
        n_trainable,
        total,
    )

    def save(folder: Path, with_state: bool) -> None:
        bad = [n for n, p in fusar.visual.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never write a model that cannot be used (or resumed from)
            raise FusarbatchError(
                f"training diverged at step {step}: non-finite weights in visual.{bad[0]}; lower --lr "
                f"(or the loss weights) and start again in a new --out"
            )
        # written under a temporary name first: a checkpoint appears only once complete (a kill leaves a
        # .partial folder), the final model's files move into --out only once all are written
        final = folder
        folder = fresh_staging(final.parent, f".{final.name}.partial") if with_state else fresh_staging(final)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fusar.base_model.save_pretrained(folder)
            save_tlm(fusar.tlm, folder)
            fusar.processor.save_pretrained(folder)
            (folder / TRAIN_INFO_FILE).write_text(
                json.dumps({**info, "global_step": step}, indent=2, default=str) + "\n", encoding="utf-8"
            )
            if with_state:
                for name, head in heads.items():
                    tensors = {k: v.contiguous() for k, v in head.state_dict().items()}
                    save_file(tensors, str(folder / AUX_MODULES[name]))
                torch.save(
                    {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                    folder / STATE_FILE,
                )
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            full = disk_full(exc, str(final))
            if full is not None:
                raise FusarbatchError(full) from None
            raise
        if with_state:
            shutil.rmtree(final, ignore_errors=True)
            folder.rename(final)
        else:
            move_into(folder, final)

    fusar.visual.train()
    t_log = time.perf_counter()
    sums = {"loss": 0.0, "target_loss": 0.0, "probe_loss": 0.0}
    n_sum = 0
    while step < total:
        epoch, offset = divmod(step * cfg.batch_size, steps_per_epoch * cfg.batch_size)
        order = _order(len(images), cfg.seed, epoch)
        pick = [images[i] for i in order[offset : offset + cfg.batch_size]]
        pixels, thw = patchify(_batch(pick, grid), fusar.processor.image_processor)
        with fusar.use_anchors([None] * len(pick)):  # the identity TLM is not trained here: no modulation
            tokens = fusar.visual(pixels.to(device), grid_thw=thw.to(device)).pooler_output
        boxes = [None if im.boxes is None else [list(b) for b in im.boxes] for im in pick]
        loss = tokens.new_zeros(())
        terms = {}
        if cfg.target_loss_weight and "target_head" in heads:
            terms["target_loss"] = target_loss(
                heads["target_head"], tokens, thw, boxes, [grid] * len(pick), merge
            )
            loss = loss + cfg.target_loss_weight * terms["target_loss"]
        if cfg.probe_loss_weight and "image_probe" in heads:
            terms["probe_loss"] = probe_loss(
                heads["image_probe"], tokens, thw, boxes, [grid] * len(pick), [im.cls for im in pick], merge
            )
            loss = loss + cfg.probe_loss_weight * terms["probe_loss"]
        if not torch.isfinite(loss.detach()):
            raise FusarbatchError(
                f"training diverged at step {step + 1}: the loss is {float(loss.detach()):g}; lower --lr (or "
                "the loss weights) and start again in a new --out (--resume keeps the checkpoint's --lr)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        if not math.isfinite(grad_norm):  # clipping would turn it into NaN weights
            raise FusarbatchError(
                f"training diverged at step {step + 1}: the gradient norm is {grad_norm:g} (loss "
                f"{float(loss.detach()):g}); lower --lr (or the loss weights) and start again in a new --out"
            )
        opt.step()
        sched.step()
        step += 1
        sums["loss"] += float(loss.detach())
        for k, v in terms.items():
            sums[k] += float(v.detach())
        n_sum += 1
        if step % cfg.log_steps == 0 or step == total or step == 1:
            now = time.perf_counter()
            row = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                **{k: round(v / n_sum, 5) for k, v in sums.items() if k == "loss" or k in terms},
                "learning_rate": sched.get_last_lr()[0],
                "grad_norm": round(grad_norm, 4),
                "samples_per_s": round(n_sum * cfg.batch_size / (now - t_log), 3),
                "elapsed_s": round(now - started, 2),
            }
            with log_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.1f images/s",
                step,
                total,
                row["loss"],
                row["learning_rate"],
                row["samples_per_s"],
            )
            sums = dict.fromkeys(sums, 0.0)
            n_sum, t_log = 0, now
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
            save(out / f"checkpoint-{step}", with_state=True)
            for old in _checkpoints(out)[: -cfg.save_total_limit] if cfg.save_total_limit else []:
                shutil.rmtree(old, ignore_errors=True)
    wall = time.perf_counter() - started
    info["wall_s"] = round(wall, 1)
    fusar.visual.eval()
    save(out, with_state=False)
    losses = _read_losses(log_path)
    plot_loss(losses, out / LOSS_PNG, title=f"stage 0, vision only: {len(images)} images, {step} steps")
    final = losses[-1][1] if losses else None
    log.info("stage 0 (vision only) done in %.0f s: %s (final loss %s)", wall, out, final)
    return TrainResult(
        out=out, steps=step, records=len(images), final_loss=final, wall_s=wall, trainable_params=n_trainable
    )


def evaluate_heads(
    checkpoint: str | Path, records: Sequence[Any], train_records: Sequence[Any] | None = None
) -> dict[str, Any]:
    """What the vision tower of a ``--vision-only`` checkpoint knows, read through its training-only heads
    (no language model), beside the baselines measured on the same images.

    - ``dense_auc``: ROC AUC of the dense head's "a box overlaps this token's cell" logit over every visual
      token of the images with boxes (Mann-Whitney U / (n_pos n_neg), ties counted half); chance 0.5.
    - ``count_accuracy``: the probe's count, ``round(exp(x) - 1)`` (it regresses ``log1p(count)``), at
      least 1 when every reference image holds a target (SSDD, the composites), against the true number of
      boxes; ``count_corr`` its Pearson correlation with the true count; ``count_majority``: the most
      frequent count of ``train_records`` (else of ``records``) answered every time.
    - ``class_accuracy``: the probe's class on images with a class; ``class_majority`` likewise.

    :param checkpoint: a ``checkpoint-<step>`` folder of ``train --stage 0 --vision-only`` (with the heads).
    :param records: :class:`training.manifest.Triplet` records (their distinct images are scored).
    :raises UsageError: the folder holds no heads, or unreadable ones (or an unreadable
        ``fusarbatch_train.json``); no record has boxes or a class; ``train_records`` lack the boxes or
        classes that ``records`` have (no majority to measure).
    """
    from collections import Counter

    from safetensors.torch import load_file
    from scipy.stats import rankdata
    from torch.nn import functional as F

    from fusarbatch.model import FusarGPT
    from training.objectives import ImageProbe, TargetHead, target_maps
    from training.train import PROBE_FILE, TARGET_HEAD_FILE, TRAIN_INFO_FILE

    ckpt = Path(checkpoint)
    if not (ckpt / TARGET_HEAD_FILE).is_file() or not (ckpt / PROBE_FILE).is_file():
        raise UsageError(
            f"{ckpt}: no {TARGET_HEAD_FILE} / {PROBE_FILE}; give a checkpoint-<step> folder of "
            "train --stage 0 --vision-only run with both loss weights"
        )
    images = vision_images(records)
    if not images:
        raise UsageError("no record has boxes (meta.boxes) or a class (meta.class)")
    reference = vision_images(train_records) if train_records else images
    for what, present in (
        ("boxes (meta.boxes)", any(im.boxes is not None for im in images)),
        ("a class (meta.class)", any(im.cls is not None for im in images)),
    ):
        if (
            present
            and train_records
            and not any((im.boxes if what.startswith("boxes") else im.cls) is not None for im in reference)
        ):
            raise UsageError(
                f"--train-data: no record has {what}, which --data has: the majority baseline comes from "
                "it; give the training manifest of the same task"
            )
    try:
        info = json.loads((ckpt / TRAIN_INFO_FILE).read_text(encoding="utf-8"))
        classes = info.get("classes") or []
        if not (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)):
            raise ValueError("classes is not a list of names")
        if len(set(classes)) != len(classes):
            raise ValueError("classes repeats a name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(
            f"{ckpt / TRAIN_INFO_FILE}: unreadable ({type(exc).__name__}: {str(exc)[:100]}); the checkpoint "
            "is incomplete or edited: use another checkpoint-<step>"
        ) from None
    fusar = FusarGPT.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    fusar.eval()
    hidden = int(fusar.base_model.config.text_config.hidden_size)
    head, probe = TargetHead(hidden), ImageProbe(hidden, classes)
    for module, fname in ((head, TARGET_HEAD_FILE), (probe, PROBE_FILE)):
        try:
            module.load_state_dict(load_file(str(ckpt / fname)))
            if not all(torch.isfinite(p).all() for p in module.parameters()):
                raise ValueError("non-finite weights")
        except Exception as exc:  # truncated, garbage, or not the shape of these heads
            detail = " ".join(str(exc).split())[:160] or type(exc).__name__
            raise UsageError(
                f"{ckpt / fname}: unreadable ({type(exc).__name__}: {detail}); the checkpoint is incomplete "
                "or corrupt: use another checkpoint-<step>"
            ) from None
    grid = fusar.image_size
    scores, truth, counts, true_counts, cls_pred, cls_true = [], [], [], [], [], []
    for i in range(0, len(images), 32):
        part = images[i : i + 32]
        pixels, thw = patchify(_batch(part, grid), fusar.processor.image_processor)
        with torch.no_grad(), fusar.use_anchors([None] * len(part)):
            tokens = fusar.visual(pixels, grid_thw=thw).pooler_output
            dense = head(tokens).reshape(len(part), -1, 2)
            unit = F.rms_norm(tokens.float(), (hidden,)).reshape(len(part), -1, hidden)
            out = probe(unit.mean(dim=1))
        for j, im in enumerate(part):
            if im.boxes is not None:
                scale = grid / im.grid
                boxes = [[v * scale for v in b] for b in im.boxes]
                scores.append(dense[j, :, 1])
                truth.append(target_maps(boxes, thw[j].tolist(), grid)[:, 1])
                # log1p(count) regressed: clipped so that a wild output is a wrong count, not an overflow
                log_count = float(out[j, 9])
                counts.append(round(math.expm1(30.0 if math.isnan(log_count) else min(log_count, 30.0))))
                true_counts.append(len(im.boxes))
            if im.cls is not None and im.cls in classes:
                cls_pred.append(classes[int(out[j, 10:].argmax())])
                cls_true.append(im.cls)
    result: dict[str, Any] = {"images": len(images), "majority_from": "train" if train_records else "eval"}
    if scores:
        s, y = torch.cat(scores).numpy(), torch.cat(truth).numpy()
        n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
        ranks = rankdata(s)
        auc = (ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg) if n_pos and n_neg else None
        majority = Counter(len(im.boxes) for im in reference if im.boxes is not None).most_common(1)[0][0]
        floor = 1 if all(len(im.boxes) for im in reference if im.boxes is not None) else 0
        c, t = np.maximum(np.array(counts), floor), np.array(true_counts)
        result |= {
            "images_with_boxes": len(t),
            "dense_auc": None if auc is None else round(float(auc), 4),
            "count_accuracy": round(float((c == t).mean()), 4),
            "count_corr": round(float(np.corrcoef(c, t)[0, 1]), 4) if c.std() and t.std() else None,
            "count_majority": round(float((t == majority).mean()), 4),
        }
    if cls_true:
        majority_cls = Counter(im.cls for im in reference if im.cls is not None).most_common(1)[0][0]
        result |= {
            "images_with_class": len(cls_true),
            "class_accuracy": round(
                float(np.mean([p == q for p, q in zip(cls_pred, cls_true, strict=True)])), 4
            ),
            "class_majority": round(float(np.mean([q == majority_cls for q in cls_true])), 4),
        }
    return result
