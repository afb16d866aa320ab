"""``fusarbatch eval`` end to end on real files: a model on its own grid, boxes scored under the label asked
with per-box scores, every baseline beside it; CFAR as the engine; no output inside the package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fusarbatch.cli import app
from fusarbatch.errors import UsageError
from fusarbatch.model import counting_prompt, detection_prompt
from fusarbatch.model.demo import PACKAGED
from tests.conftest import FIXED_GRID
from training.evaluate import EvalConfig, evaluate
from training.manifest import Triplet, write_manifest


def _speckle_with_targets(path: Path, size: int, targets: list[tuple[int, int, int, int]], seed: int) -> Path:
    """A generated grey image: Rayleigh-like speckle (amplitude of exponential intensity, mean ~27) with
    bright rectangles ``(x1, y1, x2, y2)`` of value 250."""
    a = np.sqrt(np.random.default_rng(seed).exponential(1.0, (size, size))) * 30
    for x1, y1, x2, y2 in targets:
        a[y1:y2, x1:x2] = 250
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
    return path


def _det(boxes, label):
    return json.dumps([{"bbox_2d": list(b), "label": label} for b in boxes]) if boxes else "None"


@pytest.fixture
def one_torch_thread():
    """Bit-identical scores for identical answers in one batch: with several OpenMP threads the two rows'
    reductions may split differently (scores differed in the 10th digit with OMP_NUM_THREADS unset), and
    equal scores are what this test's tie semantics need."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_model_answers_on_its_grid_and_is_scored_under_the_label_asked(
    tmp_path, generated_fixed_answer_model, one_torch_thread
):
    """The 336-grid model answers its two boxes (labelled "ship") to records on a 504 grid asking for
    "vessel" (meta label). Scored under the label asked and scaled 336 -> 504, record 1 is two true
    positives; record 2's truth is elsewhere. The model is image-blind, so its answers paired with the
    other record's truth (shuffled control) score exactly as well: it does not beat that baseline."""
    scale = 504 / FIXED_GRID
    fixed = [[168, 0, 336, 84], [0, 252, 84, 336]]
    truth1 = [[round(v * scale) for v in b] for b in fixed]  # [252, 0, 504, 126], [0, 378, 126, 504]
    truth2 = [[300, 300, 400, 400]]
    records = []
    for i, truth in enumerate((truth1, truth2)):
        image = _speckle_with_targets(tmp_path / f"d{i}.png", 504, [], seed=i)
        question = detection_prompt("ship")
        answer = _det(truth, "vessel")
        records.append(Triplet(f"d{i}", image, question, answer, None, 504, "detection", {"label": "vessel"}))
    manifest = tmp_path / "generated_val.jsonl"
    write_manifest(manifest, records)
    out = tmp_path / "eval"
    result = evaluate(EvalConfig(model=generated_fixed_answer_model, data=[manifest], out=out))
    assert result["model_grid"] == FIXED_GRID
    d = result["tasks"]["detection"]
    assert d["iou_0.5"]["overall"] == {
        "tp": 2,
        "fp": 2,
        "fn": 1,
        "precision": 0.5,
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(4 / 7),
    }
    assert set(d["iou_0.5"]["per_class"]) == {"vessel"}  # the label asked, not "ship" (the model's word)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [v for b in rows[0]["parsed"] for v in b[:4]] == pytest.approx([v for b in truth1 for v in b])
    s1, s2 = rows[0]["scores"]
    assert 0 < s1 <= 1 and 0 < s2 <= 1 and s1 != s2
    assert rows[0]["answer_score"] < min(s1, s2)
    # image-blind: record 2 gets the same two boxes with the same scores, both false positives. Boxes of
    # equal score enter together: at the higher score TP + FP (P 1/2, R 1/3), then TP + FP (P 1/2, R 2/3):
    # AP = 2/3 * 1/2 = 1/3, and the same for the shuffled pairing
    assert rows[1]["scores"] == rows[0]["scores"]
    assert d["ap_0.5"]["map"] == pytest.approx(1 / 3)
    b = result["baselines"]
    assert set(b) == {"majority", "median_box", "shuffled", "cfar"}
    assert b["shuffled"]["tasks"]["detection"]["iou_0.5"]["overall"]["f1"] == pytest.approx(4 / 7)
    assert result["beats"]["detection"]["F1@0.5"]["shuffled"] is False
    assert result["beats"]["detection"]["AP@0.5"]["shuffled"] is False
    assert result["beats"]["detection"]["F1@0.5"]["median_box"] is True  # its one box per image hits nothing
    table = (out / "metrics.md").read_text()
    assert (
        "| task | n | metric | model | parse failures | median box | shuffled | CFAR | model beats |" in table
    )
    assert "no: shuffled" in table and "the evaluated records (no --train-data" in table
    assert json.loads((out / "metrics.json").read_text())["beats"] == result["beats"]


