"""``fusarbatch eval``: greedy answers to a manifest's questions, parsed and scored with the paper's metrics.

Each record is answered by :meth:`fusarbatch.model.FusarGPT.generate_detailed` exactly as at inference
(chat template, image resized to the record's ``coordinate_size``, greedy decoding, batched with left
padding), parsed by the never-raising parsers of :mod:`fusarbatch.model.prompts`, and scored by
:mod:`training.metrics`. ``no_tlm`` runs the same evaluation with the TLM switched off (no image is modulated:
the ablation). Caption records are answered but not scored.

Outputs in ``out``: ``metrics.json`` (overall and per class, parse failures, settings, wall time),
``metrics.md`` (the same as markdown tables) and ``predictions.jsonl`` (one line per record: question id,
task, class, expected and generated answer, parsed value, parse error).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusarbatch.errors import UsageError
from fusarbatch.model.prompts import (
    Box,
    parse_class,
    parse_count,
    parse_detection,
    parse_grounding,
)
from training.manifest import TASKS, Triplet
from training.metrics import (
    IOU_THRESHOLDS,
    classification_metrics,
    counting_metrics,
    detection_metrics,
    grounding_metrics,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "EvalConfig",
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

_LABEL_RES = {
    "detection": re.compile(r"detect the following object: (.+?)\. Output", re.DOTALL),
    "counting": re.compile(r"count the (.+?) targets", re.DOTALL),
    "grounding": re.compile(r"Which cells contain an? (.+?)\?", re.DOTALL),
}
_CHOICES_RE = re.compile(r"Choose one of: (.+?)\. Answer with", re.DOTALL)


@dataclass
class EvalConfig:
    """The ``fusarbatch eval`` flags.

    :ivar model: a training output (adapter + TLM) or a full model directory (``config.json``).
    :ivar data: manifests.
    :ivar out: output folder (default ``<model>/eval``, ``eval_no_tlm`` with ``no_tlm``).
    :ivar base_model: base Qwen2.5-VL for an adapter directory (default: recorded by training).
    :ivar no_tlm: switch the TLM off (ablation).
    :ivar batch_size: records per generate call.
    :ivar max_new_tokens: cap for every task (default :data:`DEFAULT_MAX_NEW_TOKENS`).
    :ivar limit: at most this many records per task (chosen by the SHA-1 of their id).
    :ivar tasks: only these tasks (default all).
    :ivar device: ``cuda``/``cpu``/None.
    """

    model: Path
    data: list[Path]
    out: Path | None = None
    base_model: Path | None = None
    no_tlm: bool = False
    batch_size: int = 8
    max_new_tokens: int | None = None
    limit: int | None = None
    tasks: Sequence[str] | None = None
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_model_for_eval(
    model_dir: str | Path, base_model: str | Path | None = None, device: str | None = None
) -> Any:
    """A :class:`~fusarbatch.model.FusarGPT` from a full model folder or a training output (+ its base)."""
    from fusarbatch.model.fusar_gpt import FusarGPT, resolve_model_dirs

    base, adapter = resolve_model_dirs(model_dir, base_model)
    return FusarGPT.from_pretrained(base, adapter_dir=adapter, device=device)


def _label_of(rec: Triplet) -> str:
    if isinstance(rec.meta.get("label"), str) and rec.task != "classification":
        return rec.meta["label"]
    rx = _LABEL_RES.get(rec.task)
    m = rx.search(rec.question) if rx else None
    return m.group(1).strip() if m else "all"


def _choices_of(question: str) -> list[str] | None:
    m = _CHOICES_RE.search(question)
    return [c.strip() for c in m.group(1).split(",") if c.strip()] if m else None


def _parse(rec: Triplet, text: str) -> tuple[Any, bool, str | None]:
    """(value, ok, error) of a generated answer for the record's task."""
    if rec.task == "counting":
        r = parse_count(text)
    elif rec.task == "grounding":
        r = parse_grounding(text)
    elif rec.task == "classification":
        r = parse_class(text, _choices_of(rec.question))
    elif rec.task == "detection":
        r = parse_detection(text, default_label=_label_of(rec), grid=rec.coordinate_size)
    else:
        return text, True, None
    return r.value, r.ok, r.error


