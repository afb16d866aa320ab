"""The model ``fusarbatch run`` uses when no ``--model`` is given.

The packaged demo model, ``fusarbatch/model/demo_model/``: a tiny FUSAR-GPT (about 1 M parameters) trained
by ``fusarbatch train`` on real SAR chips (``training/make_demo.sh``; model card in its ``README.md``,
metrics in ``training/RESULTS.md``). It answers in the right formats but mostly with its training prior: a
demonstration of the method at toy scale, not the paper's 7B model.

When that folder is absent (a stripped install), the fallback is the tiny offline Qwen2.5-VL of
:mod:`fusarbatch.model.tiny` with a TLM and **random weights**: it exercises the whole pipeline but its
answers are noise. It is built once, deterministically, in ``$FUSARBATCH_CACHE`` (default
``~/.cache/fusarbatch``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).resolve().parent / "demo_model"
TINY_NAME = "tiny-random-fusar-gpt-v1"


def cache_dir() -> Path:
    """``$FUSARBATCH_CACHE`` or ``~/.cache/fusarbatch``."""
    return Path(os.environ.get("FUSARBATCH_CACHE") or Path.home() / ".cache" / "fusarbatch")


def demo_model_dir() -> Path:
    """Directory of the default model: the packaged trained demo model when present, else the tiny random
    model, built on first use (atomically: a temporary folder renamed into place)."""
    if (PACKAGED / "config.json").is_file():
        return PACKAGED
    target = cache_dir() / TINY_NAME
    if (target / "config.json").is_file():
        return target
    from fusarbatch.model.fusar_gpt import FusarGPT
    from fusarbatch.model.tiny import build_tiny_model

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the tiny random-weight demo model in %s (no trained demo model is packaged)", target)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        base = build_tiny_model(Path(tmp) / "base", seed=0)
        staged = Path(tmp) / "full"
        FusarGPT.from_pretrained(base, init_tlm=True, device="cpu").save_full(staged)
        try:
            staged.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                staged.rename(target)
    return target
