"""Two-stage supervised fine-tuning of FUSAR-GPT with the Hugging Face Trainer (DESIGN 4; PAPER 1.4), and a
stage 0 that stands in for the base model's own pretraining.

- **Stage 0** (not part of the paper's method): every parameter of the base Qwen2.5-VL -- vision tower,
  merger, language model -- is trained on the image tasks; no LoRA, no TLM. The 7B base already knows how
  to look at images; a small, randomly initialised base does not, and stages 1-2 (which freeze it) then learn
  only the answer prior (training/RESULTS.md). Its output folder is a full model directory with an identity
  TLM (no modulation until stage 1 trains it): the ``--base-model`` of stages 1 and 2. Options that make the
  image matter at toy scale (measured in training/RESULTS.md): ``loss_mean="answer"`` (each record's answer
  weighs the same; default in stage 0) and ``target_loss_weight`` (a dense "target here" loss on the merged
  visual tokens, training/objectives.py).
  Checkpoints hold the full weights and the target head; ``resume`` works as in the other stages.
- **Stage 1** (captions): the TLM MLP is trained, and a new LoRA adapter with it (the official ``set_stage``;
  ``stage1_lora=False`` follows the paper's text: TLM only). Default lr 1e-4, 30 epochs.
- **Stage 2** (tasks): ``init`` is the stage-1 output; its TLM is frozen and its LoRA adapter is trained
  further (a new adapter when stage 1 had none). Default lr 1e-5, 5 epochs.
- Both: AdamW, linear schedule with a 5 % warm-up, gradient accumulation (official: batch 1 x 4), answer-only
  loss normalised by the answer tokens of the whole accumulated batch, bf16 autocast on a bf16-capable GPU and
  fp32 otherwise. The base model is always frozen.

Output folder (release-compatible, loadable with ``FusarGPT.from_pretrained(base, adapter_dir=out)``):
``adapter_config.json`` + ``adapter_model.safetensors`` (peft LoRA, when there is one), ``tlm.safetensors`` +
``tlm_config.json`` (TLM), the processor/tokenizer files, ``fusarbatch_train.json`` (stage, base model, data,
hyper-parameters, wall time), ``train_log.jsonl`` (one JSON object per logging step: step, epoch, loss, lr,
grad norm, samples/s, elapsed s) and ``loss.png``. Checkpoints ``checkpoint-<step>/`` hold the same model
files plus the optimizer, scheduler, RNG and trainer state; ``resume=True`` continues from the latest one and
ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusarbatch.errors import UsageError

log = logging.getLogger(f"fusarbatch.{__name__}")  # shown by the fusarbatch CLI

__all__ = ["TrainConfig", "TrainResult", "train"]

TRAIN_INFO_FILE = "fusarbatch_train.json"
LOG_FILE = "train_log.jsonl"
LOSS_PNG = "loss.png"

STAGE_DEFAULTS = {
    0: {"lr": 1e-3, "epochs": 10.0},
    1: {"lr": 1e-4, "epochs": 30.0},
    2: {"lr": 1e-5, "epochs": 5.0},
}
"""Paper: stage I 30 epochs at 1e-4, stage II 5 epochs at 1e-5. Stage 0 (ours): 10 epochs at 1e-3."""
TARGET_HEAD_FILE = "target_head.safetensors"
"""Stage-0 checkpoints: the weights of the dense target head (training only)."""
PROBE_FILE = "image_probe.safetensors"
"""Stage-0 checkpoints: the weights of the image probe (training only)."""
POSITION_PROBE_FILE = "position_probe.safetensors"
"""Stage-0 checkpoints: the weights of the language model's position probe (training only)."""
AUX_MODULES = {
    "target_head": TARGET_HEAD_FILE,
    "image_probe": PROBE_FILE,
    "position_probe": POSITION_PROBE_FILE,
}
MAX_LOSS_WEIGHT = 1e4
"""Upper bound of the stage-0 auxiliary loss weights (``--*-loss-weight``)."""
HF_RESUME_KEYS = (
    "stage",
    "lr",
    "batch_size",
    "grad_accum",
    "seed",
    "weight_decay",
    "warmup",
    "stage1_lora",
    "no_tlm",
    "lora_r",
    "lora_alpha",
    "loss_mean",
    "target_loss_weight",
    "spread_loss_weight",
    "probe_loss_weight",
    "position_loss_weight",
    "freeze_language_model",
    "freeze_vision",
    "tasks",
)
"""Settings a ``--resume`` of stages 0-2 must repeat: the optimizer's parameter groups, the schedule, the
trained parts and the data follow them (a changed one was a traceback or silently ignored)."""
LOSS_MEANS = ("token", "answer")


