"""FUSAR-GPT = Qwen2.5-VL + TLM + LoRA, loaded from local directories (DESIGN 3.4, STACK sections 2-4).

One code path serves the tiny offline test model (:func:`fusarbatch.model.tiny.build_tiny_model`) and a real
Qwen2.5-VL-7B-Instruct directory:

- the base ``Qwen2_5_VLForConditionalGeneration`` is loaded from ``model_dir`` (``local_files_only``;
  safetensors weights only);
- the :class:`~fusarbatch.model.tlm.TLM` modulates the output of the vision tower through a forward hook on
  ``model.model.visual`` (transformers 5.x; under peft ``get_base_model().model.visual``): its
  ``pooler_output`` is ``(sum of tokens, C)``, images in batch order, each in raster order over the merged
  grid (the window permutation of the merger is undone inside ``visual.forward`` by
  ``argsort(window_index)``). ``generate`` runs the tower once, at prefill;
- an optional peft LoRA adapter (``adapter_dir``), loaded as it is (the released stage-1 adapter also covers
  the vision tower); new adapters (:meth:`FusarGPT.add_lora`) cover only the LLM's projections.

Anchors for the current batch are set on the wrapper (:meth:`FusarGPT.use_anchors`, or the ``anchors``
argument of :meth:`FusarGPT.forward` / :meth:`FusarGPT.generate`); running the vision tower without them is
an error, so a forgotten anchor list cannot silently give unmodulated tokens. The wrapper is not thread-safe
(one model per worker thread).

Checkpoint layout (adapter directory; official FUSAR-GPT release plus fusarbatch's safetensors):
``adapter_config.json``, ``adapter_model.safetensors`` (peft), ``tlm_config.json``, and the TLM MLP as
``tlm.safetensors`` (written by fusarbatch) or ``vec64_film.pt`` (official: ``{"film_mlp": state_dict}``,
read with ``torch.load(weights_only=True)``). Without ``tlm_config.json`` (the released checkpoints) the
legacy settings sigma 2, hidden_mult 4, image_size 504 are assumed and logged.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from fusarbatch.errors import ModelError
from fusarbatch.model.checks import (
    _PROCESSOR_FILES,
    TLM_CONFIG_FILE,
    TLM_LEGACY_FILE,
    TLM_WEIGHTS_FILE,
    _json_object,
    check_adapter_dir,
    check_model_dir,
    resolve_model_dirs,
)
from fusarbatch.model.tlm import TLM, Anchors, TLMConfig

__all__ = [
    "LORA_TARGET_REGEX",
    "TLM_CONFIG_FILE",
    "TLM_LEGACY_FILE",
    "TLM_WEIGHTS_FILE",
    "FusarGPT",
    "Generation",
    "ImageOnlyQwen2_5_VLProcessor",
    "ProcessedImage",
    "check_adapter_dir",
    "check_model_dir",
    "decoded_token_spans",
    "load_processor",
    "load_tlm",
    "lora_config",
    "model_image_size",
    "resolve_model_dirs",
    "save_tlm",
]

log = logging.getLogger(__name__)

LORA_TARGET_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""peft ``target_modules`` regex (full match): the LLM's attention and MLP projections, never the vision
tower (a plain name list would also wrap ``visual.blocks.*.mlp.*_proj``; STACK section 3)."""


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without the video processor (STACK section 2).

    Without torchvision, transformers 5.x has no video processor, ``Qwen2_5_VLProcessor(...)`` fails and
    ``AutoProcessor`` silently returns only the tokenizer. Images only; same outputs otherwise
    (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


@dataclass(frozen=True)
class Generation:
    """One generated answer.

    :ivar text: decoded new tokens (special tokens removed, surrounding white space stripped).
    :ivar token_ids: the new token ids, without the end-of-sequence token and padding.
    :ivar logprob: sum of the natural-log probabilities of the generated tokens, end token included when
        there is one (greedy decoding: each is the maximum log-softmax of its step); ``exp(logprob)`` is the
        sequence probability.
    :ivar finished: True when the model ended the answer itself, False when ``max_new_tokens`` cut it.
    :ivar token_logprobs: per token of ``token_ids`` (same order and length; the end token is not in it),
        the natural-log probability of the greedy choice at its step (float32 log-softmax of the final
        scores, as a Python float; ``<= 0``). Character ranges of the tokens in ``text``:
        :meth:`FusarGPT.token_spans`.
    """

    text: str
    token_ids: tuple[int, ...]
    logprob: float
    finished: bool
    token_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    """One image after the image processor (:meth:`FusarGPT.process_images`): made once per tile and
    reused by every prompt about it.

    :ivar pixel_values: ``(t * hp * wp, 3 * temporal_patch * patch**2)`` float32 on the CPU (``(1296, 1176)``
        for a 504 x 504 image: 36 x 36 patches of 14 px, temporal patch 2), the processor's normalised
        patches in its order.
    :ivar grid_thw: ``(3,)`` int64 ``(t, hp, wp)``, the pre-merge patch grid.
    :ivar n_tokens: visual tokens after the merger, ``t * hp * wp // merge_size**2`` (324 for 504 x 504).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    n_tokens: int


class _GreedyLogprob(LogitsProcessor):
    """Records, per step, the log-probability of the greedy choice (= max log-softmax of the final scores)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).max(dim=-1).values)
        return scores


