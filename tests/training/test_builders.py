"""Dataset builders: real VOC ship chips, generated VOC scenes (boxes past the edge), generated class
folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusarbatch.errors import FusarbatchError, UsageError
from fusarbatch.model import parse_detection, parse_grounding
from fusarbatch.model.prompts import Box, grounding_cells
from fusarbatch.render import render
from training.builders import build_dataset, caption_for, dihedral, read_voc, scan_voc
from training.manifest import read_manifest

SHIP_CHIPS = Path(__file__).resolve().parents[1] / "data" / "ship_chips"  # 3 real chips, see SOURCE.txt


def _voc_xml(width, height, objects):
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for n, a, b, c, d in objects
    )
    size = f"<size><width>{width}</width><height>{height}</height><depth>1</depth></size>"
    return f"<annotation>{size}{objs}</annotation>"


@pytest.fixture
def generated_voc(tmp_path):
    """A VOC2007-style folder (JPEGImages, Annotations, ImageSets) of 3 generated 120 x 100 scenes whose boxes
    use class indices and one runs past the bottom-right edge."""
    root = tmp_path / "generated_voc"
    for d in ("JPEGImages", "Annotations", "ImageSets"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    scenes = {
        "000001": [("0", 10, 10, 40, 30), ("1", 90, 80, 130, 112)],  # second box past the edge (120 x 100)
        "000002": [("1", 50, 40, 70, 60)],
        "000003": [("0", 0, 0, 20, 20)],
    }
    for name, objects in scenes.items():
        Image.fromarray(rng.integers(0, 255, (100, 120), dtype=np.uint8)).convert("RGB").save(
            root / "JPEGImages" / f"{name}.jpg"
        )
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(120, 100, objects))
    (root / "ImageSets" / "train.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "val.txt").write_text("000003")
    (root / "classes.json").write_text(json.dumps({"folder_to_class": {"0": "T72", "1": "BMP2"}}))
    return root


def test_real_ship_chips_every_task(tmp_path):
    summary = build_dataset(SHIP_CHIPS, tmp_path / "out", val_fraction=0.34)
    assert summary.images == 3
    train = read_manifest(tmp_path / "out" / "stage2_train.jsonl")
    val = read_manifest(tmp_path / "out" / "stage2_val.jsonl")
    captions = read_manifest(tmp_path / "out" / "stage1_train.jsonl")
    captions += read_manifest(tmp_path / "out" / "stage1_val.jsonl")
    assert len(val) == 3 and len(train) == 6  # 1 val chip (round(3 * 0.34)), 3 tasks per chip
    assert {r.task for r in train} == {"counting", "grounding", "detection"}  # one class: no classification
    assert all(r.task == "caption" and r.meta["caption"] == "template" for r in captions)
    assert all(r.aef is None and r.coordinate_size == 504 for r in train + val)
    by_id = {r.id: r for r in train + val + captions}
    vv = "ship_chips/Sen_ship_vv_02017091501054029"
    width, height, boxes = read_voc(SHIP_CHIPS / "Sen_ship_vv_02017091501054029.xml")
    assert (width, height, len(boxes)) == (256, 256, 2)
    detected = parse_detection(by_id[f"{vv}/detect"].answer).value
    expected = [[round(v * 504 / 256) for v in b.as_list()] for b in boxes]
    # answers list the boxes in reading order of their centres (top to bottom), not the XML's order
    expected = sorted(expected, key=lambda e: ((e[1] + e[3]) / 2, (e[0] + e[2]) / 2))
    assert [b.as_list() for b in detected] == expected
    assert by_id[f"{vv}/count"].answer == "2"
    cells = parse_grounding(by_id[f"{vv}/ground"].answer).value
    assert list(cells) == grounding_cells([Box("ship", *e) for e in expected])
    assert "two ships" in by_id[f"{vv}/caption"].answer and "Sentinel-1" in by_id[f"{vv}/caption"].answer
    # the stored image is exactly the inference renderer's output
    with Image.open(SHIP_CHIPS / "Sen_ship_vv_02017091501054029.jpg") as im:
        values = np.asarray(im.convert("L"), dtype=np.float32)
    stored = np.asarray(Image.open(by_id[f"{vv}/detect"].image).convert("RGB"))
    assert np.array_equal(stored, np.asarray(render(values, ["VV"], units="dn")))


def test_split_is_deterministic_and_augmentation_only_in_train(tmp_path):
    a = build_dataset(SHIP_CHIPS, tmp_path / "a", val_fraction=0.34, augment="dihedral", tasks=("counting",))
    b = build_dataset(SHIP_CHIPS, tmp_path / "b", val_fraction=0.34, augment="dihedral", tasks=("counting",))
    assert (
        a.manifests
        == b.manifests
        == {"stage2_train.jsonl": {"counting": 16}, "stage2_val.jsonl": {"counting": 1}}
    )
    ids_a = [r.id for r in read_manifest(tmp_path / "a" / "stage2_val.jsonl")]
    assert ids_a == [r.id for r in read_manifest(tmp_path / "b" / "stage2_val.jsonl")]
    assert "~" not in ids_a[0]


def test_generated_voc_scene_boxes_clipped_and_class_names(generated_voc, tmp_path):
    build_dataset(generated_voc, tmp_path / "out", class_map=generated_voc / "classes.json", name="comp")
    train = {r.id: r for r in read_manifest(tmp_path / "out" / "stage2_train.jsonl")}
    det = parse_detection(train["comp/000001/detect"].answer).value
    # (90, 80, 130, 112) clipped to 120 x 100 -> (90, 80, 120, 100) -> 504 grid: x * 4.2, y * 5.04
    assert [b.as_list() for b in det] == [[42, 50, 168, 151], [378, 403, 504, 504]]
    assert all(b.label == "vehicle" for b in det)
    cls = [r for r in train.values() if r.task == "classification"]
    assert sorted(r.answer for r in cls) == ["BMP2", "BMP2", "T72"]
    assert "Choose one of: BMP2, T72." in cls[0].question
    assert train["comp/000001/count"].answer == "2"
    val = read_manifest(tmp_path / "out" / "stage2_val.jsonl")
    assert {r.id.split("/")[1] for r in val} == {"000003"}
    caption = read_manifest(tmp_path / "out" / "stage1_train.jsonl")[0].answer
    assert "T72 main battle tank" in caption and "BMP2 infantry fighting vehicle" in caption


def test_generated_class_folders_whole_chip_classification(tmp_path):
    root = tmp_path / "generated_folders"
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 2)):
        for k in ("0", "1"):
            (root / split / k).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
                    root / split / k / f"{i}.jpeg"
                )
    (root / "classes.json").write_text(json.dumps({"folder_to_class": {"0": "2S1", "1": "ZSU234"}}))
    summary = build_dataset(root, tmp_path / "out", name="mstar_gen", max_per_class=2)
    assert summary.manifests["stage2_train.jsonl"] == {"classification": 4}
    recs = read_manifest(tmp_path / "out" / "stage2_val.jsonl")
    assert sorted(r.answer for r in recs) == ["2S1", "2S1", "ZSU234", "ZSU234"]
    assert all("[0, 0, 504, 504]" in r.question and r.meta["depression_deg"] == 15 for r in recs)
    assert Image.open(recs[0].image).size == (504, 504)
    cap = read_manifest(tmp_path / "out" / "stage1_val.jsonl")[0]
    assert cap.meta["caption"] == "template" and "centre" in cap.answer
    assert "2S1" in cap.answer or "ZSU234" in cap.answer


@pytest.mark.parametrize("k", range(8))
def test_dihedral_moves_boxes_with_pixels(k):
    arr = np.zeros((20, 30), dtype=np.float32)
    arr[2:7, 5:14] = 1.0  # box x 5..14, y 2..7 (edges)
    out, (box,) = dihedral(arr, [Box("t", 5, 2, 14, 7)], k)
    ys, xs = np.nonzero(out)
    assert (box.x1, box.y1, box.x2, box.y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_bad_inputs(tmp_path, generated_voc):
    with pytest.raises(UsageError, match="folder missing"):
        build_dataset(tmp_path / "none", tmp_path / "out")
    with pytest.raises(UsageError, match="unknown task"):
        build_dataset(generated_voc, tmp_path / "out", tasks=("vqa",))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no annotated image"):
        scan_voc(empty)
    bad = tmp_path / "badvoc"
    shutil.copytree(generated_voc, bad)
    (bad / "Annotations" / "000002.xml").write_text("<annotation><size>")
    with pytest.raises(UsageError, match=r"000002\.xml: unreadable"):
        build_dataset(bad, tmp_path / "out2")


def test_caption_counts_and_cells():
    from training.builders import Chip

    chip = Chip(
        id="x/1", path=SHIP_CHIPS, split="train", coarse="ship", meta={"sensor": "Sentinel-1"}, pol="VV"
    )
    boxes = [Box("ship", 10, 10, 20, 20), Box("ship", 30, 30, 40, 40), Box("ship", 400, 400, 420, 420)]
    text = caption_for(chip, boxes)
    assert "three ships" in text.replace("three bright ships", "three ships")
    assert "two in the top left" in text and "one in the bottom right" in text


def test_training_cli_build_generated_and_base(tmp_path):
    from typer.testing import CliRunner

    from training.__main__ import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["build", str(SHIP_CHIPS), "--out", str(tmp_path / "ships"), "--task", "counting"]
    )
    assert res.exit_code == 0, res.output
    assert "3 image(s) rendered" in res.output and "stage2_train.jsonl" in res.output
    res = runner.invoke(app, ["generated", "--out", str(tmp_path / "gen"), "--n-train", "2", "--n-val", "2"])
    assert res.exit_code == 0, res.output
    assert len(read_manifest(tmp_path / "gen" / "generated_val.jsonl")) == 2
    res = runner.invoke(app, ["base", "--out", str(tmp_path / "base"), "--preset", "test"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "base" / "fusarbatch_base.json").read_text())["preset"] == "test"
    res = runner.invoke(app, ["base", "--out", str(tmp_path / "b2"), "--preset", "huge"])
    assert res.exit_code != 0


def test_any_split_file_and_grid(generated_voc, tmp_path):
    # a VOC folder whose ImageSets/Main has train and test files (SSDD's layout), built on a 336 grid
    main = generated_voc / "ImageSets" / "Main"
    main.mkdir()
    for f in ("train.txt", "val.txt"):
        (generated_voc / "ImageSets" / f).unlink()
    (main / "train.txt").write_text("000001\n000002\n")
    (main / "test.txt").write_text("000003\n")
    build_dataset(generated_voc, tmp_path / "all", class_map=generated_voc / "classes.json", grid=336)
    assert sorted(p.name for p in (tmp_path / "all").glob("stage2_*.jsonl")) == [
        "stage2_test.jsonl",
        "stage2_train.jsonl",
    ]
    test = read_manifest(tmp_path / "all" / "stage2_test.jsonl")
    assert {r.coordinate_size for r in test} == {336}
    det = next(r for r in test if r.task == "detection")
    # (0, 0, 20, 20) on 120 x 100 -> x * 2.8, y * 3.36 on the 336 grid
    assert [b.as_list() for b in parse_detection(det.answer).value] == [[0, 0, 56, 67]]
    assert det.meta["boxes"] == [[0, 0, 56, 67]]
    with Image.open(det.image) as im:
        assert im.size == (336, 336)
    build_dataset(generated_voc, tmp_path / "t", class_map=generated_voc / "classes.json", splits=["test"])
    assert [p.name for p in (tmp_path / "t").glob("stage2_*.jsonl")] == ["stage2_test.jsonl"]
    with pytest.raises(UsageError, match="has the splits train, test"):
        build_dataset(generated_voc, tmp_path / "v", splits=["val"])
    with pytest.raises(UsageError, match="multiple of 28"):
        build_dataset(generated_voc, tmp_path / "g", grid=300)


def test_sub_pixel_boxes_keep_one_grid_pixel(tmp_path):
    # a 1,000 x 1,000 generated chip with a 1 x 1 px target: 0.5 grid px on 504 must not become zero-width
    root = tmp_path / "generated_tiny_targets"
    root.mkdir()
    Image.fromarray(np.zeros((1000, 1000), dtype=np.uint8)).convert("RGB").save(root / "a.jpg")
    (root / "a.xml").write_text(
        _voc_xml(1000, 1000, [("ship", 813, 575, 814, 576), ("ship", 100, 100, 300, 200)])
    )
    build_dataset(root, tmp_path / "out", val_fraction=0.0)
    recs = {r.task: r for r in read_manifest(tmp_path / "out" / "stage2_train.jsonl")}
    boxes = [b.as_list() for b in parse_detection(recs["detection"].answer).value]
    # 813..814 x 0.504 = 409.75..410.26 -> the grid pixel 410; 575..576 -> 289.8..290.3 -> 290; the answer
    # lists the boxes in reading order (the XML has the lower one first)
    assert boxes == [[50, 50, 151, 101], [410, 290, 411, 291]]
    assert all(x2 > x1 and y2 > y1 for x1, y1, x2, y2 in boxes)
    assert recs["counting"].answer == "2"


def test_a_split_with_no_chip_and_unreadable_split_files_are_usage_errors(generated_voc, tmp_path):
    (generated_voc / "ImageSets" / "train.txt").write_text("no_such_id\n")
    (generated_voc / "ImageSets" / "val.txt").write_text("also_missing\n")
    with pytest.raises(UsageError, match="no chip in the split"):
        build_dataset(generated_voc, tmp_path / "out")
    (generated_voc / "ImageSets" / "train.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match=r"train\.txt: unreadable"):
        build_dataset(generated_voc, tmp_path / "out2")
    (generated_voc / "ImageSets" / "train.txt").write_text("000001\n")
    with pytest.raises(UsageError, match="up to 8176"):
        build_dataset(generated_voc, tmp_path / "out3", grid=28_000)


def test_hostile_annotations_are_one_line_errors(tmp_path):
    """Hostile round 5: a FIFO annotation hung the build; NaN / inf / ``1_0`` values gave tracebacks or were
    read as numbers; an unreadable image gave a PIL traceback; equal centres kept the XML's order."""
    import os

    root = tmp_path / "generated_hostile"
    root.mkdir()
    Image.fromarray(np.zeros((100, 100), dtype=np.uint8)).convert("RGB").save(root / "a.jpg")
    os.mkfifo(root / "a.xml")
    with pytest.raises(UsageError, match=r"a\.xml: a FIFO \(named pipe\), not a regular file"):
        build_dataset(root, tmp_path / "out_fifo", val_fraction=0.0)
    (root / "a.xml").unlink()
    for bad in ("nan", "inf", "-inf", "1_0", "1e400", "0x10", ""):
        (root / "a.xml").write_text(_voc_xml(100, 100, [("ship", bad, 10, 20, 30)]))
        with pytest.raises(UsageError, match=r"a\.xml: unreadable"):
            build_dataset(root, tmp_path / "out_bad", val_fraction=0.0)
    (root / "a.xml").write_text(_voc_xml("inf", 100, [("ship", 1, 10, 20, 30)]))
    with pytest.raises(UsageError, match=r"a\.xml: unreadable"):
        build_dataset(root, tmp_path / "out_inf", val_fraction=0.0)
    # two boxes with the same centre: ordered by their corners, whatever the XML's order
    answers = []
    for objs in (
        [("ship", 40, 40, 60, 60), ("ship", 30, 45, 70, 55)],
        [("ship", 30, 45, 70, 55), ("ship", 40, 40, 60, 60)],
    ):
        (root / "a.xml").write_text(_voc_xml(100, 100, objs))
        out = tmp_path / f"out_tie{len(answers)}"
        build_dataset(root, out, val_fraction=0.0, tasks=("detection",), grid=56)
        answers.append(read_manifest(out / "stage2_train.jsonl")[0].answer)
    assert answers[0] == answers[1]
    (root / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UsageError, match=r"a\.jpg: unreadable"):
        build_dataset(root, tmp_path / "out_img", val_fraction=0.0)


