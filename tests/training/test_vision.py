"""Stage 0's vision phase (training/vision.py) on generated manifests and the tiny model: the fast patches
equal the processor's, only the vision tower moves, the heads learn where the targets are, --resume is
exact, and the output is the base of a --freeze-vision run that moves only the language model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fusarbatch.errors import UsageError
from fusarbatch.model import FusarGPT
from fusarbatch.model.fusar_gpt import load_processor
from training.manifest import Triplet, read_manifest, write_manifest
from training.train import TrainConfig, train
from training.vision import check_patchify, patchify, vision_images


def _config(base, data, out, **kw):
    defaults = {
        "stage": 0,
        "batch_size": 4,
        "grad_accum": 1,
        "lr": 3e-3,
        "max_steps": 6,
        "save_steps": 3,
        "save_total_limit": None,
        "log_steps": 1,
        "vision_only": True,
        "target_loss_weight": 1.0,
        "probe_loss_weight": 1.0,
    }
    data = data if isinstance(data, list) else [data]
    return TrainConfig(data=data, base_model=base, out=out, **{**defaults, **kw})


def test_patchify_equals_the_processor(generated_base_model):
    processor = load_processor(generated_base_model)
    rng = np.random.default_rng(0)
    for size in (56, 112):
        image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        ref = processor.image_processor(images=[image], return_tensors="pt")
        mine, thw = patchify(torch.from_numpy(np.asarray(image).copy())[None], processor.image_processor)
        assert thw.tolist() == ref["image_grid_thw"].tolist()
        torch.testing.assert_close(mine, ref["pixel_values"].float(), rtol=0, atol=1e-5)
        check_patchify(image, processor)  # does not raise
    with pytest.raises(ValueError, match="not a multiple of 28"):
        patchify(torch.zeros((1, 50, 56, 3), dtype=torch.uint8), processor.image_processor)


def test_vision_images_merges_the_records_of_an_image(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (56, 56)).save(img)
    other = tmp_path / "b.png"
    Image.new("RGB", (56, 56)).save(other)
    recs = [
        Triplet("1", img, "q", "1", coordinate_size=56, task="counting", meta={"boxes": [[1, 2, 9, 10]]}),
        Triplet("2", img, "q", "T72", coordinate_size=56, task="classification", meta={"class": "T72"}),
        Triplet("3", other, "q", "a caption", coordinate_size=56, task="caption", meta={}),
    ]
    got = vision_images(recs)
    assert len(got) == 1  # the caption-only image carries no signal
    assert got[0].boxes == ((1.0, 2.0, 9.0, 10.0),) and got[0].cls == "T72" and got[0].grid == 56


def test_vision_only_trains_the_tower_resumes_exactly_and_feeds_freeze_vision(
    generated_base_model, generated_counting_manifest, tmp_path
):
    data = generated_counting_manifest(n=16, size=56, seed=4)
    out = tmp_path / "vision"
    result = train(_config(generated_base_model, data, out))
    assert result.steps == 6 and result.records == 16  # records = distinct images
    info = json.loads((out / "fusarbatch_train.json").read_text())
    assert info["trains"]["vision_only"] is True and info["images_with_boxes"] == 16
    base = load_file(str(generated_base_model / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    vis = [k for k in base if k.startswith("visual.")]
    lm = [k for k in base if not k.startswith("visual.")]
    assert any(not torch.equal(base[k], trained[k]) for k in vis if k.startswith("visual.merger."))
    assert any(not torch.equal(base[k], trained[k]) for k in vis if k.startswith("visual.blocks.0."))
    assert all(torch.equal(base[k], trained[k]) for k in lm)  # the language model was not touched
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["target_loss"] > 0 and r["probe_loss"] > 0 for r in log)
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = out / "checkpoint-3"
    for name in (
        "target_head.safetensors",
        "image_probe.safetensors",
        "vision_state.pt",
        "model.safetensors",
    ):
        assert (ckpt / name).is_file(), name
    assert not (out / "target_head.safetensors").exists()  # training-only heads stay in the checkpoints
    # resume from checkpoint-3: the same weights as the uninterrupted run
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(ckpt, again / "checkpoint-3")
    train(_config(generated_base_model, data, again, resume=True))
    resumed = load_file(str(again / "model.safetensors"))
    for k in trained:
        torch.testing.assert_close(resumed[k], trained[k], rtol=0, atol=0, msg=k)
    # a full model directory that loads as is, then the base of --freeze-vision: only the language model moves
    fusar = FusarGPT.from_pretrained(out)
    assert fusar.image_size == 56
    reader = tmp_path / "reader"
    cfg = _config(out, data, reader, vision_only=False, freeze_vision=True, save_steps=0, max_steps=3)
    cfg.target_loss_weight = cfg.probe_loss_weight = 0.0
    train(cfg)
    read = load_file(str(reader / "model.safetensors"))
    assert all(torch.equal(read[k], trained[k]) for k in vis)
    assert any(not torch.equal(read[k], trained[k]) for k in lm)


def test_vision_only_learns_where_the_targets_are(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """On generated images with 0-3 bright squares, 60 steps of the vision phase make the dense head rank
    target cells above empty ones (AUC > 0.8; chance 0.5) on the training images."""
    from training.data import load_image
    from training.objectives import TargetHead, target_maps

    data = generated_counting_manifest(n=32, size=56, seed=5)
    out = tmp_path / "vision"
    train(_config(generated_base_model, data, out, max_steps=60, save_steps=30, lr=5e-3, batch_size=8))
    fusar = FusarGPT.from_pretrained(out / "checkpoint-30")
    head = TargetHead(fusar.base_model.config.text_config.hidden_size)
    head.load_state_dict(load_file(str(out / "checkpoint-30" / "target_head.safetensors")))
    records = [r for r in read_manifest(data)]
    images = torch.from_numpy(np.stack([np.asarray(load_image(r.image, 56)) for r in records]))
    pixels, thw = patchify(images, fusar.processor.image_processor)
    with torch.no_grad(), fusar.use_anchors([None] * len(records)):
        logits = head(fusar.visual(pixels, grid_thw=thw).pooler_output)[:, 1]
    truth = torch.cat(
        [target_maps(r.meta["boxes"], t, 56)[:, 1] for r, t in zip(records, thw.tolist(), strict=True)]
    )
    pos, neg = logits[truth == 1], logits[truth == 0]
    auc = float((pos[:, None] > neg[None, :]).float().mean())
    assert auc > 0.8, auc
    # python -m training heads: the same AUC (rank form), counts and their majority baseline
    from training.vision import evaluate_heads

    got = evaluate_heads(out / "checkpoint-30", records)
    assert got["images"] == got["images_with_boxes"] == 32 and got["majority_from"] == "eval"
    assert got["dense_auc"] == pytest.approx(auc, abs=1e-3)
    counts = [len(r.meta["boxes"]) for r in records]
    majority = max(set(counts), key=counts.count)
    assert got["count_majority"] == pytest.approx(counts.count(majority) / 32)
    assert 0 <= got["count_accuracy"] <= 1
    with pytest.raises(UsageError, match="no target_head"):
        evaluate_heads(out, records)  # the final model folder keeps no heads


def test_vision_only_usage_errors(generated_base_model, generated_counting_manifest, tmp_path):
    data = generated_counting_manifest(n=4)
    with pytest.raises(UsageError, match="give --target-loss-weight"):
        train(_config(generated_base_model, data, tmp_path / "a", target_loss_weight=0, probe_loss_weight=0))
    with pytest.raises(UsageError, match="for stage 0"):
        train(
            _config(
                generated_base_model, data, tmp_path / "b", stage=1, target_loss_weight=0, probe_loss_weight=0
            )
        )
    with pytest.raises(UsageError, match="--freeze-vision trains the language model only"):
        train(_config(generated_base_model, data, tmp_path / "c", freeze_vision=True))
    captions = tmp_path / "captions.jsonl"
    rec = read_manifest(data)[0]
    write_manifest(captions, [Triplet("c", rec.image, "q", "a caption", coordinate_size=56, task="caption")])
    with pytest.raises(UsageError, match="nothing to learn from"):
        train(_config(generated_base_model, captions, tmp_path / "d"))
    with pytest.raises(UsageError, match="no checkpoint"):
        train(_config(generated_base_model, data, tmp_path / "e", resume=True))


@pytest.mark.parametrize(
    "box",
    [
        [float("nan"), 5, 20, 20],  # NaN reached int() in target_maps: a traceback at step 1
        [5, 5, float("inf"), 20],
        [1e308, 1e308, 1e308, 1e308],  # its centre overflows to inf
        [1, 2, 3],  # malformed entries were dropped: the image trained as one without targets
        ["1", "2", "3", "4"],
        [True, True, False, False],
        [100, 100, 200, 200],  # off the 56 px grid: clamped into the corner cell as a target
        [-50, -50, -10, -10],
        [20, 20, 5, 5],  # inverted
        [10, 10, 10, 10],  # zero width and height: a target with no pixel
        [56, 0, 60, 10],  # touches the grid only at its edge
    ],
)
def test_vision_images_refuses_malformed_boxes(tmp_path, box):
    from training.manifest import ManifestError

    img = tmp_path / "a.png"
    Image.new("RGB", (56, 56)).save(img)
    rec = Triplet(
        "bad/1", img, "q", "1", coordinate_size=56, task="counting", meta={"boxes": [[1, 1, 9, 9], box]}
    )
    with pytest.raises(ManifestError, match=r"record 'bad/1' .*meta.boxes entry"):
        vision_images([rec])
    ok = Triplet("ok/1", img, "q", "1", coordinate_size=56, task="counting", meta={"boxes": [[0, 0, 56, 56]]})
    assert vision_images([ok])[0].boxes == ((0.0, 0.0, 56.0, 56.0),)


def test_vision_only_hostile_runs_fail_in_one_line_and_leave_nothing_usable(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Found by a hostile test run: each of these was a traceback, a NaN model written as the output, or a
    --resume that silently used other settings."""
    from fusarbatch.errors import FusarbatchError

    data = generated_counting_manifest(n=4, size=56, seed=1)
    # a coordinate_size the processor would resize: a usage error before anything is written
    odd = tmp_path / "odd.jsonl"
    write_manifest(
        odd,
        [
            Triplet(r.id, r.image, r.question, r.answer, coordinate_size=50, task=r.task, meta=r.meta)
            for r in read_manifest(data)
        ],
    )
    with pytest.raises(UsageError, match="coordinate_size 50 px"):
        train(_config(generated_base_model, odd, tmp_path / "odd"))
    assert not (tmp_path / "odd").exists()
    # --out is a file; --device not usable here
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        train(_config(generated_base_model, data, tmp_path / "file"))
    with pytest.raises(UsageError, match="--device foo"):
        train(_config(generated_base_model, data, tmp_path / "dev", device="foo"))
    # a finite loss with an overflowing gradient (clipping made the weights NaN, then saved as done):
    # such weights are refused now, and the lr that does the same is caught as a divergence
    nan_out = tmp_path / "nan"
    with pytest.raises(UsageError, match=r"--target-loss-weight 1e\+37: give a number in \[0, 10000\]"):
        train(_config(generated_base_model, data, nan_out, target_loss_weight=1e37, max_steps=1))
    with pytest.raises(FusarbatchError, match="diverged at step"):
        train(_config(generated_base_model, data, nan_out, lr=1e30, max_steps=3))
    assert not (nan_out / "model.safetensors").exists() and not list(nan_out.glob("checkpoint-*"))
    # --resume: another --lr was silently replaced by the checkpoint's; an incomplete checkpoint (killed while
    # saving) or an empty state file gave a traceback or "interrupted"
    out = tmp_path / "run"
    train(_config(generated_base_model, data, out, max_steps=2, save_steps=1))
    with pytest.raises(UsageError, match=r"--lr 1e-05 \(checkpoint: 0.003\)"):
        train(_config(generated_base_model, data, out, max_steps=2, save_steps=1, lr=1e-5, resume=True))
    (out / "checkpoint-1" / "vision_state.pt").write_bytes(b"")
    with pytest.raises(UsageError, match=r"checkpoint-1 is unreadable .*delete that folder"):
        train(_config(generated_base_model, data, out, max_steps=2, save_steps=1, resume=True))
    assert not list(out.glob(".checkpoint-*"))  # checkpoints are written under a temporary name


