"""Two-stage training on generated manifests: the loss falls, outputs load, stage 2 freezes the TLM, --resume
gives the same weights as an uninterrupted run; the CLI commands drive it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fusarbatch.cli import app
from fusarbatch.errors import UsageError
from fusarbatch.model import FusarGPT
from training.data import Collator, TripletDataset
from training.manifest import read_manifest
from training.synthetic import build_generated_anchor_task
from training.train import TrainConfig, train


def _config(base, data, out, **kw):
    defaults = {"batch_size": 4, "grad_accum": 1, "lr": 3e-3, "max_steps": 8, "save_steps": 0, "log_steps": 1}
    return TrainConfig(stage=kw.pop("stage", 1), data=[data], base_model=base, out=out, **{**defaults, **kw})


@torch.no_grad()
def _mean_loss(fusar, manifest):
    records = read_manifest(manifest)
    ds = TripletDataset(records)
    batch = Collator(fusar.processor)([ds[i] for i in range(len(ds))])
    anchors = batch.pop("anchors")
    batch.pop("target_boxes"), batch.pop("grids")
    fusar.eval()
    return float(fusar(anchors, **batch).loss)


def _weights(directory):
    out = {f"tlm.{k}": v for k, v in load_file(str(directory / "tlm.safetensors")).items()}
    if (directory / "adapter_model.safetensors").is_file():
        out.update(
            {f"lora.{k}": v for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}
        )
    return out


def test_cli_stage1_then_stage2_and_eval(generated_base_model, generated_counting_manifest, tmp_path):
    data = generated_counting_manifest(n=8)
    runner = CliRunner()
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    common = ["--data", str(data), "--base-model", str(generated_base_model), "--batch-size", "4"]
    common += ["--grad-accum", "1", "--max-steps", "10", "--log-steps", "1", "--save-steps", "5"]
    res = runner.invoke(app, ["train", "--stage", "1", "--out", str(s1), "--lr", "3e-3", *common])
    assert res.exit_code == 0, res.output
    assert "stage 1: 10 steps on 8 records" in res.output
    # release layout: peft adapter (LLM projections only) + TLM + processor; checkpoints, log and curve
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tlm.safetensors",
        "tlm_config.json",
        "tokenizer.json",
        "processor_config.json",
        "fusarbatch_train.json",
        "train_log.jsonl",
        "loss.png",
    ):
        assert (s1 / name).is_file(), name
    assert sorted(p.name for p in s1.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    assert json.loads((s1 / "tlm_config.json").read_text())["format"] == "tlm_original_train_patch_resize_v1"
    lora_keys = load_file(str(s1 / "adapter_model.safetensors")).keys()
    assert lora_keys and all("language_model" in k and "visual" not in k for k in lora_keys)
    log = [json.loads(x) for x in (s1 / "train_log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in log if "loss" in row]
    assert steps == list(range(1, 11))
    assert all(row["samples_per_s"] is None or row["samples_per_s"] > 0 for row in log)
    with Image.open(s1 / "loss.png") as im:
        assert im.format == "PNG" and im.size == (900, 520)
    info = json.loads((s1 / "fusarbatch_train.json").read_text())
    assert (
        info["stage"] == 1 and info["trains"] == {"tlm": True, "lora": True} and info["precision"] == "fp32"
    )
    # the final model and the last checkpoint hold the same weights
    final, last = _weights(s1), _weights(s1 / "checkpoint-10")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)

    # the loss fell: the trained model fits the records better than the base (LoRA starts at zero, and the
    # records have no anchors, so an untrained model is the base model)
    base = FusarGPT.from_pretrained(generated_base_model, init_tlm=True, device="cpu")
    trained = FusarGPT.from_pretrained(generated_base_model, adapter_dir=s1, device="cpu")
    before, after = _mean_loss(base, data), _mean_loss(trained, data)
    assert after < 0.8 * before, (before, after)

    res = runner.invoke(
        app, ["train", "--stage", "2", "--out", str(s2), "--init", str(s1), "--lr", "1e-3", *common]
    )
    assert res.exit_code == 0, res.output
    w1, w2 = _weights(s1), _weights(s2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("tlm."))  # TLM frozen
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if k.startswith("lora."))  # same adapter, trained on
    assert json.loads((s2 / "fusarbatch_train.json").read_text())["trains"] == {"tlm": False, "lora": True}

    res = runner.invoke(
        app, ["eval", "--model", str(s2), "--data", str(data), "--batch-size", "4", "--out", str(s2 / "eval")]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((s2 / "eval" / "metrics.json").read_text())
    assert metrics["records"] == 8 and metrics["tasks"]["counting"]["n"] == 8
    assert "| counting | 8 | accuracy |" in res.output
    assert len((s2 / "eval" / "predictions.jsonl").read_text().splitlines()) == 8

    # export: LoRA merged into a self-contained model folder that answers like the adapter model
    from training.__main__ import app as training_app

    full = tmp_path / "full"
    res = runner.invoke(training_app, ["export", "--model", str(s2), "--out", str(full)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["eval", "--model", str(full), "--data", str(data), "--out", str(tmp_path / "e")]
    )
    assert res.exit_code == 0, res.output
    merged = [
        json.loads(x)["prediction"] for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()
    ]
    adapter = [
        json.loads(x)["prediction"] for x in (s2 / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert merged == adapter


def test_resume_gives_the_same_weights(generated_base_model, generated_counting_manifest, tmp_path):
    data = generated_counting_manifest(n=8, seed=1)
    # 8 records, batch 2 x accumulation 2 -> 2 steps per epoch; checkpoint-3 sits inside the second epoch
    kw = {"batch_size": 2, "grad_accum": 2, "max_steps": 5, "save_steps": 3, "save_total_limit": None}
    full = train(_config(generated_base_model, data, tmp_path / "full", **kw))
    assert full.steps == 5
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = train(_config(generated_base_model, data, resumed_dir, resume=True, **kw))
    assert resumed.steps == 5
    a, b = _weights(tmp_path / "full"), _weights(resumed_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the log of the resumed run holds steps 4..5 once each
    steps = [json.loads(x)["step"] for x in (resumed_dir / "train_log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 3] == [4, 5, 5] or [s for s in steps if s > 3][:2] == [4, 5]


def test_stage1_without_lora_trains_only_the_tlm(generated_base_model, generated_counting_manifest, tmp_path):
    with pytest.raises(UsageError, match="no record has anchors"):
        train(
            _config(generated_base_model, generated_counting_manifest(n=4), tmp_path / "x", stage1_lora=False)
        )
    data = build_generated_anchor_task(tmp_path / "generated_anchor_task", n_train=4, n_val=1, image_size=56)[
        "train"
    ]
    res = train(_config(generated_base_model, data, tmp_path / "s1", stage1_lora=False, max_steps=2))
    assert not (tmp_path / "s1" / "adapter_model.safetensors").exists()
    assert res.trainable_params == sum(
        p.numel()
        for p in FusarGPT.from_pretrained(generated_base_model, init_tlm=True, device="cpu").tlm.parameters()
    )
    # stage 2 from it adds a new LoRA adapter
    train(_config(generated_base_model, data, tmp_path / "s2", stage=2, init=tmp_path / "s1", max_steps=2))
    assert (tmp_path / "s2" / "adapter_model.safetensors").is_file()


def test_usage_errors(generated_base_model, generated_counting_manifest, tmp_path):
    data = generated_counting_manifest(n=4)
    with pytest.raises(UsageError, match="needs --init"):
        train(_config(generated_base_model, data, tmp_path / "x", stage=2))
    with pytest.raises(UsageError, match="no checkpoint"):
        train(_config(generated_base_model, data, tmp_path / "y", resume=True))
    (tmp_path / "z" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(UsageError, match="pass --resume"):
        train(_config(generated_base_model, data, tmp_path / "z"))
    with pytest.raises(UsageError, match="folder missing"):
        train(_config(generated_base_model, data, tmp_path / "w", stage=2, init=tmp_path / "none"))
    res = CliRunner().invoke(
        app, ["train", "--stage", "3", "--data", str(data), "--base-model", "b", "--out", "o"]
    )
    assert res.exit_code == 2


def test_stage0_trains_every_weight_and_resumes(generated_base_model, generated_counting_manifest, tmp_path):
    from safetensors.torch import load_file as load

    from training.train import TARGET_HEAD_FILE

    data = generated_counting_manifest(n=8, size=56, seed=2)
    kw = {
        "stage": 0,
        "batch_size": 2,
        "grad_accum": 1,
        "max_steps": 4,
        "save_steps": 2,
        "save_total_limit": None,
    }
    kw |= {"lr": 1e-3, "target_loss_weight": 1.0, "probe_loss_weight": 1.0, "position_loss_weight": 1.0}
    full = train(_config(generated_base_model, data, tmp_path / "full", **kw))
    assert full.steps == 4
    out = tmp_path / "full"
    info = json.loads((out / "fusarbatch_train.json").read_text())
    assert info["stage"] == 0 and info["loss_mean"] == "answer" and info["image_size"] == 56
    base = load(str(generated_base_model / "model.safetensors"))
    trained = load(str(out / "model.safetensors"))
    # every part of the base moved: vision tower, merger and language model
    for prefix in ("visual.blocks.0.", "visual.merger.", "model.layers.0."):
        keys = [k for k in base if k.startswith(prefix)]
        assert keys and any(not torch.equal(base[k], trained[k]) for k in keys), prefix
    # a full model directory: loads as is, with an identity TLM at the records' size
    fusar = FusarGPT.from_pretrained(out)
    assert fusar.image_size == 56
    assert torch.count_nonzero(fusar.tlm.film_mlp[-1].weight) == 0
    assert (out / "checkpoint-2" / TARGET_HEAD_FILE).is_file()
    assert not (out / TARGET_HEAD_FILE).exists()  # training-only head: not in the model
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(0 < r["target_loss"] < 10 and r["probe_loss"] > 0 for r in log if "loss" in r)
    # a cross-entropy over 32 bins per axis: about ln 32 = 3.47 while untrained
    assert all(1 < r["position_loss"] < 6 for r in log if "loss" in r)
    assert (out / "checkpoint-2" / "position_probe.safetensors").is_file()
    # resume from checkpoint-2: the same weights as the uninterrupted run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_dir / "checkpoint-2")
    train(_config(generated_base_model, data, resumed_dir, resume=True, **kw))
    again = load(str(resumed_dir / "model.safetensors"))
    for k in trained:
        torch.testing.assert_close(trained[k], again[k], rtol=0, atol=1e-6, msg=k)
    # hostile round 5: a truncated head file, and a save killed before the Trainer's state (tracebacks)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copytree(out / "checkpoint-2", broken / "checkpoint-2")
    probe_file = broken / "checkpoint-2" / "position_probe.safetensors"
    probe_file.write_bytes(probe_file.read_bytes()[:40])
    with pytest.raises(UsageError, match=r"position_probe.safetensors unreadable .*delete that folder"):
        train(_config(generated_base_model, data, broken, resume=True, **kw))
    shutil.copy2(out / "checkpoint-2" / "position_probe.safetensors", probe_file)
    (broken / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(UsageError, match=r"checkpoint-2 is incomplete \(trainer_state.json missing"):
        train(_config(generated_base_model, data, broken, resume=True, **kw))


def test_stage0_usage_errors(generated_base_model, generated_counting_manifest, tmp_path):
    data = generated_counting_manifest(n=4)
    with pytest.raises(UsageError, match="--init is for stages 1 and 2"):
        train(_config(generated_base_model, data, tmp_path / "a", stage=0, init=tmp_path))
    with pytest.raises(UsageError, match="stage 0 only"):
        train(_config(generated_base_model, data, tmp_path / "b", stage=1, target_loss_weight=1.0))
    with pytest.raises(UsageError, match="--position-loss-weight trains the language model"):
        train(_config(generated_base_model, data, tmp_path / "b2", stage=1, position_loss_weight=1.0))
    # weights that overflow the gradients (every step's norm was inf, nothing trained; hostile round 5)
    for name in ("position_loss_weight", "target_loss_weight"):
        with pytest.raises(UsageError, match=r"weight 1e\+37: give a number in \[0, 10000\]"):
            train(_config(generated_base_model, data, tmp_path / "b4", stage=0, **{name: 1e37}))
    assert not (tmp_path / "b4").exists()
    # the value as given, not rounded to "10000" (hostile round 6, D16)
    with pytest.raises(UsageError, match=r"--position-loss-weight 10000\.001: give a number in \[0, 10000\]"):
        train(_config(generated_base_model, data, tmp_path / "b4", stage=0, position_loss_weight=10000.001))
    # a 1-layer language model has no layer between its input and its output for the probe (IndexError before)
    from fusarbatch.model import build_tiny_model

    one = build_tiny_model(tmp_path / "generated_one_layer", num_layers=1)
    with pytest.raises(UsageError, match="at least 2 layers \\(this one has 1\\)"):
        train(_config(one, data, tmp_path / "b5", stage=0, position_loss_weight=1.0))
    with pytest.raises(UsageError, match="--position-loss-weight trains the language model"):
        train(
            _config(
                generated_base_model,
                data,
                tmp_path / "b3",
                stage=0,
                vision_only=True,
                target_loss_weight=1.0,
                position_loss_weight=1.0,
            )
        )
    with pytest.raises(UsageError, match="no records of the tasks detection"):
        train(_config(generated_base_model, data, tmp_path / "c", stage=0, tasks=["detection"]))
    with pytest.raises(UsageError, match="--loss-mean"):
        train(_config(generated_base_model, data, tmp_path / "d", stage=0, loss_mean="sum"))


def test_bad_rates_and_a_diverging_run_end_with_one_line(
    generated_base_model, generated_counting_manifest, tmp_path
):
    from fusarbatch.errors import FusarbatchError

    data = generated_counting_manifest(n=4)
    for lr in (float("nan"), float("inf"), -1.0, 0.0):
        with pytest.raises(UsageError, match="--lr"):
            train(_config(generated_base_model, data, tmp_path / "a", stage=0, lr=lr))
    with pytest.raises(UsageError, match="--epochs"):
        train(
            _config(generated_base_model, data, tmp_path / "b", stage=0, epochs=float("nan"), max_steps=None)
        )
    # a weight so large that the first loss is infinite is refused; an lr that blows the weights up makes the
    # loss infinite a step later: the run stops, no NaN model is saved as done
    with pytest.raises(UsageError, match=r"--spread-loss-weight 1e\+308: give a number in \[0, 10000\]"):
        train(_config(generated_base_model, data, tmp_path / "c", stage=0, spread_loss_weight=1e308))
    with pytest.raises(FusarbatchError, match=r"training diverged at step [2-4]"):
        train(_config(generated_base_model, data, tmp_path / "c", stage=0, lr=1e30, max_steps=4))
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_one_step_moves_the_weights_and_resume_repeats_the_settings(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Hostile round 3: a 1-step run spent its only step at lr 0 (HF rounds the warm-up share up) and left
    the base unchanged; a --resume with another --freeze-vision was a ValueError from the optimizer, and one
    with another --lr was silently run at the checkpoint's."""
    data = generated_counting_manifest(n=4)
    out = tmp_path / "one"
    kw = {"stage": 0, "freeze_vision": True, "max_steps": 1, "save_steps": 1, "batch_size": 2}
    train(_config(generated_base_model, data, out, **kw))
    base = load_file(str(generated_base_model / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert moved and not any("visual" in k for k in moved)
    for change, flag in (({"freeze_vision": False}, "--freeze-vision False"), ({"lr": 1e-2}, "--lr 0.01")):
        with pytest.raises(UsageError, match=flag):
            train(
                _config(generated_base_model, data, out, **{**kw, "max_steps": 2, "resume": True, **change})
            )
    train(_config(generated_base_model, data, out, **{**kw, "max_steps": 2, "resume": True}))


def test_final_loss_is_the_last_steps(generated_base_model, generated_counting_manifest, tmp_path):
    """Hostile round 3: a run shorter than --log-steps reported the loss of step 1 as its final loss."""
    data = generated_counting_manifest(n=4)
    res = train(_config(generated_base_model, data, tmp_path / "o", max_steps=3, log_steps=10, batch_size=2))
    rows = [json.loads(x) for x in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 3] and res.final_loss == pytest.approx(losses[3])


def test_aux_loss_scale_keeps_aux_weights_independent_of_grad_accum():
    """Hostile round 5 (B10): with --loss-mean token and --grad-accum N the auxiliary losses weighed N times
    too much (the model's loss is divided over the accumulated batch, the per-batch auxiliary means were
    not). ``grad_accum`` is the batches of the current window (hostile round 6, D7)."""
    from training.train import aux_loss_scale

    assert aux_loss_scale("token", training=True, grad_accum=4) == 0.25
    assert aux_loss_scale("token", training=True, grad_accum=2) == 0.5  # an epoch's short last window
    assert aux_loss_scale("token", training=True, grad_accum=1) == 1.0
    assert aux_loss_scale("token", training=False, grad_accum=4) == 1.0  # evaluation is not accumulated
    assert aux_loss_scale("answer", training=True, grad_accum=4) == 1.0  # the Trainer divides this one
    assert aux_loss_scale("token", training=True, grad_accum=0) == 1.0
    for bad in ("sum", "Token", ""):
        with pytest.raises(ValueError, match="loss_mean"):
            aux_loss_scale(bad, training=True, grad_accum=4)


def test_aux_losses_weigh_the_same_in_a_short_accumulation_window(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Hostile round 6 (D7): the auxiliary losses were divided by --grad-accum, not by the batches the window
    really holds: on 2 records (batch 1) --grad-accum 1000 gave them 1/1000 of their weight, --grad-accum 2
    1/2. The one step of each run sees the same 2 batches: the same loss and the same weights."""
    data = generated_counting_manifest(n=2, seed=4)
    kw = {"stage": 0, "loss_mean": "token", "target_loss_weight": 1.0, "batch_size": 1, "max_steps": 1}
    for accum in (2, 1000):
        train(_config(generated_base_model, data, tmp_path / f"accum{accum}", grad_accum=accum, **kw))
    logs = [(tmp_path / f"accum{a}" / "train_log.jsonl").read_text().splitlines() for a in (2, 1000)]
    losses = [[row["loss"] for row in map(json.loads, lines) if "loss" in row] for lines in logs]
    assert len(losses[0]) == 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    a, b = (load_file(str(tmp_path / f"accum{n}" / "model.safetensors")) for n in (2, 1000))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_out_a_file_and_resume_on_another_base_model_are_usage_errors(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Hostile round 6: ``--out`` a regular file was a FileExistsError traceback (D10); ``--resume`` with
    another ``--base-model`` ran on it silently (D11)."""
    from fusarbatch.model import build_tiny_model

    data = generated_counting_manifest(n=4)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UsageError, match=r"--out .*a_file: exists and is not a folder; choose another --out"):
        train(_config(generated_base_model, data, tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "not a folder"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"--out .*dangling: cannot create the folder"):
        train(_config(generated_base_model, data, tmp_path / "dangling"))
    args = ["train", "--stage", "1", "--data", str(data), "--base-model", str(generated_base_model)]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a_file")])
    assert isinstance(res.exception, UsageError) and "exists and is not a folder" in str(res.exception)

    out = tmp_path / "s1"
    kw = {"max_steps": 1, "save_steps": 1, "batch_size": 2}
    train(_config(generated_base_model, data, out, **kw))
    other = build_tiny_model(tmp_path / "other_base", seed=1, init_std=0.02, embed_std=0.3)
    kw |= {"max_steps": 2, "resume": True}
    with pytest.raises(UsageError) as caught:
        train(_config(other, data, out, **kw))
    message = str(caught.value)
    assert "\n" not in message and "--resume from" in message
    assert f"--base-model {other.resolve()} (checkpoint: {generated_base_model.resolve()})" in message
    assert json.loads((out / "fusarbatch_train.json").read_text())["base_model"] == str(
        generated_base_model.resolve()
    )
    assert train(_config(generated_base_model, data, out, **kw)).steps == 2  # the same base model resumes


_UNDER_FILE_SIZE_LIMIT = (
    "import resource, runpy, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))\n"
    "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def _run_with_a_full_disk(*args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` under RLIMIT_FSIZE 150 kB: writes past it fail with EFBIG, as on a full
    disk."""
    return subprocess.run(
        [sys.executable, "-c", _UNDER_FILE_SIZE_LIMIT, *args], capture_output=True, text=True, timeout=300
    )


def test_a_full_disk_in_train_and_base_is_one_line(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Hostile round 5: a full disk in ``train`` (a checkpoint) and in ``python -m training base`` gave
    tracebacks, and ``base`` left a half-written model."""
    out = tmp_path / "stage1"
    data = generated_counting_manifest(n=4, size=56, seed=3)
    proc = _run_with_a_full_disk(
        "fusarbatch.cli", "train", "--stage", "0", "--data", str(data),
        "--base-model", str(generated_base_model), "--out", str(out),
        "--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--grad-accum", "1",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "disk full: file-size limit reached" in last and str(out) in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # hostile round 6 (D9): the checkpoint it was writing held only config.json, and a rerun was refused
    # with or without --resume; it is removed, and the message says what to rerun
    assert not list(out.glob("checkpoint-*")), sorted(p.name for p in out.iterdir())
    assert "free space, then rerun without --resume" in last and "checkpoint-1 was removed" in last, last
    base = tmp_path / "base"
    proc = _run_with_a_full_disk("training", "base", "--out", str(base), "--preset", "demo")
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "disk full: file-size limit reached" in last and str(base) in last, proc.stderr[-2000:]
    assert not base.exists() and not list(tmp_path.glob(".base.tmp-*"))


def test_a_full_disk_at_the_final_save_or_a_later_checkpoint_says_how_to_go_on(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Hostile round 6: a full disk while saving the final model was a SafetensorError traceback that left
    --out with config.json and no weights (D8); one at a checkpoint after an earlier one left the incomplete
    folder, which made --resume refuse to run (D9)."""
    data = generated_counting_manifest(n=4, size=56, seed=3)
    common = ["--stage", "0", "--data", str(data), "--base-model", str(generated_base_model)]
    common += ["--batch-size", "2", "--grad-accum", "1"]
    out = tmp_path / "final"
    proc = _run_with_a_full_disk(
        "fusarbatch.cli", "train", *common, "--out", str(out), "--max-steps", "1", "--save-steps", "0"
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "disk full: file-size limit reached" in last and f"the final model in {out}" in last, last
    assert "then rerun without --resume" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["train_log.jsonl"]  # no half model, no staging folder

    out = tmp_path / "resumed"
    runner = CliRunner()
    res = runner.invoke(app, ["train", *common, "--out", str(out), "--max-steps", "1", "--save-steps", "1"])
    assert res.exit_code == 0, res.output
    again = ["train", *common, "--out", str(out), "--max-steps", "2", "--save-steps", "1", "--resume"]
    proc = _run_with_a_full_disk("fusarbatch.cli", *again)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"a checkpoint in {out}" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "then rerun with --resume (it continues from checkpoint-1" in last, last
    assert "the incomplete checkpoint-2 was removed" in last, last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    res = runner.invoke(app, again)  # what the message says, with space again
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "model.safetensors").is_file()


def test_a_file_named_like_a_checkpoint_is_a_usage_error(
    generated_base_model, generated_counting_manifest, tmp_path
):
    """Hostile round 7: a file ``checkpoint-1`` in --out made the Trainer fail with a traceback at its first
    save, steps into the run."""
    from fusarbatch.errors import UsageError

    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-1").write_text("junk")
    data = generated_counting_manifest(n=4, size=56, seed=2)
    cfg = TrainConfig(stage=0, data=[data], base_model=generated_base_model, out=out, max_steps=1)
    with pytest.raises(UsageError, match=r"checkpoint-1 is not a checkpoint folder; remove it"):
        train(cfg)