def aux_loss_scale(loss_mean: str, *, training: bool, grad_accum: int) -> float:
    """Factor on the stage-0 auxiliary losses so that they weigh the same whatever ``--grad-accum``.

    With ``loss_mean="token"`` the model's loss is already divided over the whole accumulated batch
    (``num_items_in_batch``) and the Trainer does not divide it by the number of batches, so the per-batch
    auxiliary means must be divided here; with ``"answer"`` the Trainer divides the summed loss itself.
    Evaluation passes (``training=False``) are not accumulated.

    :param grad_accum: the batches of the *current* accumulation window (the Trainer's
        ``current_gradient_accumulation_steps``): fewer than ``--grad-accum`` in an epoch's last window.
    :returns: ``1 / grad_accum`` for a token-mean training pass, else 1.0.
    :raises ValueError: ``loss_mean`` is not ``token`` or ``answer``.
    """
    if loss_mean not in LOSS_MEANS:
        raise ValueError(f"loss_mean {loss_mean!r}: choose one of {', '.join(LOSS_MEANS)}")
    if loss_mean == "token" and training:
        return 1.0 / max(int(grad_accum), 1)
    return 1.0


@dataclass
class TrainConfig:
    """Everything a training run needs (the ``fusarbatch train`` flags).

    :ivar stage: 0 (all parameters of the base; not in the paper), 1 or 2.
    :ivar data: manifest files (JSON Lines triplets).
    :ivar base_model: the Qwen2.5-VL model directory (frozen).
    :ivar out: output folder (checkpoints, final model, log, loss curve).
    :ivar init: stage-1 output to start from (required for stage 2; optional for stage 1).
    :ivar stage1_lora: stage 1 also trains LoRA (official code); False = TLM only (paper text).
    :ivar epochs: default per stage (:data:`STAGE_DEFAULTS`).
    :ivar max_steps: optimizer steps; overrides ``epochs`` when given.
    :ivar lr: default per stage.
    :ivar batch_size: records per forward pass.
    :ivar grad_accum: forward passes per optimizer step.
    :ivar warmup: warm-up share of the steps.
    :ivar weight_decay: AdamW weight decay.
    :ivar save_steps: checkpoint every N optimizer steps (0: only the final model).
    :ivar save_total_limit: checkpoints kept.
    :ivar log_steps: log every N optimizer steps.
    :ivar resume: continue from the latest checkpoint in ``out``.
    :ivar seed: seed of LoRA/TLM init, data order and dropout.
    :ivar lora_r: LoRA rank; ``lora_alpha`` and ``lora_dropout`` likewise (FUSAR: 8, 32, 0.05).
    :ivar max_length: longest sequence in tokens.
    :ivar device: ``cuda``/``cpu``/None (CUDA when available).
    :ivar num_workers: data loader worker processes.
    :ivar no_tlm: train without anchors (the TLM is neither applied nor trained; official ``train_no_aef``).
    :ivar tlm_zero_init: a new TLM (stage 1 without ``init``) starts as the identity: its last layer is zeroed
        (PAPER 6.1 option; the official code uses PyTorch's default init: it modulates from the first step).
        A TLM that never sees an anchor -- the demo model, trained on chips without geolocation -- then stays
        the identity instead of scrambling the visual tokens of images that do have anchors.
    :ivar loss_mean: ``token`` (the model's loss: mean over all answer tokens of the batch) or ``answer``
        (mean over each record's answer tokens, then over records;
        :func:`~training.objectives.answer_mean_loss`).
        Default: ``answer`` in stage 0, ``token`` in stages 1-2 (official).
    :ivar target_loss_weight: stage 0: weight of the dense target loss on the merged visual tokens
        (:func:`training.objectives.target_loss`; records need ``meta.boxes``); 0 = off.
    :ivar spread_loss_weight: stage 0: weight of :func:`training.objectives.spread_loss` (keeps the visual
        tokens centred so that the language model sees what differs between images); 0 = off.
    :ivar probe_loss_weight: stage 0: weight of :func:`training.objectives.probe_loss` (deep supervision of
        the pooled visual tokens: cells, count, class); 0 = off.
    :ivar position_loss_weight: stage 0: weight of :func:`training.objectives.position_loss` (the language
        model's early layers must write each visual token's row and column into it); 0 = off.
    :ivar freeze_language_model: stage 0: train the vision tower and merger only, the language model stays as
        it is (a curriculum's first phase: from scratch, a language model trained with the vision tower
        first learns the answer prior and stops reading the image; a frozen one passes image information to
        the answer from the start, so the vision tower learns to write what it reads).
    :ivar tasks: train only on the records of these tasks (None: all), e.g. a curriculum's first phase.
    :ivar vision_only: stage 0: train the vision tower and merger alone on the target and probe losses,
        without running the language model (:mod:`training.vision`).
    :ivar freeze_vision: stage 0: train the language model only; the vision tower and merger stay as they
        are (after a ``vision_only`` run: the language model learns to read a tower that already sees).
    """

    stage: int
    data: list[Path]
    base_model: Path
    out: Path
    init: Path | None = None
    stage1_lora: bool = True
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 1
    grad_accum: int = 4
    warmup: float = 0.05
    weight_decay: float = 0.0
    save_steps: int = 500
    save_total_limit: int | None = 2
    log_steps: int = 10
    resume: bool = False
    seed: int = 42
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 2048
    device: str | None = None
    num_workers: int = 0
    no_tlm: bool = False
    tlm_zero_init: bool = False
    loss_mean: str | None = None
    target_loss_weight: float = 0.0
    spread_loss_weight: float = 0.0
    probe_loss_weight: float = 0.0
    position_loss_weight: float = 0.0
    freeze_language_model: bool = False
    tasks: list[str] | None = None
    vision_only: bool = False
    freeze_vision: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with the per-stage defaults filled in; raises :class:`UsageError` on bad values."""
        if self.stage not in (0, 1, 2):
            raise UsageError(
                f"--stage {self.stage}: choose 0 (all parameters of a small base), 1 (captions, TLM) or 2 "
                "(tasks, LoRA)"
            )
        if self.freeze_language_model and self.stage != 0:
            raise UsageError("--freeze-language-model is for stage 0 (stages 1-2 freeze the base anyway)")
        if (self.vision_only or self.freeze_vision) and self.stage != 0:
            raise UsageError("--vision-only and --freeze-vision are for stage 0")
        if self.freeze_vision and (self.freeze_language_model or self.vision_only):
            raise UsageError(
                "--freeze-vision trains the language model only: not with --freeze-language-model or "
                "--vision-only, which train the vision tower only"
            )
        if self.vision_only and not (self.target_loss_weight or self.probe_loss_weight):
            raise UsageError(
                "--vision-only learns from the target and probe losses: give --target-loss-weight and/or "
                "--probe-loss-weight"
            )
        from training.manifest import TASKS

        unknown = sorted(set(self.tasks or ()) - set(TASKS))
        if unknown:
            raise UsageError(f"--task {', '.join(unknown)}: unknown; choose from {', '.join(TASKS)}")
        if self.stage == 0 and self.init is not None:
            raise UsageError("--stage 0 trains the --base-model itself; --init is for stages 1 and 2")
        for name, v in (("--lr", self.lr), ("--epochs", self.epochs)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise UsageError(f"{name} {v}: give a finite number > 0")
        if self.loss_mean is not None and self.loss_mean not in LOSS_MEANS:
            raise UsageError(f"--loss-mean {self.loss_mean!r}: choose token or answer")
        vision_weights = (
            ("--target-loss-weight", self.target_loss_weight),
            ("--spread-loss-weight", self.spread_loss_weight),
            ("--probe-loss-weight", self.probe_loss_weight),
        )
        for name, w in (*vision_weights, ("--position-loss-weight", self.position_loss_weight)):
            if not (math.isfinite(w) and 0 <= w <= MAX_LOSS_WEIGHT):
                raise UsageError(
                    f"{name} {w!r}: give a number in [0, {MAX_LOSS_WEIGHT:g}] (larger weights drown the "
                    "answer loss and overflow the gradients)"
                )
        for name, w in vision_weights:
            if w and self.stage != 0:
                raise UsageError(f"{name} trains the vision tower: stage 0 only")
        if self.position_loss_weight and (self.stage != 0 or self.vision_only or self.freeze_language_model):
            raise UsageError(
                "--position-loss-weight trains the language model: stage 0 without --vision-only or "
                "--freeze-language-model"
            )
        if self.stage == 2 and self.init is None:
            raise UsageError("--stage 2 needs --init STAGE1_DIR (the stage-1 output: TLM and LoRA)")
        if not self.data:
            raise UsageError("--data: give at least one manifest")
        for name, v in (("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum)):
            if v < 1:
                raise UsageError(f"{name} must be >= 1")
        if not 0 <= self.warmup < 1:
            raise UsageError("--warmup is a share of the steps in [0, 1)")
        d = STAGE_DEFAULTS[self.stage]
        cfg = TrainConfig(**{**asdict(self)})
        cfg.data = [Path(p) for p in self.data]
        cfg.lr = self.lr if self.lr is not None else d["lr"]
        cfg.epochs = self.epochs if self.epochs is not None else d["epochs"]
        cfg.loss_mean = self.loss_mean or ("answer" if self.stage == 0 else "token")
        return cfg


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did."""

    out: Path
    steps: int
    records: int
    final_loss: float | None
    wall_s: float
    trainable_params: int


