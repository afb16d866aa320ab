"""The collator: the training prompt is exactly the inference prompt; the loss sees the answer and its end
token only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fusarbatch.model import Anchors, FusarGPT, counting_prompt, detection_prompt, load_processor
from training.data import IGNORE_INDEX, Collator, SeededSampler


def _item(question, answer, seed, size=56):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    return {
        "id": f"generated/{seed}",
        "image": image,
        "question": question,
        "answer": answer,
        "anchors": Anchors.empty(),
    }


def test_answer_only_labels_and_right_padding(generated_base_model):
    proc = load_processor(generated_base_model)
    col = Collator(proc)
    items = [
        _item(counting_prompt("ship"), "3", 0),
        _item(detection_prompt("ship"), '[{"bbox_2d": [1, 2, 30, 40], "label": "ship"}]', 1),
    ]
    batch = col(items)
    tok = proc.tokenizer
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert batch["pixel_values"].shape == (32, 1176)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, item in enumerate(items):
        n = int(batch["attention_mask"][i].sum())
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()  # right pad
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert labelled[-1] == im_end
        assert tok.decode(labelled[:-1]) == item["answer"]
        # labels sit exactly on the last tokens of the sequence
        assert batch["input_ids"][i, n - len(labelled) : n].tolist() == labelled
        assert (batch["labels"][i, : n - len(labelled)] == IGNORE_INDEX).all()
        assert int((batch["input_ids"][i] == proc.image_token_id).sum()) == 4  # 4 x 4 patches / merge 2 x 2
        assert batch["mm_token_type_ids"][i, n - len(labelled) :].eq(0).all()
    assert len(batch["anchors"]) == 2


def test_training_prompt_is_the_inference_prompt(generated_base_model):
    fusar = FusarGPT.from_pretrained(generated_base_model, init_tlm=True, device="cpu")
    col = Collator(fusar.processor)
    item = _item(counting_prompt("ship"), "12", 3)
    batch = col([item])
    inference = fusar.build_inputs([item["image"]], [item["question"]], image_size=56)
    n_prompt = int((batch["labels"][0] == IGNORE_INDEX).sum())
    assert batch["input_ids"][0, :n_prompt].tolist() == inference["input_ids"][0].tolist()
    assert torch.equal(batch["pixel_values"], inference["pixel_values"])
    assert batch["mm_token_type_ids"][0, :n_prompt].tolist() == inference["mm_token_type_ids"][0].tolist()


def test_long_answers_are_cut_never_the_prompt(generated_base_model, caplog):
    proc = load_processor(generated_base_model)
    item = _item(counting_prompt("ship"), "1 2 3 4 5 6 7 8 9 " * 20, 0)
    full = Collator(proc)([item])["input_ids"].shape[1]
    cut = Collator(proc, max_length=full - 10)([item])
    assert cut["input_ids"].shape[1] == full - 10
    with pytest.raises(ValueError, match="prompt alone"):
        Collator(proc, max_length=20)([item])


def test_seeded_sampler_depends_on_seed_and_epoch_only():
    a, b = SeededSampler(10, 42), SeededSampler(10, 42)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)
    assert list(b) == first and sorted(first) == list(range(10))
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(10))