def decoded_token_spans(tokenizer: Any, token_ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(start, end)`` of each token in ``tokenizer.decode(token_ids, skip_special_tokens=True).strip()``
    (the text of a :class:`Generation`); see :meth:`FusarGPT.token_spans`."""
    ids = list(token_ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    lead = len(full) - len(full.lstrip())
    size = len(full.strip())
    spans: list[tuple[int, int]] = []
    done = 0  # characters of `full` covered by the tokens so far
    for k in range(len(ids)):
        prefix = tokenizer.decode(ids[: k + 1], skip_special_tokens=True)
        # past an incomplete UTF-8 sequence (U+FFFD) or a clean-up rule, only the agreeing part counts
        end = len(prefix) if full.startswith(prefix) else _agreeing(prefix, full)
        end = max(end, done)
        spans.append((min(max(done - lead, 0), size), min(max(end - lead, 0), size)))
        done = end
    return tuple(spans)


def _agreeing(a: str, b: str) -> int:
    """Length of the common prefix of two strings."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------- loading


def load_processor(source: str | Path) -> ImageOnlyQwen2_5_VLProcessor:
    """The image+text processor from a local directory, always with the PIL image backend.

    The PIL backend is forced (``Qwen2VLImageProcessorPil``) so training and serving resize identically
    whether or not torchvision is installed (the two backends differ by up to 0.015; STACK decision 3).
    The tokenizer pads on the LEFT (batched generation).

    :raises ModelError: when files are missing or the directory has no chat template.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    d = Path(source)
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(d, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"processor dir {d}: cannot load the tokenizer/image processor ({exc})") from exc
    processor = ImageOnlyQwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_read_chat_template(d, tokenizer)
    )
    if not processor.chat_template:
        raise ModelError(f"processor dir {d}: chat_template.jinja (or chat_template.json) missing")
    processor.tokenizer.padding_side = "left"
    return processor


def _read_chat_template(d: Path, tokenizer: Any) -> str | None:
    """``chat_template.jinja`` (transformers 5), else ``chat_template.json`` (Qwen releases), else the
    tokenizer's own template."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        try:
            template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ModelError(f"processor dir {d}: chat_template.json unreadable ({exc})") from exc
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


def lora_config(r: int = 8, alpha: int = 32, dropout: float = 0.05) -> Any:
    """The FUSAR-GPT LoRA configuration (DESIGN 3.4): r 8, alpha 32, dropout 0.05, bias none, on the LLM's
    q/k/v/o/gate/up/down projections only (:data:`LORA_TARGET_REGEX`). Returns a ``peft.LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=LORA_TARGET_REGEX,
        task_type="CAUSAL_LM",
    )


def load_tlm(directory: str | Path, hidden_size: int) -> TLM:
    """Load a TLM from ``directory`` (``tlm.safetensors`` preferred, else the official ``vec64_film.pt``).

    ``tlm_config.json`` gives sigma/hidden_mult/image_size; without it the legacy release settings (sigma 2,
    hidden_mult 4, image_size 504) are assumed and logged at WARNING level.

    :param directory: an adapter (or full model) directory.
    :param hidden_size: ``C``, the LLM hidden size the TLM must match.
    :raises ModelError: no weights file, an unreadable config or weights that do not fit ``C``.
    """
    d = Path(directory)
    cfg_path = d / TLM_CONFIG_FILE
    if cfg_path.is_file():
        try:
            config = TLMConfig.from_json_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"TLM dir {d}: {TLM_CONFIG_FILE} invalid ({exc})") from exc
    else:
        config = TLMConfig()
        log.warning(
            "TLM dir %s: no %s, assuming the legacy release settings "
            "(sigma %.1f, hidden_mult %d, image_size %d)",
            d,
            TLM_CONFIG_FILE,
            config.sigma,
            config.hidden_mult,
            config.image_size,
        )
    if (d / TLM_WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        source = d / TLM_WEIGHTS_FILE
        state = load_file(str(source))
    elif (d / TLM_LEGACY_FILE).is_file():
        source = d / TLM_LEGACY_FILE
        try:
            blob = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure is a bad checkpoint file
            raise ModelError(f"TLM dir {d}: {TLM_LEGACY_FILE} unreadable ({exc})") from exc
        if not isinstance(blob, dict) or not isinstance(blob.get("film_mlp"), dict):
            raise ModelError(f"TLM dir {d}: {TLM_LEGACY_FILE} has no 'film_mlp' state dict")
        state = blob["film_mlp"]
    else:
        raise ModelError(f"TLM dir {d}: {TLM_WEIGHTS_FILE} (or {TLM_LEGACY_FILE}) missing")
    tlm = TLM(hidden_size, config)
    try:
        tlm.film_mlp.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except (RuntimeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"TLM dir {d}: {source.name} does not fit a model with hidden size {hidden_size} "
            f"and hidden_mult {config.hidden_mult} ({first})"
        ) from exc
    log.info("TLM loaded from %s (sigma %s, hidden_mult %s)", source, config.sigma, config.hidden_mult)
    return tlm


def model_image_size(model_dir: str | Path, adapter_dir: str | Path | None = None) -> int:
    """The square input side (pixels) the model answers on, without loading it: ``image_size`` of the
    ``tlm_config.json`` beside the TLM weights that :meth:`FusarGPT.from_pretrained` loads (the adapter
    directory's when it has TLM weights, else the model directory's); 504 (the legacy release) when there
    is none. Boxes of the model's answers are on this grid (:attr:`FusarGPT.image_size`).

    :raises ModelError: an unreadable or invalid ``tlm_config.json``.
    """
    dirs = [Path(d) for d in (adapter_dir, model_dir) if d is not None]
    tlm_dir = next(
        (d for d in dirs if any((d / f).is_file() for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE))), None
    )
    if tlm_dir is None or not (tlm_dir / TLM_CONFIG_FILE).is_file():
        return TLMConfig().image_size
    try:
        return TLMConfig.from_json_dict(_json_object(tlm_dir, TLM_CONFIG_FILE, "TLM dir")).image_size
    except (ValueError, TypeError) as exc:
        raise ModelError(f"TLM dir {tlm_dir}: {TLM_CONFIG_FILE} invalid ({exc})") from None


def save_tlm(tlm: TLM, directory: str | Path) -> None:
    """Write ``tlm.safetensors`` (float32 ``film_mlp`` state dict) and ``tlm_config.json`` to a directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tlm.film_mlp.state_dict().items()
    }
    save_file(state, str(d / TLM_WEIGHTS_FILE), metadata={"format": "pt"})
    (d / TLM_CONFIG_FILE).write_text(json.dumps(tlm.config.to_json_dict(), indent=2) + "\n", encoding="utf-8")


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft 0.21 calls ``is_gradient_checkpointing``, deprecated in transformers 5.x: silence that warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _default_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return dev, dtype


