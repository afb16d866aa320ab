"""One table from many ``fusarbatch eval`` outputs: every model (and CFAR) beside the baselines measured on
the same records (training/RESULTS.md). ``python -m training summary DIR...``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["summary_rows", "summary_table"]

# (column, task, path inside a task's metrics, scale)
COLUMNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("count acc", "counting", ("accuracy",)),
    ("ground Acc@100", "grounding", ("acc100",)),
    ("ground Top-1", "grounding", ("top1",)),
    ("class acc", "classification", ("accuracy",)),
    ("det F1@0.25", "detection", ("iou_0.25", "overall", "f1")),
    ("det F1@0.5", "detection", ("iou_0.5", "overall", "f1")),
    ("det AP@0.5", "detection", ("ap_0.5", "map")),
)


def _get(d: Any, path: tuple[str, ...]) -> float | None:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return float(d) if isinstance(d, int | float) else None


def summary_rows(metrics: dict[str, Any], name: str) -> list[tuple[str, dict[str, float | None]]]:
    """``[(row name, {column: value in [0, 1] or None})]``: the evaluated engine, then each baseline."""
    rows = [(name, {c: _get(metrics.get("tasks", {}).get(t), p) for c, t, p in COLUMNS})]
    for base, result in (metrics.get("baselines") or {}).items():
        tasks = result.get("tasks") or {}
        rows.append((f"  {base}", {c: _get(tasks.get(t), p) for c, t, p in COLUMNS}))
    return rows


def summary_table(dirs: list[Path]) -> str:
    """Markdown table (values in %) of the ``metrics.json`` of each folder, rows = engine + baselines."""
    lines = ["| eval | " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for d in dirs:
        metrics = json.loads((Path(d) / "metrics.json").read_text(encoding="utf-8"))
        limit = metrics.get("limit_per_task")
        name = Path(d).name + (f" (first {limit} per task)" if limit else "")
        for row, values in summary_rows(metrics, name):
            cells = ["" if v is None else f"{100 * v:.1f}" for v in values.values()]
            if any(cells):
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