def test_failed_rebuild_leaves_the_previous_build_as_it_was(generated_voc, tmp_path):
    """Hostile round 5 (B14): a rebuild into an existing ``--out`` that fails on its second chip wrote
    the first chip's new image beside the previous manifests. Images now render into a staging
    folder first."""
    out = tmp_path / "out"
    build_dataset(generated_voc, out, tasks=("detection",), grid=56)
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert sum(n.endswith(".png") for n in before) == 3
    readme = (out / "README.md").read_text()
    assert "56 x 56 PNG" in readme and "504" not in readme
    # the same chips on a larger grid, with the second image broken: every file stays byte for byte
    (generated_voc / "JPEGImages" / "000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UsageError, match=r"000002\.jpg: unreadable"):
        build_dataset(generated_voc, out, tasks=("detection",), grid=112)
    after = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".images.partial-")] == []


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_rebuild_that_cannot_switch_in_changes_nothing(generated_voc, tmp_path):
    """Hostile round 6: a folder where the rebuild writes an image or a manifest, or a full disk, stopped the
    switch half way (new images beside old manifests) with a traceback. Every target is now checked before
    anything moves, and OSErrors are one line."""
    import resource
    import signal

    out = tmp_path / "out"
    build_dataset(generated_voc, out, tasks=("detection",), grid=56)
    before = _files(out)
    for in_the_way in (out / "images" / "generated_voc__000003.png", out / "stage2_val.jsonl"):
        in_the_way.unlink()
        in_the_way.mkdir()
        (in_the_way / "keep").write_text("x")
        with pytest.raises(UsageError, match="a folder where the build writes a file; remove it"):
            build_dataset(generated_voc, out, tasks=("detection",), grid=112)
        shutil.rmtree(in_the_way)
        in_the_way.write_bytes(before[str(in_the_way.relative_to(out))])
        assert _files(out) == before
        assert not [p for p in out.iterdir() if ".partial-" in p.name]
    # a full disk (RLIMIT_FSIZE: writes fail with EFBIG) while the images are staged
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        with pytest.raises(FusarbatchError, match=r"^disk full: file-size limit reached .* the dataset in "):
            build_dataset(generated_voc, out, tasks=("detection",), grid=112)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert _files(out) == before
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match=r"a_file: exists and is not a folder; choose another --out"):
        build_dataset(generated_voc, tmp_path / "a_file", tasks=("detection",))