def test_a_16_bit_image_is_refused_not_clipped_to_white(tmp_path):
    """Pillow clips 16-bit values to 255 when converting to RGB (a white image): load_image refuses it."""
    from training.data import load_image
    from training.manifest import ManifestError

    path = tmp_path / "generated_16bit.png"
    Image.fromarray(np.full((56, 56), 3000, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    with pytest.raises(ManifestError, match=r"16/32-bit.*render it to 8-bit"):
        load_image(path, 56)


def test_a_one_step_run_learns_at_its_learning_rate(
    generated_base_model, generated_counting_manifest, tmp_path
):
    data = generated_counting_manifest(n=4, size=56, seed=6)
    train(_config(generated_base_model, data, tmp_path / "one", max_steps=1, save_steps=0))
    log = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1
    base = load_file(str(generated_base_model / "model.safetensors"))
    trained = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert any(not torch.equal(base[k], trained[k]) for k in base if k.startswith("visual."))


def test_small_input_faults_are_one_line_usage_errors(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Found by the hostile round: an unknown --task, one image on two grids, an empty class name, and a
    --resume whose --max-steps ends before the checkpoint."""
    from training.manifest import ManifestError

    data = generated_counting_manifest(n=8, size=56, seed=7)
    with pytest.raises(UsageError, match="--task bogus: unknown; choose from"):
        train(_config(generated_base_model, data, tmp_path / "a", tasks=["bogus"]))
    rec = read_manifest(data)[0]
    twice = [
        Triplet(
            "x/1", rec.image, "q", "1", coordinate_size=56, task="counting", meta={"boxes": [[1, 1, 9, 9]]}
        ),
        Triplet(
            "x/2", rec.image, "q", "1", coordinate_size=112, task="counting", meta={"boxes": [[1, 1, 9, 9]]}
        ),
    ]
    with pytest.raises(ManifestError, match="also appears with coordinate_size 56, here 112"):
        vision_images(twice)
    empty = [
        Triplet("c/1", rec.image, "q", "a", coordinate_size=56, task="classification", meta={"class": " "})
    ]
    assert vision_images(empty) == []  # an empty class name is no class
    out = tmp_path / "r"
    train(_config(generated_base_model, data, out, max_steps=5, save_steps=2))
    with pytest.raises(UsageError, match=r"step 4\).*3 steps in all"):
        train(_config(generated_base_model, data, out, max_steps=3, save_steps=2, resume=True))


def test_a_full_disk_at_the_final_save_leaves_no_half_model(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """RLIMIT_FSIZE (``ulimit -f``) makes the weights file fail to write: one line, exit 1, and --out holds no
    model file and no partial folder (before: config.json without weights)."""
    import subprocess
    import sys

    data = generated_counting_manifest(n=4, size=56, seed=8)
    out = tmp_path / "full"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from fusarbatch.cli import main\n"
        "sys.argv = ['fusarbatch'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = ["train", "--stage", "0", "--vision-only", "--target-loss-weight", "1", "--probe-loss-weight", "1"]
    args += ["--data", str(data), "--base-model", str(generated_base_model), "--out", str(out)]
    args += ["--max-steps", "2", "--save-steps", "0", "--batch-size", "2", "--grad-accum", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "disk full: file-size limit reached" in last and str(out) in last, proc.stderr[-2000:]
    assert not any(out.glob("*.safetensors")) and not (out / "config.json").exists()
    assert not (out / ".model.partial").exists()


def test_heads_hostile_checkpoints_and_train_data(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """python -m training heads on broken inputs: one UsageError naming the file (hostile round 3: each was
    a traceback: IndexError, SafetensorError, JSONDecodeError, OverflowError)."""
    from safetensors.torch import save_file

    from training.vision import evaluate_heads

    data = generated_counting_manifest(n=4)
    out = tmp_path / "v"
    train(_config(generated_base_model, data, out, max_steps=2, save_steps=1))
    ckpt = out / "checkpoint-1"
    records = read_manifest(data)
    # a --train-data without boxes: the count majority had nothing to count
    no_boxes = tmp_path / "no_boxes.jsonl"
    write_manifest(no_boxes, [Triplet(**{**r.__dict__, "meta": {"class": "ship"}}) for r in records])
    with pytest.raises(UsageError, match="--train-data: no record has boxes"):
        evaluate_heads(ckpt, records, read_manifest(no_boxes))
    # a probe whose weights make log1p(count) overflow expm1: a wrong count, not an OverflowError
    wild = tmp_path / "wild"
    shutil.copytree(ckpt, wild)
    probe = load_file(str(wild / "image_probe.safetensors"))
    save_file({k: torch.full_like(v, -1e30) for k, v in probe.items()}, str(wild / "image_probe.safetensors"))
    got = evaluate_heads(wild, records)
    assert got["images_with_boxes"] == 4 and 0 <= got["count_accuracy"] <= 1
    # truncated / NaN heads and a garbage fusarbatch_train.json
    for name, damage in (
        ("target_head.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
        (
            "image_probe.safetensors",
            lambda p: save_file({"proj.weight": torch.full((3, 3), float("nan"))}, str(p)),
        ),
        ("fusarbatch_train.json", lambda p: p.write_text("{not json")),
    ):
        broken = tmp_path / f"broken_{name}"
        shutil.copytree(ckpt, broken)
        damage(broken / name)
        with pytest.raises(UsageError, match=f"{name}: unreadable"):
            evaluate_heads(broken, records)