# --------------------------------------------------------------------------------------------- helpers
def _device(name: str | None) -> torch.device:
    """``--device``: the named device (UsageError when it is not a device or not on this machine), else
    cuda when available, else cpu."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name}: not a device; use cuda or cpu") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device on this machine; use --device cpu")
        if device.type not in ("cuda", "cpu"):
            raise UsageError(f"--device {name}: training runs on cuda or cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _set_trainable(
    fusar: Any,
    stage: int,
    stage1_lora: bool,
    no_tlm: bool,
    freeze_language_model: bool = False,
    freeze_vision: bool = False,
) -> int:
    """Freeze everything, then unfreeze the stage's parameters; returns the trainable count."""
    for p in fusar.parameters():
        p.requires_grad_(False)
    if stage == 0:  # the whole base model, its vision tower + merger, or its language model (and the heads)
        for p in (fusar.visual if freeze_language_model else fusar.model).parameters():
            p.requires_grad_(True)
        for p in fusar.visual.parameters() if freeze_vision else ():
            p.requires_grad_(False)
        for name in AUX_MODULES:
            head = getattr(fusar, name, None)
            for p in head.parameters() if head is not None else ():
                p.requires_grad_(True)
        return sum(p.numel() for p in fusar.parameters() if p.requires_grad)
    train_tlm = stage == 1 and not no_tlm
    train_lora = stage == 2 or stage1_lora
    for p in fusar.tlm.parameters():
        p.requires_grad_(train_tlm)
    for name, p in fusar.model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(train_lora)
    n = sum(p.numel() for p in fusar.parameters() if p.requires_grad)
    if n == 0:
        raise UsageError("nothing to train: stage 1 with --no-stage1-lora and --no-tlm trains no parameter")
    return n


