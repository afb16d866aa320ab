"""The summary table of several eval outputs (hand-made metrics.json)."""

from __future__ import annotations

import json

from training.summary import summary_table


def test_summary_rows_engine_then_baselines(tmp_path):
    d = tmp_path / "stage2_ssdd"
    d.mkdir()
    metrics = {
        "limit_per_task": None,
        "tasks": {
            "counting": {"accuracy": 0.5},
            "detection": {"iou_0.25": {"overall": {"f1": 0.125}}, "ap_0.5": {"map": 0.0}},
        },
        "baselines": {
            "majority": {"tasks": {"counting": {"accuracy": 0.6}}},
            "cfar": {"tasks": {"detection": {"iou_0.25": {"overall": {"f1": 0.6667}}}}},
            "empty": {"tasks": {}},  # a baseline with no value in any column is left out
        },
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    lines = summary_table([d]).splitlines()
    assert lines[0].startswith("| eval | count acc |")
    assert lines[2] == "| stage2_ssdd | 50.0 |  |  |  | 12.5 |  | 0.0 |"
    assert lines[3] == "|   majority | 60.0 |  |  |  |  |  |  |"
    assert lines[4] == "|   cfar |  |  |  |  | 66.7 |  |  |"
    assert len(lines) == 5
