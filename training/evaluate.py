"""``fusarbatch eval``: answer a manifest's questions, score them, and print the scores beside baselines.

**Engines.** ``model`` (default): each record is answered by
:meth:`fusarbatch.model.FusarGPT.generate_detailed` exactly as at inference -- chat template, the image
resized to the model's own grid (``image_size`` of its ``tlm_config.json``), greedy decoding, batched with
left padding -- and parsed by the never-raising parsers of :mod:`fusarbatch.model.prompts` on that grid
(:mod:`training.answers`). Detection boxes are then scored under the label asked, as ``run`` does, scaled
per axis to the record's grid (``coordinate_size``), each with its own score
(:mod:`fusarbatch.model.confidence`). A classification question whose box is on another grid than the
model's is rewritten to the model's grid. ``no_tlm`` switches the TLM off (the ablation). ``cfar``: the CFAR
detector alone (:func:`training.baselines.cfar_predictions`; no model), which answers detection, counting
and grounding. Caption records are answered but not scored.

**Metrics** (:mod:`training.metrics`): counting accuracy; grounding Acc@100 / Acc@50 / Top-1; classification
accuracy; detection precision / recall / F1 at IoU 0.25 and 0.5 on the boxes scored at least ``min_score``
(the default of ``run --min-score``) and VOC all-point AP at IoU 0.5 from every box and its score.

**Baselines**, scored on the same records (:mod:`training.baselines`): majority answers (from
``train_data`` when given, else from the evaluated records, and the table says which), a constant median
box, the engine's own predictions paired with other records' ground truth (shuffled images), and, for the
model engine, CFAR. Every table says which baselines the engine beats (strictly higher value).

Outputs in ``out`` (default ``./eval_<model folder name>`` in the working directory, ``_no_tlm`` with
``no_tlm``, ``./eval_cfar`` for CFAR; never inside the model's folder), each written to a temporary name and
renamed: ``metrics.json`` (engine metrics, every baseline's metrics and what it used, the beats table,
settings, wall time), ``metrics.md`` (the same as markdown tables) and ``predictions.jsonl`` (one line per
record: id, task, class, expected and generated answer, parsed value, per-box scores, parse error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusarbatch.errors import UsageError
from fusarbatch.model.prompts import Box, regrid_classification_prompt
from training.answers import Prediction, label_of, read_answer, truth_of
from training.baselines import (
    SHUFFLE_SEED,
    cfar_predictions,
    majority_predictions,
    median_box_predictions,
    pair_prediction,
    priors_from,
    shuffled_pairs,
)
from training.eval_tables import beats_table, metrics_markdown
from training.manifest import TASKS, Triplet
from training.metrics import (
    AP_IOU,
    IOU_THRESHOLDS,
    average_precision,
    classification_metrics,
    counting_metrics,
    detection_metrics,
    grounding_metrics,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MIN_SCORE",
    "ENGINES",
    "EvalConfig",
    "beats_table",
    "default_out",
    "evaluate",
    "evaluate_and_report",
    "load_model_for_eval",
    "metrics_markdown",
    "score_predictions",
]

log = logging.getLogger(f"fusarbatch.{__name__}")  # shown by the fusarbatch CLI

DEFAULT_MAX_NEW_TOKENS = {
    "caption": 160,
    "counting": 8,
    "grounding": 24,
    "classification": 16,
    "detection": 320,
}
"""Generation budget per task (a detection answer takes about 25 tokens per box)."""

ENGINES = ("hf", "cfar")
_ALIASES = {"model": "hf"}  # the name before run's engines were named
DEFAULT_MIN_SCORE = 0.0
"""The default score threshold, the same as ``run --min-score`` (``RunConfig.min_score``)."""


@dataclass
class EvalConfig:
    """The ``fusarbatch eval`` flags.

    :ivar model: a training output (adapter + TLM) or a full model directory (``config.json``); None only
        with ``engine="cfar"``.
    :ivar data: manifests.
    :ivar out: output folder (default :func:`default_out`).
    :ivar base_model: base Qwen2.5-VL for an adapter directory (default: recorded by training).
    :ivar no_tlm: switch the TLM off (ablation).
    :ivar batch_size: records per generate call.
    :ivar max_new_tokens: cap for every task (default :data:`DEFAULT_MAX_NEW_TOKENS`).
    :ivar limit: at most this many records per task (chosen by the SHA-1 of their id).
    :ivar tasks: only these tasks (default all).
    :ivar device: ``cuda``/``cpu``/None.
    :ivar engine: ``model`` or ``cfar``.
    :ivar train_data: training manifests, the source of the majority answers and the median box.
    :ivar min_score: boxes scored below it do not count for P/R/F1, counts and cells (AP uses every box).
    :ivar cfar: :class:`fusarbatch.engines.cfar.CfarParams` (pixels of the stored images); None: the
        engine's chip defaults.
    """

    model: Path | None
    data: list[Path]
    out: Path | None = None
    base_model: Path | None = None
    no_tlm: bool = False
    batch_size: int = 8
    max_new_tokens: int | None = None
    limit: int | None = None
    tasks: Sequence[str] | None = None
    device: str | None = None
    engine: str = "hf"
    train_data: list[Path] | None = None
    min_score: float = DEFAULT_MIN_SCORE
    cfar: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_model_for_eval(
    model_dir: str | Path, base_model: str | Path | None = None, device: str | None = None
) -> Any:
    """A :class:`~fusarbatch.model.FusarGPT` from a full model folder or a training output (+ its base)."""
    from fusarbatch.model.fusar_gpt import FusarGPT, resolve_model_dirs

    base, adapter = resolve_model_dirs(model_dir, base_model)
    return FusarGPT.from_pretrained(base, adapter_dir=adapter, device=device)


def default_out(config: EvalConfig) -> Path:
    """``./eval_<model folder name>`` (``_no_tlm`` with ``no_tlm``) or ``./eval_cfar``, in the working
    directory: never inside the model folder (which may be the installed package's demo model)."""
    if config.engine == "cfar":
        name = "cfar"
    else:
        name = re.sub(r"[^\w.-]", "_", Path(config.model or "model").resolve().name) or "model"
        name += "_no_tlm" if config.no_tlm else ""
    return Path.cwd() / f"eval_{name}"


# --------------------------------------------------------------------------------------------- scoring
def _as_prediction(p: Prediction | tuple) -> Prediction:
    if isinstance(p, Prediction):
        return p
    value, ok = p[0], p[1]
    if len(p) > 2:
        scores = tuple(p[2])
    else:  # boxes without scores
        scores = tuple(None for _ in value) if ok and isinstance(value, tuple | list) else ()
    return Prediction(value, ok, scores=scores)


def _kept(pred: Prediction, min_score: float) -> tuple[Box, ...]:
    """The boxes of a detection prediction scored at least ``min_score`` (all of them at 0; with a positive
    threshold, a box without a score is dropped, as in ``run``)."""
    boxes = tuple(pred.value or ())
    if min_score <= 0:
        return boxes
    return tuple(b for b, s in zip(boxes, pred.scores, strict=True) if s is not None and s >= min_score)


def score_predictions(
    records: Sequence[Triplet],
    predictions: Sequence[Prediction | tuple],
    *,
    min_score: float = DEFAULT_MIN_SCORE,
) -> dict[str, Any]:
    """Metrics per task of ``predictions`` aligned with ``records``.

    Predictions are :class:`~training.answers.Prediction` or ``(value, ok[, scores])`` tuples. Unparseable
    answers (``ok`` False) count as wrong answers / empty detections. Detection: P/R/F1 per IoU threshold on
    the boxes scored at least ``min_score``, and ``ap_0.5`` (:func:`training.metrics.average_precision`)
    from every box.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    by_task: dict[str, list[tuple[Triplet, Prediction]]] = defaultdict(list)
    for rec, pred in zip(records, predictions, strict=True):
        by_task[rec.task].append((rec, _as_prediction(pred)))
    out: dict[str, Any] = {}
    for task in TASKS:
        rows = by_task.get(task)
        if not rows:
            continue
        failures = sum(not p.ok for _, p in rows)
        parse = {"n": len(rows), "failures": failures, "rate": failures / len(rows)}
        values = [p.value if p.ok else None for _, p in rows]
        truths = [truth_of(r) for r, _ in rows]
        labels = [label_of(r) for r, _ in rows]
        if task == "counting":
            m = counting_metrics(values, truths, labels)
        elif task == "grounding":
            m = grounding_metrics(values, truths, labels)
        elif task == "classification":
            m = classification_metrics(values, truths)
        elif task == "detection":
            grid = max(r.coordinate_size for r, _ in rows)
            kept: list[Sequence[Box] | None] = [_kept(p, min_score) if p.ok else None for _, p in rows]
            m = detection_metrics(kept, truths, IOU_THRESHOLDS, grid)
            m[f"ap_{AP_IOU:g}"] = average_precision(
                [p.value if p.ok else () for _, p in rows],
                [p.scores if p.ok else () for _, p in rows],
                truths,
                AP_IOU,
                grid,
            )
            m["min_score"] = min_score
        else:
            m = {"n": len(rows), "scored": False}
        out[task] = {**m, "parse": parse}
    return out


def _score_covered(
    records: Sequence[Triplet], predictions: Sequence[Prediction | None], min_score: float
) -> dict[str, Any]:
    """:func:`score_predictions` over the records that have a prediction (a baseline answers whole tasks)."""
    idx = [i for i, p in enumerate(predictions) if p is not None]
    return score_predictions(
        [records[i] for i in idx],
        [predictions[i] for i in idx],  # type: ignore[misc]
        min_score=min_score,
    )


def _shuffled(records: Sequence[Triplet], predictions: Sequence[Prediction], min_score: float) -> dict:
    pairs = shuffled_pairs(records, SHUFFLE_SEED)
    recs = [records[t] for _, t in pairs]
    preds = [pair_prediction(predictions[p], records[p], records[t]) for p, t in pairs]
    return score_predictions(recs, preds, min_score=min_score)


def baseline_metrics(
    records: Sequence[Triplet],
    predictions: Sequence[Prediction],
    *,
    train_records: Sequence[Triplet] | None = None,
    train_source: str = "",
    min_score: float = DEFAULT_MIN_SCORE,
    cfar: Any = None,
    with_cfar: bool = True,
) -> dict[str, Any]:
    """Every baseline's metrics on ``records`` (:mod:`training.baselines`), with what each used.

    :param predictions: the evaluated engine's predictions (for the shuffled-image control).
    :param train_records: the source of the majority answers and median box; None: ``records`` themselves.
    :param with_cfar: also run CFAR (off when CFAR is the evaluated engine).
    """
    if train_records is not None:
        priors = priors_from(train_records, f"training manifest(s) {train_source}")
    else:
        priors = priors_from(
            records, "the evaluated records (no --train-data: the baseline saw these answers)"
        )
    out: dict[str, Any] = {
        "majority": {
            **priors.as_dict(),
            "tasks": _score_covered(records, majority_predictions(records, priors), min_score),
        },
        "median_box": {
            "source": priors.source,
            "median_boxes": priors.as_dict()["median_boxes"],
            "tasks": _score_covered(records, median_box_predictions(records, priors), min_score),
        },
        "shuffled": {"seed": SHUFFLE_SEED, "tasks": _shuffled(records, predictions, min_score)},
    }
    if with_cfar:
        from fusarbatch.engines.cfar import CHIP_PARAMS

        params = cfar or CHIP_PARAMS
        preds = cfar_predictions(records, params, min_score=min_score)
        out["cfar"] = {
            "params": dataclasses.asdict(params),
            "tasks": _score_covered(records, preds, min_score),
        }
    return out


# --------------------------------------------------------------------------------------------- running
def _select(records: Sequence[Triplet], tasks: Sequence[str] | None, limit: int | None) -> list[Triplet]:
    chosen = [r for r in records if tasks is None or r.task in tasks]
    if limit is None:
        return chosen
    by_task: dict[str, list[Triplet]] = defaultdict(list)
    for r in sorted(chosen, key=lambda r: hashlib.sha1(r.id.encode()).hexdigest()):
        if len(by_task[r.task]) < limit:
            by_task[r.task].append(r)
    keep = {r.id for rs in by_task.values() for r in rs}
    return [r for r in chosen if r.id in keep]


def generate_answers(
    model: Any,
    records: Sequence[Triplet],
    *,
    no_tlm: bool = False,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Greedy :class:`~fusarbatch.model.Generation` per record, records of one task batched. Images are
    resized to the model's grid (:attr:`~fusarbatch.model.FusarGPT.image_size`); the box of a
    classification question on a record of another grid (``coordinate_size``) is moved to it
    (:func:`~fusarbatch.model.prompts.regrid_classification_prompt`)."""
    from training.data import load_anchors, load_image

    grid = int(model.image_size)
    results: list[Any] = [None] * len(records)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[r.task].append(i)
    done = 0
    for task, idx in groups.items():
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            recs = [records[i] for i in chunk]
            images = [load_image(r.image, grid) for r in recs]
            anchors = [None if no_tlm else load_anchors(r) for r in recs]
            questions = [
                regrid_classification_prompt(r.question, grid, from_grid=r.coordinate_size)
                if r.task == "classification"
                else r.question
                for r in recs
            ]
            gens = model.generate_detailed(images, questions, anchors, max_new_tokens=budget, image_size=grid)
            for i, g in zip(chunk, gens, strict=True):
                results[i] = g
            done += len(chunk)
            if progress is not None:
                progress(done, len(records))
    return results


def _model_predictions(cfg: EvalConfig, records: Sequence[Triplet], started: float) -> tuple[list, dict]:
    """(predictions, extra result fields) of the model engine."""
    import math

    model = load_model_for_eval(Path(cfg.model), cfg.base_model, cfg.device)  # type: ignore[arg-type]
    model.eval()
    grid = int(model.image_size)
    other = sorted({r.coordinate_size for r in records} - {grid})
    if other:
        log.info(
            "eval: the model answers on its %d px grid; records on %s px: images resized, boxes scaled to "
            "the records' grid, classification boxes moved to the model's grid",
            grid,
            other,
        )
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or done == total:
            last[0] = now
            log.info("eval: %d/%d answered (%.0f s)", done, total, now - started)

    gens = generate_answers(
        model,
        records,
        no_tlm=cfg.no_tlm,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        progress=progress,
    )
    preds = []
    for r, g in zip(records, gens, strict=True):
        detection = r.task == "detection"
        preds.append(
            read_answer(
                r,
                g.text,
                grid=grid,
                token_logprobs=g.token_logprobs if detection else (),
                token_spans=model.token_spans(g) if detection else (),
                answer_score=math.exp(g.logprob) if math.isfinite(g.logprob) else None,
            )
        )
    extra = {
        "model_grid": grid,
        "unfinished_answers": sum(not g.finished for g in gens),
        "texts": [g.text for g in gens],
        "finished": [g.finished for g in gens],
    }
    return preds, extra


def _check(cfg: EvalConfig) -> None:
    cfg.engine = _ALIASES.get(cfg.engine, cfg.engine)
    if cfg.engine == "vllm":
        raise UsageError(
            "--engine vllm: eval runs the hf engine (the same answers: tests/engines); use --engine hf"
        )
    if cfg.engine not in ENGINES:
        raise UsageError(f"--engine {cfg.engine!r}: choose {' or '.join(ENGINES)}")
    if cfg.engine == "hf" and cfg.model is None:
        raise UsageError("--model: required with --engine hf (the default); --engine cfar needs none")
    if cfg.engine == "cfar" and (cfg.model is not None or cfg.no_tlm or cfg.base_model is not None):
        raise UsageError("--engine cfar runs no model: drop --model, --base-model and --no-tlm")
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if cfg.cfar is not None and not all(
        math.isfinite(float(getattr(cfg.cfar, k))) and float(getattr(cfg.cfar, k)) > 0
        for k in ("k", "guard", "background")
    ):
        raise UsageError("--cfar-k, --cfar-guard, --cfar-background: give numbers > 0")
    if not 0.0 <= cfg.min_score <= 1.0:
        raise UsageError(f"--min-score {cfg.min_score}: give a score in [0, 1]")
    unknown = set(cfg.tasks or ()) - set(TASKS)
    if unknown:
        raise UsageError(f"--task {sorted(unknown)}: choose from {', '.join(TASKS)}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Answer and score the manifest(s), then the baselines on the same records (module docstring);
    returns the metrics dict also written to ``metrics.json`` (plus ``out``).

    :raises UsageError: bad flags, no record to evaluate, an unreadable manifest or expected answer.
    """
    from training.manifest import read_manifests

    cfg = config
    _check(cfg)
    records = _select(read_manifests(cfg.data), cfg.tasks, cfg.limit)
    if not records:
        raise UsageError(f"--data {', '.join(map(str, cfg.data))}: no record to evaluate")
    for r in records:  # a broken expected answer fails before any model runs
        truth_of(r)
    train_records = read_manifests(cfg.train_data) if cfg.train_data else None
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    started = time.perf_counter()
    texts: list[str | None] = [None] * len(records)
    finished: list[bool | None] = [None] * len(records)
    extra: dict[str, Any] = {}
    if cfg.engine == "hf":
        preds, info = _model_predictions(cfg, records, started)
        texts, finished = info.pop("texts"), info.pop("finished")
        extra.update(info)
    else:
        from fusarbatch.engines.cfar import CHIP_PARAMS

        params = cfg.cfar or CHIP_PARAMS
        found = cfar_predictions(records, params, min_score=cfg.min_score)
        preds = [p if p is not None else Prediction(None, False, "not answered by CFAR") for p in found]
        keep = [i for i, p in enumerate(found) if p is not None]
        records, preds = [records[i] for i in keep], [preds[i] for i in keep]
        texts, finished = [None] * len(records), [None] * len(records)
        extra["cfar"] = dataclasses.asdict(params)
        if not records:
            raise UsageError("--engine cfar answers detection, counting and grounding: no such record")
    metrics = score_predictions(records, preds, min_score=cfg.min_score)
    baselines = baseline_metrics(
        records,
        preds,
        train_records=train_records,
        train_source=", ".join(str(p) for p in cfg.train_data or ()),
        min_score=cfg.min_score,
        cfar=cfg.cfar,
        with_cfar=cfg.engine == "hf",
    )
    wall = time.perf_counter() - started
    result = {
        "engine": cfg.engine,
        "model": str(Path(cfg.model).resolve()) if cfg.model is not None else None,
        "data": [str(Path(p).resolve()) for p in cfg.data],
        "train_data": [str(Path(p).resolve()) for p in cfg.train_data] if cfg.train_data else None,
        "no_tlm": cfg.no_tlm,
        "records": len(records),
        "limit_per_task": cfg.limit,
        "min_score": cfg.min_score,
        **extra,
        "wall_s": round(wall, 1),
        "tasks": metrics,
        "baselines": baselines,
        "beats": beats_table(metrics, baselines),
    }
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for r, p, text, fin in zip(records, preds, texts, finished, strict=True):
        detection = r.task == "detection"
        row = {
            "id": r.id,
            "task": r.task,
            "class": r.answer if r.task == "classification" else label_of(r),
            "answer": r.answer,
            "prediction": text,
            "parsed": [[*b.as_list(), b.label] for b in p.value or ()] if detection else p.value,
            "scores": list(p.scores) if detection else None,
            "answer_score": p.answer_score,
            "ok": p.ok,
            "error": p.error,
            "finished": fin,
        }
        lines.append(json.dumps(row, ensure_ascii=False, default=str))
    _write_atomic(out / "predictions.jsonl", "\n".join(lines) + "\n")
    _write_atomic(out / "metrics.json", json.dumps(result, indent=2, default=str) + "\n")
    _write_atomic(out / "metrics.md", metrics_markdown(result))
    log.info("eval done in %.0f s: %s", wall, out)
    result["out"] = str(out)
    return result


def evaluate_and_report(config: EvalConfig) -> str:
    """:func:`evaluate`, then the markdown tables and where the files went (what ``fusarbatch eval``
    prints)."""
    result = evaluate(config)
    return metrics_markdown(result) + f"\nmetrics.json, metrics.md, predictions.jsonl in {result['out']}\n"