def _load_model(
    cfg: TrainConfig, device: torch.device, image_size: int | None = None, classes: list[str] | None = None
) -> Any:
    from fusarbatch.model.fusar_gpt import FusarGPT, lora_config

    lcfg = lora_config(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    if cfg.init is not None and not Path(cfg.init).is_dir():
        raise UsageError(f"--init {cfg.init}: folder missing")
    fusar = FusarGPT.from_pretrained(
        cfg.base_model,
        adapter_dir=cfg.init,
        device=device,
        dtype=torch.float32 if device.type != "cuda" else None,
        init_tlm=cfg.stage in (0, 1) or cfg.no_tlm,
        trainable=True,
    )
    fusar.tlm.to(torch.float32)
    from fusarbatch.model.fusar_gpt import TLM_LEGACY_FILE, TLM_WEIGHTS_FILE

    dirs = [Path(d) for d in (cfg.init, cfg.base_model) if d is not None]
    new_tlm = not any((d / f).is_file() for d in dirs for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE))
    if cfg.tlm_zero_init and not new_tlm:
        raise UsageError(
            "--tlm-zero-init starts a new TLM, but --init/--base-model already holds TLM weights"
        )
    # stage 0 writes a full model directory with an identity TLM (last layer zeroed: no modulation) at the
    # records' input size, so that eval and run take it as is and stage 1 trains that TLM on anchors
    fresh = new_tlm or cfg.stage == 0
    if fresh and image_size is not None and fusar.tlm.config.image_size != image_size:
        # a new TLM is trained at the records' input size (tlm_config.json image_size: the model's grid)
        from dataclasses import replace

        fusar.tlm.config = replace(fusar.tlm.config, image_size=int(image_size))
        log.info("new TLM: image_size %d (the records' coordinate_size)", image_size)
    if cfg.tlm_zero_init or cfg.stage == 0:
        last = fusar.tlm.film_mlp[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        log.info("new TLM zero-initialised: it is the identity until trained on anchors")
    if cfg.stage == 0:
        hidden = int(fusar.base_model.config.text_config.hidden_size)
        if cfg.target_loss_weight:
            from training.objectives import TargetHead

            fusar.add_module("target_head", TargetHead(hidden).to(device))
        if cfg.probe_loss_weight:
            from training.objectives import ImageProbe

            fusar.add_module("image_probe", ImageProbe(hidden, classes or []).to(device))
        if cfg.position_loss_weight:
            from training.objectives import PositionProbe, position_layer

            position_layer(fusar.base_model.config.text_config)  # a usage error for a 1-layer model
            fusar.add_module("position_probe", PositionProbe(hidden).to(device))
        return fusar
    if not fusar.has_lora and (cfg.stage == 2 or cfg.stage1_lora):
        fusar.add_lora(lcfg)
    return fusar


def _trainer_class() -> type:
    from transformers import Trainer

    class FusarTrainer(Trainer):
        """Trainer for :class:`~fusarbatch.model.FusarGPT`: anchors travel in the batch; checkpoints hold only
        the trained weights (LoRA adapter + TLM, release layout) plus the Trainer's optimizer/RNG state."""

        def __init__(
            self,
            *args: Any,
            fusar: Any,
            train_info: dict[str, Any],
            no_tlm: bool,
            stage: int = 1,
            loss_mean: str = "token",
            target_loss_weight: float = 0.0,
            spread_loss_weight: float = 0.0,
            probe_loss_weight: float = 0.0,
            position_loss_weight: float = 0.0,
            **kwargs: Any,
        ):
            self.fusar = fusar
            self.train_info = train_info
            self.no_tlm = no_tlm
            self.stage = stage
            self.loss_mean = loss_mean
            self.target_loss_weight = float(target_loss_weight)
            self.spread_loss_weight = float(spread_loss_weight)
            self.probe_loss_weight = float(probe_loss_weight)
            self.position_loss_weight = float(position_loss_weight)
            self._visual_tokens: Any = None
            super().__init__(*args, **kwargs)
            # token mean: Qwen's loss divides by num_items_in_batch (the answer tokens of the accumulated
            # batch); answer mean: our loss is a per-batch mean and the Trainer divides by grad_accum
            self.model_accepts_loss_kwargs = loss_mean == "token"
            if self.target_loss_weight or self.spread_loss_weight or self.probe_loss_weight:
                fusar.visual.register_forward_hook(self._keep_visual_tokens, with_kwargs=True)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                for name in ("target_loss", "spread_loss", "probe_loss", "position_loss"):
                    if hasattr(self, f"_last_{name}"):
                        logs = {**logs, name: round(getattr(self, f"_last_{name}"), 4)}
            super().log(logs, *args, **kwargs)

        def _keep_visual_tokens(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
            self._visual_tokens = output.pooler_output
            return output

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            from training.data import SeededSampler

            ds = train_dataset if train_dataset is not None else self.train_dataset
            return SeededSampler(len(ds), self.args.seed)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            anchors = inputs.pop("anchors")
            target_boxes = inputs.pop("target_boxes", None)
            grids = inputs.pop("grids", None)
            target_classes = inputs.pop("target_classes", None)
            if self.no_tlm or self.stage == 0:
                anchors = [None] * len(anchors)
            if self.position_loss_weight:
                inputs = {**inputs, "output_hidden_states": True}
            aux_terms: list[torch.Tensor] = []
            if self.loss_mean == "answer":
                from training.objectives import answer_mean_loss

                labels = inputs.pop("labels")
                outputs = model(anchors, **inputs)
                loss = answer_mean_loss(outputs.logits, labels)
            else:
                kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
                outputs = model(anchors, **inputs, **kwargs)
                loss = outputs.loss
            if self.probe_loss_weight and target_boxes is not None:
                from training.objectives import probe_loss

                probe = probe_loss(
                    self.fusar.image_probe,
                    self._visual_tokens,
                    inputs["image_grid_thw"],
                    target_boxes,
                    grids or [0] * len(target_boxes),
                    target_classes or [None] * len(target_boxes),
                    int(self.fusar.visual.spatial_merge_size),
                )
                self._last_probe_loss = float(probe.detach())
                aux_terms.append(self.probe_loss_weight * probe)
            if self.target_loss_weight and target_boxes is not None:
                from training.objectives import target_loss

                aux = target_loss(
                    self.fusar.target_head,
                    self._visual_tokens,
                    inputs["image_grid_thw"],
                    target_boxes,
                    grids or [0] * len(target_boxes),
                    int(self.fusar.visual.spatial_merge_size),
                )
                self._last_target_loss = float(aux.detach())
                aux_terms.append(self.target_loss_weight * aux)
            if self.position_loss_weight:
                from training.objectives import position_layer, position_loss

                where = position_loss(
                    self.fusar.position_probe,
                    outputs.hidden_states[position_layer(self.fusar.base_model.config.text_config)],
                    inputs["input_ids"],
                    int(self.fusar.base_model.config.image_token_id),
                    inputs["image_grid_thw"],
                    int(self.fusar.visual.spatial_merge_size),
                )
                self._last_position_loss = float(where.detach())
                aux_terms.append(self.position_loss_weight * where)
                outputs.hidden_states = None
            if self.spread_loss_weight and self._visual_tokens is not None:
                from training.objectives import spread_loss

                spread = spread_loss(self._visual_tokens)
                self._last_spread_loss = float(spread.detach())
                aux_terms.append(self.spread_loss_weight * spread)
            self._visual_tokens = None
            if aux_terms:
                # token mean: the model's loss is already divided over the accumulated batch and the Trainer
                # does not divide it by the batches of the window, so the per-batch auxiliary means are
                # divided here (else they would weigh that many times more than with --loss-mean answer). The
                # window is the Trainer's current one: an epoch's last holds fewer than --grad-accum batches.
                # Without num_items_in_batch the Trainer divides the whole loss itself.
                window = getattr(
                    self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
                )
                scale = aux_loss_scale(
                    self.loss_mean,
                    training=model.training,
                    grad_accum=window if num_items_in_batch is not None else 1,
                )
                loss = loss + scale * torch.stack(aux_terms).sum()
            if not torch.isfinite(loss.detach()).all():
                # a diverged run would go on to save a model of NaN weights and end "done"
                from fusarbatch.errors import FusarbatchError

                raise FusarbatchError(
                    f"training diverged at step {self.state.global_step + 1}: the loss is {float(loss):g}; "
                    "lower --lr (or the loss weights) and start again (--resume continues from the last "
                    "checkpoint)"
                )
            if not loss.requires_grad:
                # a batch without anchors while only the TLM trains: no trainable parameter is on the path;
                # a zero term keeps backward() valid (the optimizer step then changes nothing)
                loss = loss + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, outputs) if return_outputs else loss

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if self.stage == 0:  # a full model directory (identity TLM): the base of stages 1 and 2
                from fusarbatch.model.fusar_gpt import save_tlm

                self.fusar.base_model.save_pretrained(out)
                save_tlm(self.fusar.tlm, out)
                for name, fname in AUX_MODULES.items():
                    head = getattr(self.fusar, name, None)
                    if head is not None and "checkpoint-" in out.name:
                        from safetensors.torch import save_file

                        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / fname))
            else:
                self.fusar.save(out)
            self.fusar.processor.save_pretrained(out)
            info = {**self.train_info, "global_step": int(self.state.global_step)}
            (out / TRAIN_INFO_FILE).write_text(
                json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8"
            )

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            from fusarbatch.model.fusar_gpt import TLM_WEIGHTS_FILE

            ckpt = Path(resume_from_checkpoint)
            if self.stage == 0:
                self._load_full_checkpoint(ckpt)
                return
            tlm_file = ckpt / TLM_WEIGHTS_FILE
            if not tlm_file.is_file():
                raise UsageError(f"checkpoint {ckpt}: {TLM_WEIGHTS_FILE} missing")
            self.fusar.tlm.film_mlp.load_state_dict(load_file(str(tlm_file)))
            adapter = ckpt / "adapter_model.safetensors"
            if self.fusar.has_lora:
                if not adapter.is_file():
                    raise UsageError(f"checkpoint {ckpt}: adapter_model.safetensors missing")
                result = set_peft_model_state_dict(self.fusar.model, load_file(str(adapter)))
                if getattr(result, "unexpected_keys", None):
                    raise UsageError(
                        f"checkpoint {ckpt}: adapter does not fit ({result.unexpected_keys[:3]})"
                    )
            log.info("resumed weights from %s", ckpt)

        def _load_full_checkpoint(self, ckpt: Path) -> None:
            """Stage 0: every weight of the base model (its safetensors shards) and the target head."""
            from safetensors.torch import load_file
            from transformers import Qwen2_5_VLForConditionalGeneration

            if not any(ckpt.glob("model*.safetensors")):
                raise UsageError(f"checkpoint {ckpt}: model.safetensors missing")
            # transformers maps the saved key layout back to the module's (it renames on save)
            saved = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                ckpt, local_files_only=True, dtype=self.fusar.dtype, device_map="cpu"
            )
            result = self.fusar.base_model.load_state_dict(saved.state_dict(), strict=True)
            del saved, result
            for name, fname in AUX_MODULES.items():
                head = getattr(self.fusar, name, None)
                if head is not None:
                    if not (ckpt / fname).is_file():
                        raise UsageError(f"checkpoint {ckpt}: {fname} missing")
                    try:
                        head.load_state_dict(load_file(str(ckpt / fname)))
                    except Exception as exc:  # safetensors' own error types, shape mismatches
                        raise UsageError(
                            f"checkpoint {ckpt}: {fname} unreadable ({type(exc).__name__}); delete that "
                            "folder to resume from the one before it"
                        ) from None
            log.info("resumed all weights from %s", ckpt)

    return FusarTrainer