def _cfar_manifest(tmp_path: Path) -> tuple[Path, list[list[int]]]:
    targets = [[200, 40, 224, 56], [60, 250, 84, 266]]
    image = _speckle_with_targets(tmp_path / "ships.png", 336, [tuple(t) for t in targets], seed=0)
    empty = _speckle_with_targets(tmp_path / "sea.png", 336, [], seed=1)
    records = [
        Triplet("ships/det", image, detection_prompt("ship"), _det(targets, "ship"), None, 336, "detection"),
        Triplet("sea/det", empty, detection_prompt("ship"), "None", None, 336, "detection"),
        Triplet("ships/count", image, counting_prompt("ship"), "2", None, 336, "counting"),
        Triplet("sea/count", empty, counting_prompt("ship"), "0", None, 336, "counting"),
    ]
    manifest = tmp_path / "generated_cfar.jsonl"
    write_manifest(manifest, records)
    return manifest, targets


def test_engine_cfar_needs_no_model_and_finds_bright_targets(tmp_path, monkeypatch):
    manifest, _ = _cfar_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["eval", "--engine", "cfar", "--data", str(manifest)])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "eval_cfar" / "metrics.json").read_text())
    assert result["engine"] == "cfar" and result["model"] is None
    overall = result["tasks"]["detection"]["iou_0.5"]["overall"]
    assert (overall["tp"], overall["fp"], overall["fn"]) == (2, 0, 0)  # its boxes are 1 px wider: IoU 0.82
    assert result["tasks"]["counting"]["accuracy"] == 1.0
    assert set(result["baselines"]) == {"majority", "median_box", "shuffled"}
    assert result["beats"]["counting"]["accuracy"]["shuffled"] is True  # 2 and 0 swapped: both wrong
    assert "| counting | 2 | accuracy | 100.00 | 0 |" in res.output and "CFAR beats" in res.output
    # a model with the CFAR engine is a usage error; so is the model engine without a model
    bad = CliRunner().invoke(
        app, ["eval", "--engine", "cfar", "--model", str(tmp_path), "--data", str(manifest)]
    )
    assert isinstance(bad.exception, UsageError) and "drop --model" in str(bad.exception)
    bad = CliRunner().invoke(app, ["eval", "--data", str(manifest)])
    assert isinstance(bad.exception, UsageError) and "--model: required" in str(bad.exception)
    assert bad.exception.exit_code == 2


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_eval_without_out_writes_nothing_inside_the_package(tmp_path, monkeypatch):
    """Before: outputs went to <model>/eval, i.e. into fusarbatch/model/demo_model/ for the default model."""
    import fusarbatch

    manifest, _ = _cfar_manifest(tmp_path)
    package = Path(fusarbatch.__file__).parent
    before = _tree(package)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    res = CliRunner().invoke(
        app, ["eval", "--model", str(PACKAGED), "--data", str(manifest), "--task", "counting"]
    )
    assert res.exit_code == 0, res.output
    assert _tree(package) == before
    written = work / "eval_demo_model"
    assert sorted(p.name for p in written.iterdir()) == ["metrics.json", "metrics.md", "predictions.jsonl"]
    assert json.loads((written / "metrics.json").read_text())["records"] == 2
