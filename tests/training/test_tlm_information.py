"""The TLM carries information: on generated data where the answer depends only on the anchor vectors, stage 1
learns it, while the same model evaluated with the TLM switched off stays at chance."""

from __future__ import annotations

import json

from training.evaluate import EvalConfig, evaluate
from training.synthetic import build_generated_anchor_task
from training.train import TrainConfig, train


def test_stage1_learns_from_anchors_only(generated_base_model, tmp_path):
    # class names that are single tokens of the tiny tokenizer: the answer is one token + <|im_end|>
    paths = build_generated_anchor_task(
        tmp_path / "generated_anchor_task", n_train=48, n_val=24, image_size=56, classes=("harbor", "vehicle")
    )
    out = tmp_path / "s1"
    result = train(
        TrainConfig(
            stage=1,
            data=[paths["train"]],
            base_model=generated_base_model,
            out=out,
            lr=5e-3,
            batch_size=8,
            grad_accum=1,
            max_steps=40,
            save_steps=0,
            log_steps=5,
        )
    )
    assert result.final_loss is not None
    with_tlm = evaluate(EvalConfig(model=out, data=[paths["val"]], batch_size=12, out=out / "eval"))
    without = evaluate(
        EvalConfig(model=out, data=[paths["val"]], batch_size=12, no_tlm=True, out=out / "eval_no_tlm")
    )
    acc = with_tlm["tasks"]["classification"]["accuracy"]
    acc_off = without["tasks"]["classification"]["accuracy"]
    # 2 balanced classes: chance is 0.5; images are speckle drawn independently of the class
    assert acc >= 0.9, with_tlm["tasks"]["classification"]
    assert acc_off <= 0.7, without["tasks"]["classification"]
    assert json.loads((out / "eval_no_tlm" / "metrics.json").read_text())["no_tlm"] is True
