"""The tables of ``fusarbatch eval`` (``metrics.md`` and what the command prints), and the beats table.

The summary table has one row per metric (counting accuracy; grounding Acc@100, Acc@50, Top-1;
classification accuracy and macro accuracy; detection P, R, F1 at IoU 0.25 and 0.5 and AP at 0.5), the
evaluated engine's value, its parse failures, each baseline's value on the same records, and a last column
saying which baselines the engine beats (``yes: ...; no: ...``: strictly higher value; a baseline without a
value for the row is not listed). Per-class tables follow, with each baseline's value of the table's first
metric for the same class and the same beats column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.metrics import AP_IOU, IOU_THRESHOLDS

__all__ = ["BASELINES", "beats_table", "metrics_markdown"]

BASELINES = {
    "majority": "majority",
    "median_box": "median box",
    "shuffled": "shuffled",
    "cfar": "CFAR",
}
"""Baseline keys of ``metrics.json`` -> their column names in the tables, in table order."""


def _summary_rows(tasks: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(task, metric name, path in the task's metrics) of the summary table, in order."""
    rows: list[tuple[str, str, tuple[str, ...]]] = []
    if "counting" in tasks:
        rows.append(("counting", "accuracy", ("accuracy",)))
    if "grounding" in tasks:
        rows += [
            ("grounding", n, (k,)) for n, k in (("Acc@100", "acc100"), ("Acc@50", "acc50"), ("Top-1", "top1"))
        ]
    if "classification" in tasks:
        rows += [
            ("classification", "accuracy", ("accuracy",)),
            ("classification", "macro accuracy", ("macro_accuracy",)),
        ]
    if "detection" in tasks:
        for thr in IOU_THRESHOLDS:
            for name, key in (("P", "precision"), ("R", "recall"), ("F1", "f1")):
                rows.append(("detection", f"{name}@{thr:g}", (f"iou_{thr:g}", "overall", key)))
        rows.append(("detection", f"AP@{AP_IOU:g}", (f"ap_{AP_IOU:g}", "map")))
    return rows