# --------------------------------------------------------------------------------------------- the model
class FusarGPT(nn.Module):
    """Qwen2.5-VL + TLM (+ LoRA), with batched greedy generation.

    Build it with :meth:`from_pretrained`. Children: ``model`` (the transformers model, or its peft wrapper)
    and ``tlm``; ``processor`` is the :class:`ImageOnlyQwen2_5_VLProcessor`.
    """

    def __init__(self, model: nn.Module, processor: ImageOnlyQwen2_5_VLProcessor, tlm: TLM) -> None:
        super().__init__()
        self.model = model
        self.tlm = tlm
        self.processor = processor
        self._anchors: list[Anchors | None] | None = None
        base = self.base_model
        if not isinstance(base, Qwen2_5_VLForConditionalGeneration):
            raise ModelError(f"expected a Qwen2_5_VLForConditionalGeneration, got {type(base).__name__}")
        if tlm.hidden_size != base.config.text_config.hidden_size:
            raise ModelError(
                f"TLM hidden size {tlm.hidden_size} != LLM hidden size {base.config.text_config.hidden_size}"
            )
        self._hook = self.visual.register_forward_hook(self._modulate_visual_output, with_kwargs=True)

    # ----------------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        adapter_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        init_tlm: bool = False,
        trainable: bool = False,
        attn_implementation: str = "sdpa",
    ) -> FusarGPT:
        """Load base model, processor, TLM and LoRA adapter from local directories (never the hub).

        :param model_dir: a Qwen2.5-VL model directory (:func:`check_model_dir`), or a full FUSAR-GPT
            directory written by :meth:`save_full` (it then also holds the TLM).
        :param adapter_dir: a FUSAR-GPT checkpoint: TLM weights (required) and optionally a peft LoRA adapter
            (``adapter_config.json`` + ``adapter_model.safetensors``) and processor files (used in preference
            to ``model_dir``'s, as the official inference does).
        :param device: default CUDA when available, else CPU.
        :param dtype: model dtype; default bfloat16 on a bf16-capable GPU, else float32. The TLM stays float32
            (its MLP runs under autocast when the visual tokens are bf16, as in the official training).
        :param init_tlm: when no TLM weights are found, start a new (randomly initialised) TLM instead of
            failing; for stage-1 training from a base model and for tests.
        :param trainable: load the LoRA adapter with trainable weights (training resumes); default frozen.
        :param attn_implementation: transformers attention backend (``sdpa``, ``eager``,
            ``flash_attention_2``).
        :raises ModelError: missing or incomplete directories (the message names the missing file).
        """
        mdir = check_model_dir(model_dir)
        adir = Path(adapter_dir) if adapter_dir is not None else None
        has_lora = False
        if adir is not None:
            if not adir.is_dir():
                raise ModelError(f"adapter dir {adir}: directory missing")
            has_lora = (adir / "adapter_config.json").is_file()
            if has_lora and not any(
                (adir / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")
            ):
                raise ModelError(
                    f"adapter dir {adir}: adapter_model.safetensors missing (adapter_config.json present)"
                )
            has_tlm = any((adir / f).is_file() for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE))
            if not has_tlm and not init_tlm:
                raise ModelError(f"adapter dir {adir}: {TLM_WEIGHTS_FILE} (or {TLM_LEGACY_FILE}) missing")
        dev, dt = _default_device_dtype(device, dtype)

        proc_dir = adir if adir is not None and any((adir / f).is_file() for f in _PROCESSOR_FILES) else mdir
        processor = load_processor(proc_dir)
        try:
            # device_map: weights go straight to the device (no full copy in host memory first)
            base, loading = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                mdir,
                dtype=dt,
                local_files_only=True,
                attn_implementation=attn_implementation,
                device_map=str(dev),
                output_loading_info=True,
            )
        except Exception as exc:  # OSError, ValueError, RuntimeError (shape mismatches), validation errors
            text = str(exc).strip()
            if "mismatched" in text or "size mismatch" in text:
                detail = "tensors of another shape than config.json says"
            else:
                detail = text.splitlines()[0][:300] if text else type(exc).__name__
            raise ModelError(
                f"model dir {mdir}: cannot load the model ({detail}); restore the model files"
            ) from exc
        unused = sorted(loading.get("unexpected_keys") or ())
        if unused:
            log.warning(
                "model dir %s: %d tensor(s) in the weights are not used by the model, e.g. %r",
                mdir,
                len(unused),
                unused[0][:100],
            )
        # transformers fills weights missing from the files with random values and only logs it
        missing = sorted(loading.get("missing_keys") or ())
        mismatched = list(loading.get("mismatched_keys") or ())
        if missing or mismatched:
            bad = missing or [str(m[0]) if isinstance(m, tuple | list) else str(m) for m in mismatched]
            raise ModelError(
                f"model dir {mdir}: the weights do not match config.json ({len(missing)} tensor(s) missing, "
                f"{len(mismatched)} of another shape, e.g. {bad[0]}); restore the model files"
            )
        hidden = int(base.config.text_config.hidden_size)

        tlm_dir = next(
            (
                d
                for d in (adir, mdir)
                if d is not None and any((d / f).is_file() for f in (TLM_WEIGHTS_FILE, TLM_LEGACY_FILE))
            ),
            None,
        )
        if tlm_dir is not None:
            tlm = load_tlm(tlm_dir, hidden)
        elif init_tlm:
            tlm = TLM(hidden)
            log.info("no TLM weights in %s: new TLM (hidden size %d, default init)", adir or mdir, hidden)
        else:
            raise ModelError(
                f"model dir {mdir}: {TLM_WEIGHTS_FILE} (or {TLM_LEGACY_FILE}) missing; pass an adapter_dir "
                "with TLM weights, or init_tlm=True to start a new TLM"
            )
        tlm.to(dev)

        model: nn.Module = base
        if has_lora:
            from peft import PeftModel

            with _quiet_peft():
                model = PeftModel.from_pretrained(base, adir, is_trainable=trainable, local_files_only=True)
            log.info("LoRA adapter loaded from %s", adir)
        fusar = cls(model, processor, tlm)
        fusar.eval()
        return fusar

    # ----------------------------------------------------------------------------------- structure
    @property
    def base_model(self) -> Qwen2_5_VLForConditionalGeneration:
        """The transformers model (inside the peft wrapper when there is one)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m  # type: ignore[return-value]

    @property
    def visual(self) -> nn.Module:
        """The vision tower, ``base_model.model.visual`` (transformers 5.x layout)."""
        return self.base_model.model.visual

    @property
    def has_lora(self) -> bool:
        """True while a peft adapter wraps the model (False after :meth:`merge_lora`)."""
        return hasattr(self.model, "peft_config")

    @property
    def device(self) -> torch.device:
        """Device of the input embeddings (where inputs go)."""
        return self.base_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the base model."""
        return self.base_model.get_input_embeddings().weight.dtype

    @property
    def image_size(self) -> int:
        """Square input side (pixels) the model was trained at and answers on: ``image_size`` of
        ``tlm_config.json`` (504 for FUSAR-GPT and the legacy release). Boxes in its answers are on this
        grid; :func:`model_image_size` reads it without loading the model."""
        return self.tlm.config.image_size

    def add_lora(self, config: Any = None) -> FusarGPT:
        """Wrap the model in a new peft LoRA adapter (default :func:`lora_config`); returns self.

        :raises ValueError: if an adapter is already attached.
        """
        from peft import get_peft_model

        if self.has_lora:
            raise ValueError("a LoRA adapter is already attached")
        with _quiet_peft():
            self.model = get_peft_model(self.model, config or lora_config())
        return self

    def merge_lora(self) -> FusarGPT:
        """Merge the LoRA weights into the base model and drop the peft wrapper (for serving); returns self.

        The official code never merges; merged and unmerged outputs agree to float rounding.
        """
        if self.has_lora:
            with _quiet_peft():
                self.model = self.model.merge_and_unload()  # type: ignore[operator]
        return self

    def lora_module_names(self) -> list[str]:
        """Names (in the base model) of the modules that carry LoRA weights."""
        return [n for n, m in self.base_model.named_modules() if hasattr(m, "lora_A")]

    # ----------------------------------------------------------------------------------- saving
    def save(self, directory: str | Path) -> Path:
        """Write a checkpoint: the peft adapter (when attached), ``tlm.safetensors`` and ``tlm_config.json``.

        Loadable with ``from_pretrained(model_dir, adapter_dir=directory)``.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            with _quiet_peft():
                self.model.save_pretrained(d)  # type: ignore[operator]
        save_tlm(self.tlm, d)
        return d

    def save_full(self, directory: str | Path) -> Path:
        """Write a self-contained model directory (weights, processor, TLM): ``from_pretrained(directory)``.

        :raises ValueError: while a LoRA adapter is attached (call :meth:`merge_lora` first).
        """
        if self.has_lora:
            raise ValueError(
                "merge the LoRA adapter first (merge_lora()) or use save() for an adapter checkpoint"
            )
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.base_model.save_pretrained(d)
        self.processor.save_pretrained(d)
        save_tlm(self.tlm, d)
        return d

    # ----------------------------------------------------------------------------------- anchors + hook
    @contextmanager
    def use_anchors(self, anchors: Sequence[Anchors | None]) -> Iterator[None]:
        """Set the anchors of the images of the next forward/generate calls (one entry per image, in order).

        ``None`` entries (and :meth:`Anchors.empty`) leave that image unmodulated.
        """
        previous = self._anchors
        self._anchors = list(anchors)
        try:
            yield
        finally:
            self._anchors = previous

    def _modulate_visual_output(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        grid_thw = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        if self._anchors is None:
            raise RuntimeError(
                "FusarGPT: the vision tower ran without anchors; use generate(..., anchors=[...]), "
                "forward(..., anchors=[...]) or `with model.use_anchors([...])` (None entries: no modulation)"
            )
        output.pooler_output = self.tlm.modulate(
            output.pooler_output, grid_thw, self._anchors, int(module.spatial_merge_size)
        )
        return output

    # ----------------------------------------------------------------------------------- inputs
    def chat_text(self, prompt: str) -> str:
        """The chat-formatted text of one user turn (one image, then ``prompt``) with the assistant prefix."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prepare_image(self, image: Image.Image, image_size: int | None) -> Image.Image:
        """RGB, resized to ``image_size`` x ``image_size`` with bicubic resampling (training rendering);
        ``image_size=None`` keeps the size (the processor then rounds it to multiples of 28)."""
        image = image.convert("RGB")
        if image_size is not None and image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return image

    def build_inputs(
        self, images: Sequence[Image.Image], prompts: Sequence[str], *, image_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch (left padded), on the model's device.

        :returns: ``input_ids`` / ``attention_mask`` / ``mm_token_type_ids`` ``(B, L)``, ``pixel_values``
            ``(sum t*hp*wp, 1176)`` in the model dtype, ``image_grid_thw`` ``(B, 3)``.
        """
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pics = [self.prepare_image(im, image_size) for im in images]
        enc = self.processor(
            text=[self.chat_text(p) for p in prompts], images=pics, padding=True, return_tensors="pt"
        )
        out = {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def process_images(
        self, images: Sequence[Image.Image], *, image_size: int | str | None = "model"
    ) -> list[ProcessedImage]:
        """Run the image processor once per image (:meth:`prepare_image`, then the PIL Qwen2-VL image
        processor: resize to multiples of 28, rescale, normalise, patchify).

        :param image_size: as in :meth:`generate` (``"model"``: the TLM's 504 x 504).
        :returns: one :class:`ProcessedImage` per image, in order (CPU tensors).
        """
        if not images:
            return []
        size = self.image_size if image_size == "model" else image_size
        pics = [self.prepare_image(im, size) for im in images]  # type: ignore[arg-type]
        enc = self.processor.image_processor(images=pics, return_tensors="pt")
        grids = enc["image_grid_thw"].to(torch.int64)
        merge = int(self.processor.image_processor.merge_size)
        sizes = [int(g.prod()) for g in grids]
        chunks = torch.split(enc["pixel_values"].to(torch.float32), sizes)
        return [
            ProcessedImage(chunk, grid, size // merge**2)
            for chunk, grid, size in zip(chunks, grids, sizes, strict=True)
        ]

    def inputs_from_processed(
        self, processed: Sequence[ProcessedImage], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The same model inputs as :meth:`build_inputs` (left padded, on the model's device) from images
        processed before: each chat text's ``<|image_pad|>`` is expanded to the image's token count (what
        the processor does) and the pixel rows are concatenated, so an image asked several prompts is
        processed once.

        :raises ValueError: ``processed`` and ``prompts`` differ in length.
        """
        if len(processed) != len(prompts):
            raise ValueError(f"{len(processed)} images but {len(prompts)} prompts")
        pad = self.processor.image_token
        texts = [
            self.chat_text(p).replace(pad, pad * im.n_tokens, 1)
            for im, p in zip(processed, prompts, strict=True)
        ]
        enc = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        out = {
            "input_ids": ids,
            "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": (ids == self.processor.image_token_id).to(torch.int64),
            "pixel_values": torch.cat([im.pixel_values for im in processed]),
            "image_grid_thw": torch.stack([im.grid_thw for im in processed]),
        }
        out = {k: v.to(self.device) for k, v in out.items()}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    @torch.inference_mode()
    def image_tokens(
        self, processed: Sequence[ProcessedImage], anchors: Sequence[Anchors | None]
    ) -> list[torch.Tensor]:
        """The modulated visual tokens of a batch of images: vision tower (with any LoRA merged into it),
        merger and TLM, in one batched call, as ``generate`` computes them at prefill.

        :returns: per image an ``(n_tokens, C)`` tensor on the model's device, in the model dtype (C = the
            LLM hidden size), raster order over the merged grid.
        :raises ValueError: ``anchors`` and ``processed`` differ in length.
        """
        if len(anchors) != len(processed):
            raise ValueError(f"{len(processed)} images but {len(anchors)} anchor sets")
        if not processed:
            return []
        pixels = torch.cat([im.pixel_values for im in processed]).to(self.device, self.dtype)
        grids = torch.stack([im.grid_thw for im in processed]).to(self.device)
        with self.use_anchors(anchors):
            tokens = self.visual(pixels, grid_thw=grids).pooler_output
        return list(torch.split(tokens, [im.n_tokens for im in processed]))

    def eos_token_ids(self) -> list[int]:
        """End-of-answer token ids: the generation config's and the tokenizer's, sorted.

        :raises ModelError: the model has none.
        """
        tok = self.processor.tokenizer
        eos = self.base_model.generation_config.eos_token_id
        candidates = [*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id]
        eos_ids = sorted({int(e) for e in candidates if e is not None})
        if not eos_ids:
            raise ModelError("the model has no end-of-sequence token (generation_config or tokenizer)")
        return eos_ids

    # ----------------------------------------------------------------------------------- running
    def forward(self, anchors: Sequence[Anchors | None], **inputs: Any) -> Any:
        """The model's forward (e.g. with ``labels`` for training) with ``anchors`` for the batch's images."""
        with self.use_anchors(anchors):
            return self.model(**inputs)

    @torch.inference_mode()
    def generate_detailed(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        anchors: Sequence[Anchors | None] | None = None,
        *,
        max_new_tokens: int = 1024,
        image_size: int | str | None = "model",
    ) -> list[Generation]:
        """Greedy, batched generation (left padding; vision tower once per batch). See :meth:`generate`.

        :returns: one :class:`Generation` per image (text, token ids, log-probability, finished flag).
        """
        n = len(images)
        if len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        anchor_list = [None] * n if anchors is None else list(anchors)
        if len(anchor_list) != n:
            raise ValueError(f"{n} images but {len(anchor_list)} anchor sets")
        if n == 0:
            return []
        size = self.image_size if image_size == "model" else image_size
        inputs = self.build_inputs(images, prompts, image_size=size)  # type: ignore[arg-type]
        return self._generate_inputs(inputs, anchor_list, max_new_tokens)

    @torch.inference_mode()
    def generate_tiles(
        self,
        images: Sequence[Image.Image],
        anchors: Sequence[Anchors | None],
        prompts: Sequence[Sequence[str]],
        *,
        max_new_tokens: int = 1024,
        batch_size: int = 8,
    ) -> list[list[Generation]]:
        """Answer several prompts per image (the worker's call): each image is processed once
        (:meth:`process_images`, at the model's image size), then the (image, prompt) rows are generated
        ``batch_size`` at a time, greedily: the first prompts of all images, then the second ones, and so
        on. The vision tower runs once per row (the vLLM engine runs it once per image).

        :param prompts: per image, its prompts.
        :returns: per image, one :class:`Generation` per prompt.
        :raises ValueError: ``images``, ``anchors`` and ``prompts`` differ in length.
        """
        if not len(images) == len(anchors) == len(prompts):
            raise ValueError(f"{len(images)} images, {len(anchors)} anchor sets, {len(prompts)} prompt lists")
        processed = self.process_images(images)
        depth = max((len(ps) for ps in prompts), default=0)
        rows = [(i, ps[k]) for k in range(depth) for i, ps in enumerate(prompts) if k < len(ps)]
        out: list[list[Generation]] = [[] for _ in images]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = self.inputs_from_processed([processed[i] for i, _ in chunk], [p for _, p in chunk])
            gens = self._generate_inputs(inputs, [anchors[i] for i, _ in chunk], max_new_tokens)
            for (i, _), gen in zip(chunk, gens, strict=True):
                out[i].append(gen)
        return out

    def _generate_inputs(
        self, inputs: dict[str, torch.Tensor], anchor_list: list[Anchors | None], max_new_tokens: int
    ) -> list[Generation]:
        n = int(inputs["input_ids"].shape[0])
        tok = self.processor.tokenizer
        eos_ids = self.eos_token_ids()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
        gen_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            bos_token_id=None,
        )
        recorder = _GreedyLogprob()
        with self.use_anchors(anchor_list):
            sequences = self.model.generate(  # type: ignore[operator]
                **inputs, generation_config=gen_config, logits_processor=LogitsProcessorList([recorder])
            )
        new = sequences[:, inputs["input_ids"].shape[1] :].cpu()
        step_logprobs = torch.stack(recorder.steps, dim=1).cpu() if recorder.steps else torch.zeros(n, 0)
        results = []
        eos_set = set(eos_ids)
        for row, lp in zip(new.tolist(), step_logprobs, strict=True):
            end = next((i for i, t in enumerate(row) if t in eos_set), None)
            ids = row if end is None else row[:end]
            steps = len(row) if end is None else end + 1
            logprob = float(lp[:steps].double().sum()) if steps else 0.0
            results.append(
                Generation(
                    text=tok.decode(ids, skip_special_tokens=True).strip(),
                    token_ids=tuple(ids),
                    logprob=logprob if math.isfinite(logprob) else float("-inf"),
                    finished=end is not None,
                    token_logprobs=tuple(float(v) for v in lp[: len(ids)].tolist()),
                )
            )
        return results

    def token_spans(self, generation: Generation) -> tuple[tuple[int, int], ...]:
        """Character range ``(start, end)`` in ``generation.text`` of each of its ``token_ids``.

        Found by incremental decoding: token ``k`` ends where the decoded prefix ``token_ids[:k + 1]`` stops
        agreeing with the decoded answer, so it works for any tokenizer (byte-level BPE, SentencePiece). A
        token that only completes a multi-byte character later (and special tokens, which decode to
        nothing) gets an empty range; ranges are clipped to the stripped ``text``. Costs one decode per
        token.
        """
        return decoded_token_spans(self.processor.tokenizer, generation.token_ids)

    def generate(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        anchors: Sequence[Anchors | None] | None = None,
        *,
        max_new_tokens: int = 1024,
        image_size: int | str | None = "model",
    ) -> list[str]:
        """Answer one prompt per image, greedily, as one left-padded batch.

        :param images: PIL images (any mode/size; converted to RGB).
        :param prompts: one prompt per image (:mod:`fusarbatch.model.prompts`); the chat template is applied.
        :param anchors: one :class:`Anchors` or None per image; None for the whole argument = no anchors.
        :param max_new_tokens: generation limit per answer.
        :param image_size: ``"model"`` (default): resize to the model's own size (:attr:`image_size`, from
            ``tlm_config.json``; 504 for FUSAR-GPT), bicubic, so boxes come back on that grid; an int: that
            square size; None: keep each image's size
            (rounded to multiples of 28 by the processor; boxes are then on that grid).
        :returns: the decoded answers, in input order.
        """
        out = self.generate_detailed(
            images, prompts, anchors, max_new_tokens=max_new_tokens, image_size=image_size
        )
        return [g.text for g in out]