def test_stale_staging_is_removed_and_old_manifests_do_not_outlive_their_images(generated_voc, tmp_path):
    """A killed build's staging (its PID gone) is removed by the next build, a live one's kept; manifests of
    an earlier build that this one does not write again are removed (they named re-rendered images)."""
    import subprocess

    out = tmp_path / "out"
    build_dataset(generated_voc, out, tasks=("detection",), grid=56)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        gone = subprocess.Popen(["true"])
        gone.wait()
        (out / f".build.partial-{gone.pid}-abc").mkdir()
        (out / f".build.partial-{gone.pid}-abc" / "x.png").write_bytes(b"x")
        (out / f".stage2_train.jsonl.partial-{gone.pid}").write_text("{}")
        (out / f".build.partial-{proc.pid}-def").mkdir()
        build_dataset(generated_voc, out, tasks=("detection",), grid=56, splits=("val",))
        left = sorted(p.name for p in out.iterdir() if ".partial-" in p.name)
        assert left == [f".build.partial-{proc.pid}-def"]
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in out.glob("stage*.jsonl")) == ["stage2_val.jsonl"]


def test_fifos_in_class_folders_and_class_maps_are_one_line_errors(tmp_path):
    """Hostile round 6: a FIFO chip image in a class folder, or a FIFO / endless class map, hung the build."""
    import os

    root = tmp_path / "generated_folders"
    (root / "train" / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(root / "train" / "0" / "a.png")
    os.mkfifo(root / "train" / "0" / "b.png")
    with pytest.raises(UsageError, match=r"b\.png: a FIFO \(named pipe\), not a regular file; remove it"):
        build_dataset(root, tmp_path / "out")
    assert not (tmp_path / "out" / "images").exists()
    os.mkfifo(tmp_path / "classes.fifo")
    with pytest.raises(UsageError, match=r"class map .*classes\.fifo: .*FIFO"):
        build_dataset(root, tmp_path / "out2", class_map=tmp_path / "classes.fifo")
    with pytest.raises(UsageError, match=r"class map /dev/zero: .*not a regular file"):
        build_dataset(root, tmp_path / "out3", class_map="/dev/zero")


def test_a_users_partial_named_files_stay_and_fifo_split_files_fail(generated_voc, tmp_path):
    """Hostile round 7: the stale-staging sweep removed any ``.*.partial-<number>`` (a user's
    ``.photos.partial-2023``); a FIFO split file silently dropped its split."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    (out / ".photos.partial-2023").mkdir()
    (out / ".photos.partial-2023" / "p.jpg").write_text("precious")
    (out / ".notes.partial-2024").write_text("mine")
    build_dataset(generated_voc, out, tasks=("counting",), grid=56)
    assert (out / ".photos.partial-2023" / "p.jpg").read_text() == "precious"
    assert (out / ".notes.partial-2024").read_text() == "mine"
    (generated_voc / "ImageSets" / "val.txt").unlink()
    os.mkfifo(generated_voc / "ImageSets" / "val.txt")
    with pytest.raises(UsageError, match=r"val\.txt: a FIFO \(named pipe\), not a regular file"):
        build_dataset(generated_voc, tmp_path / "out2", tasks=("counting",), grid=56)