def _get(d: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def beats_table(tasks: dict[str, Any], baselines: dict[str, Any]) -> dict[str, dict[str, dict[str, bool]]]:
    """``{task: {metric: {baseline: engine value > baseline value}}}`` for every summary-table metric that
    both have (a tie is not a win)."""
    out: dict[str, dict[str, dict[str, bool]]] = {}
    for task, name, path in _summary_rows(tasks):
        mine = _get(tasks, (task, *path))
        for key, base in baselines.items():
            theirs = _get(base.get("tasks", {}), (task, *path))
            if mine is not None and theirs is not None:
                out.setdefault(task, {}).setdefault(name, {})[key] = bool(mine > theirs)
    return out


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _beats_cell(wins: dict[str, bool]) -> str:
    yes = [BASELINES.get(k, k) for k, v in wins.items() if v]
    no = [BASELINES.get(k, k) for k, v in wins.items() if not v]
    parts = ([f"yes: {', '.join(yes)}"] if yes else []) + ([f"no: {', '.join(no)}"] if no else [])
    return "; ".join(parts) or "-"


def _n(task_metrics: dict[str, Any]) -> Any:
    return task_metrics.get("n", task_metrics.get("images"))


def metrics_markdown(result: dict[str, Any]) -> str:
    """``metrics.json`` as markdown: the summary table with every baseline and whether the engine beats it,
    then per-class tables (the engine against each baseline's value for the same class). Values in %."""
    t = result["tasks"]
    baselines = result.get("baselines") or {}
    engine = "CFAR" if result.get("engine") == "cfar" else "model"
    beats = result.get("beats") or beats_table(t, baselines)
    rows = _summary_rows(t)
    cols = [  # the baselines that answer at least one row
        k
        for k in BASELINES
        if k in baselines
        and any(_get(baselines[k].get("tasks", {}), (task, *p)) is not None for task, _, p in rows)
    ]
    name = "CFAR" if engine == "CFAR" else f"`{Path(result.get('model') or 'model').name}`"
    lines = [
        f"# Evaluation of {name}{' (TLM off)' if result.get('no_tlm') else ''}",
        "",
        f"{result['records']} records from {', '.join(Path(p).name for p in result['data'])}; "
        f"{result['wall_s']} s. Values in %. Detection P/R/F1 on boxes scored >= "
        f"{result.get('min_score', 0.0):g}; AP@{AP_IOU:g}: VOC all-point, every box.",
    ]
    if "majority" in baselines:
        lines.append(f"Majority answers and median box from {baselines['majority']['source']}.")
    if "shuffled" in baselines:
        lines.append(
            f"shuffled: the {engine}'s answers paired with another record's truth (same task and label; "
            f"derangement, seed {baselines['shuffled']['seed']})."
        )
    head = ["task", "n", "metric", engine, "parse failures", *(BASELINES[k] for k in cols), f"{engine} beats"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, metric, path in rows:
        cells = [
            task,
            str(_n(t[task])),
            metric,
            _pct(_get(t[task], path)),
            str(t[task]["parse"]["failures"]),
            *(_pct(_get(baselines[k].get("tasks", {}), (task, *path))) for k in cols),
            _beats_cell(beats.get(task, {}).get(metric, {})),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "caption" in t:
        lines.append(f"| caption | {t['caption']['n']} | not scored | - | - |" + " - |" * (len(cols) + 1))
    lines += _per_class_tables(t, baselines, cols)
    return "\n".join(lines) + "\n"


def _table(
    title: str,
    left: list[str],
    rows: list[tuple[list[str], Any, tuple[str, ...]]],
    metric: str,
    baselines: dict[str, Any],
    cols: list[str],
) -> list[str]:
    """One per-class table: ``left`` columns, then each baseline's value of ``metric`` (read at ``path`` in
    its task metrics) and the beats column; ``rows`` are ``(left cells, engine value, path)``."""
    cols = [
        k for k in cols if any(_get(baselines[k].get("tasks", {}), path) is not None for _, _, path in rows)
    ]
    head = [*left, *(f"{BASELINES[k]} {metric}" for k in cols), "beats"]
    lines = ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells, mine, path in rows:
        theirs = {k: _get(baselines[k].get("tasks", {}), path) for k in cols}
        wins = {k: mine > b for k, b in theirs.items() if b is not None and mine is not None}
        lines.append("| " + " | ".join([*cells, *(_pct(theirs[k]) for k in cols), _beats_cell(wins)]) + " |")
    return lines


def _per_class_tables(t: dict[str, Any], baselines: dict[str, Any], cols: list[str]) -> list[str]:
    lines: list[str] = []
    for task in ("counting", "grounding", "classification"):
        if task in t and t[task].get("per_class"):
            keys = ["accuracy"] if task != "grounding" else ["acc100", "acc50", "top1"]
            rows = [
                (
                    [cls, str(v["n"]), *(_pct(v[k]) for k in keys)],
                    v[keys[0]],
                    (task, "per_class", cls, keys[0]),
                )
                for cls, v in t[task]["per_class"].items()
            ]
            lines += _table(f"{task}: per class", ["class", "n", *keys], rows, keys[0], baselines, cols)
    if "detection" in t:
        d = t["detection"]
        rows = []
        for thr in IOU_THRESHOLDS:
            for cls, v in d[f"iou_{thr:g}"]["per_class"].items():
                cells = [cls, f"{thr:g}", str(v["tp"]), str(v["fp"]), str(v["fn"])]
                cells += [_pct(v["precision"]), _pct(v["recall"]), _pct(v["f1"])]
                rows.append((cells, v["f1"], ("detection", f"iou_{thr:g}", "per_class", cls, "f1")))
        left = ["class", "IoU", "TP", "FP", "FN", "P", "R", "F1"]
        lines += _table("detection: per class", left, rows, "F1", baselines, cols)
        key = f"ap_{AP_IOU:g}"
        rows = [
            (
                [cls, str(v["n_true"]), str(v["n_pred"]), _pct(v["ap"])],
                v["ap"],
                ("detection", key, "per_class", cls, "ap"),
            )
            for cls, v in d[key]["per_class"].items()
        ]
        left = ["class", "ground truth", "boxes", f"AP@{AP_IOU:g}"]
        lines += _table(f"detection: AP@{AP_IOU:g} per class", left, rows, "AP", baselines, cols)
    return lines
