"""The triplet manifest: official keys, relative paths, null anchors, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusarbatch.features.anchors import write_anchor_npz
from fusarbatch.model import caption_prompt, classification_prompt, counting_prompt, detection_prompt
from fusarbatch.model.prompts import grounding_prompt
from training.data import load_anchors
from training.manifest import ManifestError, Triplet, infer_task, read_manifest, write_manifest


def _files(tmp_path):
    (tmp_path / "img").mkdir()
    image = tmp_path / "img" / "a.png"
    image.write_bytes(b"png")
    aef = tmp_path / "img" / "a.npz"
    rng = np.random.default_rng(0)
    write_anchor_npz(aef, rng.normal(size=(4, 64)), rng.random((4, 2)))
    return image, aef


def test_round_trip_with_relative_paths_and_null_anchors(tmp_path):
    image, aef = _files(tmp_path)
    records = [
        Triplet("a/1", image, detection_prompt("ship"), "None", aef=aef, task="detection", meta={"k": 1}),
        Triplet("a/2", image, counting_prompt("ship"), "3", aef=None, task="counting"),
    ]
    path = tmp_path / "sub" / "m.jsonl"
    assert write_manifest(path, records) == 2
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["image"] == "../img/a.png" and lines[0]["aef"] == "../img/a.npz"
    assert lines[1]["aef"] is None
    assert {"id", "image", "aef", "question", "answer", "coordinate_size"} <= set(lines[0])
    back = read_manifest(path)
    assert [r.id for r in back] == ["a/1", "a/2"]
    assert back[0].image == image.resolve() and back[0].aef == aef.resolve() and back[1].aef is None
    assert back[0].meta == {"k": 1} and back[0].coordinate_size == 504
    features, positions = load_anchors(back[0]).features, load_anchors(back[0]).positions
    assert features.shape == (4, 64) and positions.shape == (4, 2)
    assert load_anchors(back[1]).features.shape == (0, 64)  # no anchors: empty mask


def test_official_lines_without_task_or_meta(tmp_path):
    _files(tmp_path)
    line = {
        "id": "x",
        "image": "img/a.png",
        "aef": "img/a.npz",
        "question": detection_prompt("plane"),
        "answer": '[{"bbox_2d": [1, 2, 30, 40], "label": "plane"}]',
        "coordinate_size": 504,
    }
    path = tmp_path / "official.jsonl"
    path.write_text(json.dumps(line) + "\n\n")
    (rec,) = read_manifest(path)
    assert rec.task == "detection" and rec.meta == {}


@pytest.mark.parametrize(
    ("question", "task"),
    [
        (detection_prompt("ship"), "detection"),
        (counting_prompt("ship"), "counting"),
        (grounding_prompt("ship"), "grounding"),
        (classification_prompt([0, 0, 10, 10], ["a", "b"]), "classification"),
        (caption_prompt(), "caption"),
    ],
)
def test_infer_task(question, task):
    assert infer_task(question) == task


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"id": "x", "image": "img/a.png", "question": "q"}', r"missing key\(s\) answer"),
        ('{"id": 1, "image": "img/a.png", "question": "q", "answer": "a"}', "'id' must be a string"),
        ('{"id": "x", "image": "img/nope.png", "question": "q", "answer": "a"}', "nope.png missing"),
        (
            '{"id": "x", "image": "img/a.png", "question": "q", "answer": "a", "coordinate_size": 0}',
            "positive",
        ),
        ('{"id": "x", "image": "img/a.png", "question": "q", "answer": "a", "task": "vqa"}', "unknown task"),
        ('{"id": "x", "image": "img/a.png", "question": "q", "answer": "a", "aef": 3}', "'aef' must be"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    _files(tmp_path)
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ManifestError, match=message) as err:
        read_manifest(path)
    assert "line 1" in str(err.value) and str(path) in str(err.value)


def test_duplicate_ids_and_missing_manifest(tmp_path):
    _files(tmp_path)
    one = '{"id": "x", "image": "img/a.png", "question": "q", "answer": "a"}\n'
    (tmp_path / "dup.jsonl").write_text(one + one)
    with pytest.raises(ManifestError, match="line 2: duplicate id 'x'"):
        read_manifest(tmp_path / "dup.jsonl")
    with pytest.raises(ManifestError, match="file missing"):
        read_manifest(tmp_path / "none.jsonl")
    assert ManifestError("x").exit_code == 2