def _truth(rec: Triplet) -> Any:
    if rec.task == "counting":
        v = parse_count(rec.answer).value
        if v is None:
            raise UsageError(f"record {rec.id}: counting answer {rec.answer!r} is not an integer")
        return v
    if rec.task == "grounding":
        return parse_grounding(rec.answer).value
    if rec.task == "classification":
        return rec.answer.strip()
    if rec.task == "detection":
        res = parse_detection(rec.answer, default_label=_label_of(rec), grid=rec.coordinate_size)
        if not res.ok:
            raise UsageError(f"record {rec.id}: detection answer unreadable ({res.error})")
        return res.value
    return rec.answer


def score_predictions(records: Sequence[Triplet], predictions: Sequence[tuple[Any, bool]]) -> dict[str, Any]:
    """Metrics per task from parsed predictions ``(value, ok)`` aligned with ``records``.

    Unparseable answers (``ok`` False) count as wrong answers / empty detections.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    by_task: dict[str, list[tuple[Triplet, Any, bool]]] = defaultdict(list)
    for rec, (value, ok) in zip(records, predictions, strict=True):
        by_task[rec.task].append((rec, value, ok))
    out: dict[str, Any] = {}
    for task in TASKS:
        rows = by_task.get(task)
        if not rows:
            continue
        failures = sum(not ok for _, _, ok in rows)
        parse = {"n": len(rows), "failures": failures, "rate": failures / len(rows)}
        if task == "counting":
            m = counting_metrics(
                [v if ok else None for _, v, ok in rows],
                [_truth(r) for r, _, _ in rows],
                [_label_of(r) for r, _, _ in rows],
            )
        elif task == "grounding":
            m = grounding_metrics(
                [v if ok else None for _, v, ok in rows],
                [_truth(r) for r, _, _ in rows],
                [_label_of(r) for r, _, _ in rows],
            )
        elif task == "classification":
            m = classification_metrics(
                [v if ok else None for _, v, ok in rows], [_truth(r) for r, _, _ in rows]
            )
        elif task == "detection":
            grid = max(r.coordinate_size for r, _, _ in rows)
            preds: list[Sequence[Box] | None] = [v if ok else None for _, v, ok in rows]
            m = detection_metrics(preds, [_truth(r) for r, _, _ in rows], IOU_THRESHOLDS, grid)
        else:
            m = {"n": len(rows), "scored": False}
        out[task] = {**m, "parse": parse}
    return out


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
    """Greedy :class:`~fusarbatch.model.Generation` per record (records of one task and size batched)."""
    from training.data import load_anchors, load_image

    results: list[Any] = [None] * len(records)
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r.task, r.coordinate_size)].append(i)
    done = 0
    for (task, size), idx in groups.items():
        budget = max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            recs = [records[i] for i in chunk]
            images = [load_image(r.image, size) for r in recs]
            anchors = [None if no_tlm else load_anchors(r) for r in recs]
            gens = model.generate_detailed(
                images, [r.question for r in recs], anchors, max_new_tokens=budget, image_size=size
            )
            for i, g in zip(chunk, gens, strict=True):
                results[i] = g
            done += len(chunk)
            if progress is not None:
                progress(done, len(records))
    return results


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Answer and score the manifest(s) (module docstring); returns the metrics dict also written to
    ``metrics.json``."""
    from training.manifest import read_manifests

    cfg = config
    if cfg.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    unknown = set(cfg.tasks or ()) - set(TASKS)
    if unknown:
        raise UsageError(f"--task {sorted(unknown)}: choose from {', '.join(TASKS)}")
    records = _select(read_manifests(cfg.data), cfg.tasks, cfg.limit)
    if not records:
        raise UsageError(f"--data {', '.join(map(str, cfg.data))}: no record to evaluate")
    model_dir = Path(cfg.model)
    out = Path(cfg.out) if cfg.out else model_dir / ("eval_no_tlm" if cfg.no_tlm else "eval")
    started = time.perf_counter()
    model = load_model_for_eval(model_dir, cfg.base_model, cfg.device)
    model.eval()
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
    parsed = [_parse(r, g.text) for r, g in zip(records, gens, strict=True)]
    metrics = score_predictions(records, [(v, ok) for v, ok, _ in parsed])
    wall = time.perf_counter() - started
    result = {
        "model": str(model_dir.resolve()),
        "data": [str(Path(p).resolve()) for p in cfg.data],
        "no_tlm": cfg.no_tlm,
        "records": len(records),
        "limit_per_task": cfg.limit,
        "unfinished_answers": sum(not g.finished for g in gens),
        "wall_s": round(wall, 1),
        "tasks": metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    with (out / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for r, g, (value, ok, err) in zip(records, gens, parsed, strict=True):
            row = {
                "id": r.id,
                "task": r.task,
                "class": r.answer if r.task == "classification" else _label_of(r),
                "answer": r.answer,
                "prediction": g.text,
                "parsed": [[*b.as_list(), b.label] for b in value] if r.task == "detection" else value,
                "ok": ok,
                "error": err,
                "finished": g.finished,
            }
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(metrics_markdown(result), encoding="utf-8")
    log.info("eval done in %.0f s: %s", wall, out)
    result["out"] = str(out)
    return result


# --------------------------------------------------------------------------------------------- tables
def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def metrics_markdown(result: dict[str, Any]) -> str:
    """``metrics.json`` as markdown: a summary table, then per-class tables per task. Values in percent."""
    t = result["tasks"]
    lines = [
        f"# Evaluation of `{Path(result['model']).name}`{' (TLM off)' if result.get('no_tlm') else ''}",
        "",
        f"{result['records']} records from {', '.join(Path(p).name for p in result['data'])}; "
        f"{result['wall_s']} s. Values in %.",
        "",
        "| task | n | metric | value | parse failures |",
        "|---|---|---|---|---|",
    ]
    if "counting" in t:
        c = t["counting"]
        lines.append(f"| counting | {c['n']} | accuracy | {_pct(c['accuracy'])} | {c['parse']['failures']} |")
    if "grounding" in t:
        g = t["grounding"]
        for name, key in (("Acc@100", "acc100"), ("Acc@50", "acc50"), ("Top-1", "top1")):
            lines.append(f"| grounding | {g['n']} | {name} | {_pct(g[key])} | {g['parse']['failures']} |")
    if "classification" in t:
        c = t["classification"]
        lines.append(
            f"| classification | {c['n']} | accuracy | {_pct(c['accuracy'])} | {c['parse']['failures']} |"
        )
        lines.append(f"| classification | {c['n']} | macro accuracy | {_pct(c['macro_accuracy'])} | |")
    if "detection" in t:
        d = t["detection"]
        for thr in IOU_THRESHOLDS:
            o = d[f"iou_{thr:g}"]["overall"]
            for name in ("precision", "recall", "f1"):
                lines.append(
                    f"| detection | {d['images']} | {name.capitalize() if name != 'f1' else 'F1'}@{thr:g} | "
                    f"{_pct(o[name])} | {d['parse']['failures']} |"
                )
    if "caption" in t:
        lines.append(f"| caption | {t['caption']['n']} | not scored | - | - |")
    for task in ("counting", "grounding", "classification"):
        if task in t and t[task].get("per_class"):
            lines += ["", f"## {task}: per class", ""]
            keys = ("accuracy",) if task != "grounding" else ("acc100", "acc50", "top1")
            lines.append("| class | n | " + " | ".join(keys) + " |")
            lines.append("|---|---|" + "---|" * len(keys))
            for cls, v in t[task]["per_class"].items():
                lines.append(f"| {cls} | {v['n']} | " + " | ".join(_pct(v[k]) for k in keys) + " |")
    if "detection" in t:
        lines += [
            "",
            "## detection: per class",
            "",
            "| class | IoU | TP | FP | FN | P | R | F1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for thr in IOU_THRESHOLDS:
            for cls, v in t["detection"][f"iou_{thr:g}"]["per_class"].items():
                lines.append(
                    f"| {cls} | {thr:g} | {v['tp']} | {v['fp']} | {v['fn']} | {_pct(v['precision'])} | "
                    f"{_pct(v['recall'])} | {_pct(v['f1'])} |"
                )
    return "\n".join(lines) + "\n"


def evaluate_and_report(config: EvalConfig) -> str:
    """:func:`evaluate`, then the markdown table and where the files went (the ``fusarbatch eval`` output)."""
    result = evaluate(config)
    return metrics_markdown(result) + f"\nmetrics.json, metrics.md, predictions.jsonl in {result['out']}\n"
