"""TLM arithmetic against an independent reference written from the formula (paper Sec. 3.2, DESIGN 3.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusarbatch.model import TLM, Anchors, TLMConfig, gaussian_weights
from fusarbatch.model.tlm import TLM_FORMAT

C = 64
MERGE = 2


# ------------------------------------------------------------ reference
def ref_mlp(tlm: TLM, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """film_mlp in float64 numpy from the raw weights: Linear -> SiLU -> Linear, chunk(2)."""
    sd = {k: v.detach().double().numpy() for k, v in tlm.film_mlp.state_dict().items()}
    h = features.astype(np.float64) @ sd["0.weight"].T + sd["0.bias"]
    h = h / (1.0 + np.exp(-h))
    out = h @ sd["2.weight"].T + sd["2.bias"]
    return out[:, :C], out[:, C:]


def ref_bilinear(field: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize (align_corners=False, PyTorch's source-index rule): (H, W, C) -> (out_h, out_w, C)."""
    in_h, in_w = field.shape[:2]
    out = np.zeros((out_h, out_w, field.shape[2]))
    for i in range(out_h):
        sy = max((i + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = math.floor(sy)
        y1 = min(y0 + 1, in_h - 1)
        ly = sy - y0
        for j in range(out_w):
            sx = max((j + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = math.floor(sx)
            x1 = min(x0 + 1, in_w - 1)
            lx = sx - x0
            out[i, j] = (
                (1 - ly) * (1 - lx) * field[y0, x0]
                + (1 - ly) * lx * field[y0, x1]
                + ly * (1 - lx) * field[y1, x0]
                + ly * lx * field[y1, x1]
            )
    return out


def ref_modulate_image(
    tlm: TLM, tokens: np.ndarray, hp: int, wp: int, feats: np.ndarray, pos: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """One image, straight from the formula with loops: tokens (hp/2 * wp/2, C) raster -> modulated."""
    sigma = 2.0
    if len(feats) == 0 or not mask.any():
        return tokens.astype(np.float64)
    gamma, beta = ref_mlp(tlm, feats)
    s = len(feats)
    w = np.zeros((s, hp, wp))
    for a in range(s):
        ay, ax = pos[a, 0] * (hp - 1), pos[a, 1] * (wp - 1)
        for i in range(hp):
            for j in range(wp):
                w[a, i, j] = math.exp(-((ay - i) ** 2 + (ax - j) ** 2) / (2 * sigma**2))
    w = w / (w.sum(axis=0, keepdims=True) + 1e-6)
    w = w * mask[:, None, None]
    w = w / (w.sum(axis=0, keepdims=True) + 1e-6)
    g_field = np.einsum("sij,sc->ijc", w, gamma)
    b_field = np.einsum("sij,sc->ijc", w, beta)
    h, wd = hp // MERGE, wp // MERGE
    g = ref_bilinear(g_field, h, wd).reshape(h * wd, C)
    b = ref_bilinear(b_field, h, wd).reshape(h * wd, C)
    return tokens.astype(np.float64) * (1 + g) + b


def make_tlm(seed: int = 0, hidden: int = C) -> TLM:
    torch.manual_seed(seed)
    return TLM(hidden)


def random_anchor_arrays(seed: int, n: int, n_invalid: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 64)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    p = rng.random((n, 2)).astype(np.float32)
    m = np.ones(n, dtype=bool)
    m[:n_invalid] = False
    return f, p, m


GRIDS = [(1, 36, 36), (1, 20, 28), (1, 8, 12)]


def packed_tokens(grids: list[tuple[int, int, int]], seed: int = 5) -> torch.Tensor:
    n = sum(t * (h // MERGE) * (w // MERGE) for t, h, w in grids)
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ tests
def test_batch_of_mixed_sizes_matches_reference() -> None:
    tlm = make_tlm()
    arrays = [
        random_anchor_arrays(1, 16),
        random_anchor_arrays(2, 9, n_invalid=3),
        random_anchor_arrays(3, 4),
    ]
    tokens = packed_tokens(GRIDS)
    grid_thw = torch.tensor(GRIDS)
    out = tlm.modulate(tokens, grid_thw, [Anchors.of(*a) for a in arrays], MERGE).detach()

    expected, offset = [], 0
    for (_, hp, wp), (f, p, m) in zip(GRIDS, arrays, strict=True):
        n = (hp // 2) * (wp // 2)
        expected.append(ref_modulate_image(tlm, tokens[offset : offset + n].numpy(), hp, wp, f, p, m))
        offset += n
    ref = np.concatenate(expected)
    assert out.shape == tokens.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=0)
    # the modulation is not negligible: the test would catch a missing or wrong field
    assert float((out - tokens).abs().max()) > 0.05


def test_padded_batch_forward_matches_reference() -> None:
    tlm = make_tlm(1)
    arrays = [
        random_anchor_arrays(4, 12),
        random_anchor_arrays(5, 7, n_invalid=2),
        random_anchor_arrays(6, 3),
    ]
    s = max(len(a[0]) for a in arrays)
    feats = torch.zeros(3, s, 64)
    pos = torch.full((3, s, 2), float("nan"))  # NaN positions: padding rows are absent
    mask = torch.zeros(3, s, dtype=torch.bool)
    for i, (f, p, m) in enumerate(arrays):
        feats[i, : len(f)] = torch.from_numpy(f)
        pos[i, : len(f)] = torch.from_numpy(p)
        mask[i, : len(f)] = torch.from_numpy(m)
    tokens = packed_tokens(GRIDS, seed=6)
    out = tlm(tokens, torch.tensor(GRIDS), feats, pos, mask, MERGE)
    expected, offset = [], 0
    for (_, hp, wp), (f, p, m) in zip(GRIDS, arrays, strict=True):
        n = (hp // 2) * (wp // 2)
        expected.append(ref_modulate_image(tlm, tokens[offset : offset + n].numpy(), hp, wp, f, p, m))
        offset += n
    np.testing.assert_allclose(out.detach().numpy(), np.concatenate(expected), atol=1e-5, rtol=0)


def test_gaussian_weights_formula_and_normalisation() -> None:
    pos = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.25]])
    mask = torch.tensor([True, True, False])
    w = gaussian_weights(pos, mask, hp=8, wp=12, sigma=2.0)
    assert w.shape == (3, 96)
    assert torch.all(w[2] == 0)  # masked anchor has no weight
    # anchor 0 sits on patch (0, 0), anchor 1 on patch (7, 11) (positions scale by hp-1, wp-1)
    assert float(w[0, 0]) == pytest.approx(1.0, abs=1e-5) and float(w[1, 95]) == pytest.approx(1.0, abs=1e-5)
    # each patch's valid weights sum to 1 up to the epsilons (less where only the masked anchor is near)
    assert bool((w.sum(0) <= 1.0 + 1e-6).all()) and bool((w.sum(0) > 0.999).all())
    # raster order: patch (i, j) is column i*wp + j; check one value against the closed form
    i, j = 3, 3  # near the masked anchor: it still enters the first normalisation (DESIGN 3.4 formula)
    raw = [math.exp(-((py * 7 - i) ** 2 + (px * 11 - j) ** 2) / 8.0) for py, px in pos.tolist()]
    first = [r / (sum(raw) + 1e-6) for r in raw]
    second = [f * m for f, m in zip(first, [1, 1, 0], strict=True)]
    expected = second[0] / (sum(second) + 1e-6)
    assert float(w[0, i * 12 + j]) == pytest.approx(expected, abs=1e-6)


def test_identity_when_last_layer_is_zero() -> None:
    tlm = make_tlm(2)
    with torch.no_grad():
        tlm.film_mlp[2].weight.zero_()
        tlm.film_mlp[2].bias.zero_()
    tokens = packed_tokens(GRIDS)
    anchors = [Anchors.of(*random_anchor_arrays(k, 10)) for k in range(3)]
    out = tlm.modulate(tokens, torch.tensor(GRIDS), anchors, MERGE)
    assert torch.equal(out, tokens)


def test_image_without_valid_anchor_is_unchanged_while_others_are_modulated() -> None:
    tlm = make_tlm(3)
    tokens = packed_tokens(GRIDS)
    f, p, _ = random_anchor_arrays(7, 10)
    no_valid = Anchors.of(f, p, np.zeros(10, dtype=bool))
    anchors = [Anchors.of(*random_anchor_arrays(8, 10)), no_valid, Anchors.empty()]
    out = tlm.modulate(tokens, torch.tensor(GRIDS), anchors, MERGE)
    n0 = 18 * 18
    n1 = 10 * 14
    assert not torch.allclose(out[:n0], tokens[:n0], atol=1e-3)  # image 0 modulated
    assert torch.equal(out[n0 : n0 + n1], tokens[n0 : n0 + n1])  # mask all False: identity
    assert torch.equal(out[n0 + n1 :], tokens[n0 + n1 :])  # S = 0: identity
    out_none = tlm.modulate(tokens, torch.tensor(GRIDS), [anchors[0], None, None], MERGE)
    assert torch.equal(out_none, out)


def test_non_finite_anchor_is_treated_as_invalid() -> None:
    tlm = make_tlm(4)
    f, p, m = random_anchor_arrays(9, 8)
    bad_f = f.copy()
    bad_f[2] = np.nan  # e.g. AEF nodata that slipped through
    tokens = packed_tokens([GRIDS[1]])
    grid = torch.tensor([GRIDS[1]])
    out = tlm.modulate(tokens, grid, [Anchors.of(bad_f, p, m)], MERGE)
    m2 = m.copy()
    m2[2] = False
    expected = tlm.modulate(tokens, grid, [Anchors.of(f, p, m2)], MERGE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    bad_p = p.copy()
    bad_p[0, 1] = np.inf
    assert torch.isfinite(tlm.modulate(tokens, grid, [Anchors.of(f, bad_p, m)], MERGE)).all()


def test_temporal_slices_are_modulated_identically() -> None:
    tlm = make_tlm(5)
    anchors = Anchors.of(*random_anchor_arrays(10, 6))
    one = packed_tokens([(1, 8, 12)], seed=11)
    two = torch.cat([one, one])
    out1 = tlm.modulate(one, torch.tensor([[1, 8, 12]]), [anchors], MERGE)
    out2 = tlm.modulate(two, torch.tensor([[2, 8, 12]]), [anchors], MERGE)
    torch.testing.assert_close(out2, torch.cat([out1, out1]), atol=0, rtol=0)


def test_bf16_tokens_keep_dtype_and_stay_close() -> None:
    tlm = make_tlm(6)
    anchors = [Anchors.of(*random_anchor_arrays(12, 8))]
    tokens = packed_tokens([GRIDS[2]])
    grid = torch.tensor([GRIDS[2]])
    out32 = tlm.modulate(tokens, grid, anchors, MERGE)
    out16 = tlm.modulate(tokens.to(torch.bfloat16), grid, anchors, MERGE)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, atol=0.1, rtol=0.05)


def test_mismatches_raise_clear_errors() -> None:
    tlm = make_tlm(7)
    tokens = packed_tokens(GRIDS)
    anchors = [None, None, None]
    with pytest.raises(ValueError, match="anchor sets for 3 images"):
        tlm.modulate(tokens, torch.tensor(GRIDS), anchors[:2], MERGE)
    with pytest.raises(ValueError, match="do not match grid_thw"):
        tlm.modulate(tokens[:-1], torch.tensor(GRIDS), anchors, MERGE)
    with pytest.raises(ValueError, match="multiple of the merge size"):
        tlm.modulate(
            packed_tokens([(1, 7, 12)])[:1],
            torch.tensor([[1, 7, 12]]),
            [Anchors.of(*random_anchor_arrays(1, 2))],
            MERGE,
        )
    with pytest.raises(ValueError, match=r"\(S, 64\)"):
        Anchors.of(np.zeros((3, 63)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"\(S, 2\)"):
        Anchors.of(np.zeros((3, 64)), np.zeros((2, 2)))


def test_mlp_shape_and_state_dict_keys() -> None:
    assert list(TLM(64).film_mlp.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert TLM(64).film_mlp[0].weight.shape == (256, 64)  # H = max(128, 4 * 64)
    assert TLM(16).film_mlp[0].weight.shape == (128, 64)  # H = max(128, 4 * 16)
    with torch.device("meta"):
        big = TLM(3584)
    assert big.film_mlp[2].weight.shape == (7168, 14336)  # the 7B sizes of PAPER 1.1
    assert sum(p.numel() for p in big.parameters()) == 103_699_456  # "about 103.7 M"
    assert TLM(64, TLMConfig(hidden_mult=3)).film_mlp[0].weight.shape == (192, 64)
    assert isinstance(TLM(64).film_mlp[1], torch.nn.SiLU)


def test_config_json_round_trip_and_validation() -> None:
    cfg = TLMConfig(sigma=1.5, hidden_mult=2)
    d = cfg.to_json_dict()
    assert d == {"format": TLM_FORMAT, "sigma": 1.5, "hidden_mult": 2, "image_size": 504, "vec_dim": 64}
    assert TLMConfig.from_json_dict(d) == cfg
    with pytest.raises(ValueError, match="unsupported TLM format"):
        TLMConfig.from_json_dict({**d, "format": "other"})
    with pytest.raises(ValueError, match="invalid TLM config"):
        TLMConfig.from_json_dict({**d, "sigma": 0})