def _progress_callback(out: Path, batch: int, accum: int, resume_step: int) -> Any:
    from transformers import TrainerCallback

    class JsonlProgress(TrainerCallback):
        """Appends one JSON line per log to ``train_log.jsonl`` and logs loss and throughput."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.last_t = self.start
            self.last_step = resume_step
            self.path = out / LOG_FILE

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _trim_log(self.path, state.global_step)
            self.last_step = state.global_step
            self.start = self.last_t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            # the last step is logged too: else the "final loss" of a run not a multiple of --log-steps long
            # was the loss of an earlier step (step 1 of a run shorter than --log-steps)
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            logs = dict(logs or {})
            now = time.perf_counter()
            steps = state.global_step - self.last_step
            rate = steps * batch * accum / (now - self.last_t) if steps and now > self.last_t else None
            self.last_t, self.last_step = now, state.global_step
            row = {
                "step": int(state.global_step),
                "epoch": round(float(state.epoch or 0.0), 4),
                **{k: (float(v) if isinstance(v, int | float) else v) for k, v in logs.items()},
                "samples_per_s": None if rate is None else round(rate, 3),
                "elapsed_s": round(now - self.start, 2),
            }
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if "loss" in logs:
                log.info(
                    "step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %s samples/s",
                    state.global_step,
                    state.max_steps,
                    row["epoch"],
                    logs["loss"],
                    logs.get("learning_rate", float("nan")),
                    "-" if rate is None else f"{rate:.2f}",
                )

    return JsonlProgress()


def _checkpoints(out: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``out``, by step."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = _checkpoints(out)
    return ckpts[-1] if ckpts else None


def _remove_incomplete_checkpoint(ckpt: Path) -> Path | None:
    """Remove ``ckpt`` when it is a folder without a readable ``trainer_state.json`` (a save that failed or
    was cut short); returns it when removed."""
    if not ckpt.is_dir() or ckpt.is_symlink():
        return None
    try:
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        return None
    except (OSError, ValueError):
        shutil.rmtree(ckpt, ignore_errors=True)
        return ckpt


def _rerun_advice(out: Path) -> str:
    """What to rerun after a failed write in ``out``: with ``--resume`` when a checkpoint is left, else
    without it (a plain rerun is refused while a checkpoint is there, a resume while none is)."""
    latest = _latest_checkpoint(out) if out.is_dir() else None
    if latest is not None:
        return f"rerun with --resume (it continues from {latest.name}; earlier outputs are kept)"
    return "rerun without --resume (there is no checkpoint to resume from)"


def _trim_log(path: Path, step: int) -> None:
    """Keep the lines of ``train_log.jsonl`` up to ``step``, the one training restarts from (a resume drops
    the later, replayed ones); unreadable lines are dropped."""
    keep = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                continue
    path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")


# --------------------------------------------------------------------------------------------- train
def train(config: TrainConfig) -> TrainResult:
    """Run one training stage (module docstring); returns a summary. The final model is in ``config.out``.

    :raises UsageError: bad configuration, missing manifests/directories, an ``out`` that already holds
        checkpoints without ``resume`` (or none with it).
    :raises ModelError: the base model or ``init`` cannot be loaded.
    """
    from transformers import TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    from training.data import Collator, TripletDataset
    from training.manifest import read_manifests
    from training.plot import plot_loss
    from training.staging import fresh_staging, make_out_dir, move_into

    cfg = config.resolved()
    if cfg.vision_only:
        from training.vision import pretrain_vision

        return pretrain_vision(cfg)
    out = Path(cfg.out)
    records = read_manifests(cfg.data)
    if cfg.tasks:
        records = [r for r in records if r.task in set(cfg.tasks)]
    if not records:
        what = f" of the tasks {', '.join(cfg.tasks)}" if cfg.tasks else ""
        raise UsageError(f"--data {', '.join(map(str, cfg.data))}: no records{what}")
    sizes = sorted({r.coordinate_size for r in records})
    if len(sizes) > 1:
        raise UsageError(
            f"--data: the records mix input sizes {sizes} (coordinate_size); build every manifest with the "
            "same --grid"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another --out")
    if out.is_dir():
        for p in out.glob("checkpoint-*"):
            if not p.is_dir():  # the Trainer would fail to save its checkpoint there, steps into the run
                raise UsageError(
                    f"--out {out}: {p.name} is not a checkpoint folder; remove it or choose another --out"
                )
    latest = _latest_checkpoint(out) if out.is_dir() else None
    if cfg.resume and latest is None:
        raise UsageError(f"--resume: no checkpoint-* folder in {out}")
    if not cfg.resume and latest is not None:
        raise UsageError(f"--out {out} already holds {latest.name}; pass --resume or choose a new --out")
    if cfg.resume and latest is not None:  # the optimizer, schedule and trained parts follow these
        from training.vision import _check_resume_config

        _check_resume_config(latest, cfg, TRAIN_INFO_FILE, HF_RESUME_KEYS)
        if not (latest / "trainer_state.json").is_file():  # the Trainer writes it last: an interrupted save
            raise UsageError(
                f"--resume: checkpoint {latest} is incomplete (trainer_state.json missing: an interrupted "
                "save); delete that folder to resume from the one before it"
            )
    if cfg.stage == 1 and not cfg.stage1_lora and not cfg.no_tlm and all(r.aef is None for r in records):
        raise UsageError(
            "stage 1 with --no-stage1-lora trains only the TLM, but no record has anchors (aef): "
            "nothing to learn"
        )
    make_out_dir(out)
    device = _device(cfg.device)
    hf_logging.disable_progress_bar()
    set_seed(cfg.seed)
    started = time.perf_counter()
    classes = sorted({r.meta["class"] for r in records if isinstance(r.meta.get("class"), str)})
    fusar = _load_model(cfg, device, image_size=sizes[0], classes=classes)
    n_trainable = _set_trainable(
        fusar, cfg.stage, cfg.stage1_lora, cfg.no_tlm, cfg.freeze_language_model, cfg.freeze_vision
    )
    fusar.train()
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    steps_per_epoch = math.ceil(len(records) / (cfg.batch_size * cfg.grad_accum))
    info = {
        "stage": cfg.stage,
        "base_model": str(Path(cfg.base_model).resolve()),
        "init": None if cfg.init is None else str(Path(cfg.init).resolve()),
        "data": [str(Path(p).resolve()) for p in cfg.data],
        "records": len(records),
        "tasks": {t: sum(r.task == t for r in records) for t in sorted({r.task for r in records})},
        "trainable_params": n_trainable,
        "trains": (
            {
                "all": True,
                "target_loss_weight": cfg.target_loss_weight,
                "spread_loss_weight": cfg.spread_loss_weight,
                "probe_loss_weight": cfg.probe_loss_weight,
                "position_loss_weight": cfg.position_loss_weight,
                "freeze_language_model": cfg.freeze_language_model,
                "freeze_vision": cfg.freeze_vision,
            }
            if cfg.stage == 0
            else {"tlm": cfg.stage == 1 and not cfg.no_tlm, "lora": cfg.stage == 2 or cfg.stage1_lora}
        ),
        "image_size": sizes[0],
        "loss_mean": cfg.loss_mean,
        "precision": "bf16" if bf16 else "fp32",
        "device": str(device),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "base_model", "init")},
    }
    log.info(
        "stage %d: %d records (%s), %d trainable parameters, %d step(s)/epoch, %s on %s",
        cfg.stage,
        len(records),
        info["tasks"],
        n_trainable,
        steps_per_epoch,
        info["precision"],
        device,
    )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=float(cfg.epochs or 1.0),
        max_steps=cfg.max_steps if cfg.max_steps else -1,
        # warm-up steps rounded down (HF rounds a share up): a 1-step run must not spend its step at lr 0
        warmup_steps=int(
            cfg.warmup * (cfg.max_steps or math.ceil(float(cfg.epochs or 1.0) * steps_per_epoch))
        ),
        lr_scheduler_type="linear",
        weight_decay=cfg.weight_decay,
        optim="adamw_torch",
        logging_steps=cfg.log_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        disable_tqdm=True,
    )
    trainer_cls = _trainer_class()
    collator = Collator(fusar.processor, max_length=cfg.max_length)
    trainer = trainer_cls(
        model=fusar,
        args=args,
        train_dataset=TripletDataset(records),
        data_collator=collator,
        callbacks=[_progress_callback(out, cfg.batch_size, cfg.grad_accum, 0)],
        fusar=fusar,
        train_info=info,
        no_tlm=cfg.no_tlm,
        stage=cfg.stage,
        loss_mean=cfg.loss_mean or "token",
        target_loss_weight=cfg.target_loss_weight,
        spread_loss_weight=cfg.spread_loss_weight,
        probe_loss_weight=cfg.probe_loss_weight,
        position_loss_weight=cfg.position_loss_weight,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes to the log (JsonlProgress), not raw dicts
    from fusarbatch.errors import FusarbatchError, disk_full

    try:
        result = trainer.train(resume_from_checkpoint=str(latest) if cfg.resume and latest else None)
    except Exception as exc:
        if disk_full(exc) is None:
            raise
        # the checkpoint being written has no trainer_state.json (the Trainer writes it last): a --resume
        # would refuse it, so it goes; the message says how to go on from what is left
        removed = _remove_incomplete_checkpoint(out / f"checkpoint-{trainer.state.global_step}")
        gone = f" (the incomplete {removed.name} was removed)" if removed is not None else ""
        full = disk_full(exc, f"a checkpoint in {out}", fix=_rerun_advice(out) + gone)
        raise FusarbatchError(full) from None
    wall = time.perf_counter() - started
    info["wall_s"] = round(wall, 1)
    info["train_runtime_s"] = round(float(result.metrics.get("train_runtime", 0.0)), 1)
    trainer.train_info = info
    # written into a staging folder first: --out holds the final model's files only once all are written
    partial = fresh_staging(out)
    losses = _read_losses(out / LOG_FILE)
    try:
        trainer.save_model(str(partial))
        plot_loss(
            losses,
            partial / LOSS_PNG,
            title=f"stage {cfg.stage}: {len(records)} records, {trainer.state.global_step} steps",
        )
    except Exception as exc:
        shutil.rmtree(partial, ignore_errors=True)
        full = disk_full(exc, f"the final model in {out}", fix=_rerun_advice(out))
        if full is not None:
            raise FusarbatchError(full) from None
        raise
    move_into(partial, out)
    final = losses[-1][1] if losses else None
    log.info("stage %d done in %.0f s: %s (final loss %s)", cfg.stage, wall, out, final)
    return TrainResult(
        out=out,
        steps=int(trainer.state.global_step),
        records=len(records),
        final_loss=final,
        wall_s=wall,
        trainable_params=n_trainable,
    )


def _read_losses(path: Path) -> list[tuple[int, float]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj.get("loss"), int | float) and math.isfinite(obj["loss"]):
                rows.append((int(obj["step"]), float(obj["loss"])))
    return rows


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
