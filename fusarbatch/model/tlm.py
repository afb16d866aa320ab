"""TLM: Token-wise Linear Modulation of Qwen2.5-VL's visual tokens by AlphaEarth anchors.

Paper: FUSAR-GPT (arXiv 2602.19190), Sec. 3.2: a FiLM on the visual tokens, ``x' = x * (1 + gamma) + beta``,
with per-token ``(gamma, beta)`` obtained by spreading per-anchor modulations over the image with Gaussian
weights. The arithmetic follows the official reference ``tlm.py`` (commit 2079a37, "original training
calculation"), which is what the released weights were trained with (DESIGN 3.4):

1. per anchor ``s``: ``(gamma_s, beta_s) = chunk(film_mlp(a_s), 2)``; ``film_mlp = Linear(64, H) -> SiLU ->
   Linear(H, 2C)``, ``H = max(128, hidden_mult * C)``, ``C`` = LLM hidden size;
2. on the PRE-merge patch grid ``(hp, wp) = grid_thw[1:]``, anchor ``(y, x) in [0, 1]`` sits at patch
   coordinates ``(y * (hp - 1), x * (wp - 1))``; for patch ``(i, j)``: ``w_sp = exp(-d^2 / (2 sigma^2))``,
   ``sigma`` in patches (2 by default);
3. ``w /= sum_s w + 1e-6`` (over ALL anchors of the image), ``w *= mask``, ``w /= sum_s w + 1e-6`` again;
4. fields ``G = W^T gamma``, ``B = W^T beta`` on ``(hp, wp)``, bilinearly resized (``align_corners=False``)
   to the merged grid ``(hp / m, wp / m)``, ``m`` = spatial merge size;
5. tokens (raster order over the merged grid) ``x * (1 + G) + B``.

Differences from the official code (same numbers where both are defined):

- batches of any size; images of any size and aspect ratio (the official code takes batch 1 and derives the
  merged grid from ``sqrt(token count)``, i.e. square images only; here it comes from ``grid_thw``);
- an image with no valid anchor (mask all False, or ``S = 0``) is left exactly unchanged (the official code
  raises); an anchor with a non-finite feature or position is treated as invalid (weight 0 in both
  normalisations) instead of turning the image into NaN;
- ``t > 1`` (several temporal slices): every slice is modulated with the same field (tokens are packed
  slice-major, raster order within a slice); the official code rejects ``t != 1``;
- with bf16/fp16 tokens the MLP runs under autocast in that dtype, as in the official bf16 training, but the
  Gaussian fields and the modulation are computed in float32 and cast back once (slightly more exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EPS",
    "TLM",
    "TLM_FORMAT",
    "VEC_DIM",
    "Anchors",
    "TLMConfig",
    "gaussian_weights",
    "modulation_fields",
]

TLM_FORMAT = "tlm_original_train_patch_resize_v1"
"""``format`` value of ``tlm_config.json`` (official release)."""
VEC_DIM = 64
"""AlphaEarth embedding width (bands A00..A63)."""
EPS = 1e-6
"""Epsilon of both weight normalisations (official)."""


@dataclass(frozen=True)
class TLMConfig:
    """The TLM hyper-parameters, as stored in ``tlm_config.json``.

    :ivar sigma: Gaussian width in pre-merge patches (released checkpoints: 2.0).
    :ivar hidden_mult: MLP hidden width is ``max(128, hidden_mult * C)``.
    :ivar image_size: square input side in pixels the model was trained at (504).
    :ivar vec_dim: anchor feature width (64).
    """

    sigma: float = 2.0
    hidden_mult: int = 4
    image_size: int = 504
    vec_dim: int = VEC_DIM

    def to_json_dict(self) -> dict[str, Any]:
        """The ``tlm_config.json`` content (official keys)."""
        return {
            "format": TLM_FORMAT,
            "sigma": float(self.sigma),
            "hidden_mult": int(self.hidden_mult),
            "image_size": int(self.image_size),
            "vec_dim": int(self.vec_dim),
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> TLMConfig:
        """Read ``tlm_config.json`` content. Raises ValueError on an unknown format or a bad value."""
        if data.get("format") != TLM_FORMAT:
            raise ValueError(f"unsupported TLM format {data.get('format')!r} (expected {TLM_FORMAT!r})")
        try:
            cfg = cls(
                sigma=float(data.get("sigma", 2.0)),
                hidden_mult=int(data.get("hidden_mult", 4)),
                image_size=int(data.get("image_size", 504)),
                vec_dim=int(data.get("vec_dim", VEC_DIM)),
            )
        except OverflowError as exc:  # int(inf)
            raise ValueError(f"invalid TLM config {data}: {exc}") from None
        sane = (
            math.isfinite(cfg.sigma)
            and 0 < cfg.sigma <= 1e4
            and 1 <= cfg.hidden_mult <= 64
            and 28 <= cfg.image_size <= 8192
            and cfg.vec_dim == VEC_DIM
        )
        if not sane:
            raise ValueError(
                f"invalid TLM config {data}: sigma finite in (0, 1e4], hidden_mult 1..64, image_size "
                "28..8192, vec_dim 64"
            )
        return cfg


@dataclass(frozen=True, eq=False)
class Anchors:
    """The AlphaEarth anchors of one image (DESIGN 3.3).

    :ivar features: ``(S, 64)`` float32 AEF vectors (de-quantised, unit length where valid).
    :ivar positions: ``(S, 2)`` float32 ``(y, x)`` within the image: position ``p`` sits at pre-merge patch
        coordinate ``p * (n - 1)``, so 0 is the centre of the first patch row/column and 1 the centre of the
        last. The official training data min-max normalised the anchor grid's pixel positions, so its anchor
        grid spans exactly [0, 1] (e.g. ``linspace(0, 1, N)`` per axis); produce positions the same way.
        Values outside [0, 1] are allowed (the anchor lies outside the image).
    :ivar mask: ``(S,)`` bool, True where the anchor has data. Non-finite features or positions are
        masked out by :meth:`of`.
    """

    features: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(
        cls,
        features: np.ndarray | torch.Tensor,
        positions: np.ndarray | torch.Tensor,
        mask: np.ndarray | torch.Tensor | None = None,
    ) -> Anchors:
        """Validate and convert arrays (numpy or torch, any float dtype, e.g. the float16 of the Zarr store).

        :param features: ``(S, 64)``.
        :param positions: ``(S, 2)`` ``(y, x)``.
        :param mask: ``(S,)`` bool; default all True.
        :raises ValueError: on wrong shapes.
        """
        f = _as_rows(features, VEC_DIM)
        p = _as_rows(positions, 2)
        if f.ndim != 2 or f.shape[1] != VEC_DIM:
            raise ValueError(f"anchor features must be (S, {VEC_DIM}), got {tuple(f.shape)}")
        if p.shape != (f.shape[0], 2):
            raise ValueError(f"anchor positions must be (S, 2) with S = {f.shape[0]}, got {tuple(p.shape)}")
        if mask is None:
            m = torch.ones(f.shape[0], dtype=torch.bool, device=f.device)
        else:
            m = torch.as_tensor(mask if isinstance(mask, torch.Tensor) else np.asarray(mask)).detach()
            if m.shape != (f.shape[0],):
                raise ValueError(f"anchor mask must be (S,) with S = {f.shape[0]}, got {tuple(m.shape)}")
            m = m.to(device=f.device, dtype=torch.bool)
        p = p.to(f.device)
        m = m & torch.isfinite(f).all(-1) & torch.isfinite(p).all(-1)
        f = torch.where(m[:, None], f, torch.zeros_like(f))
        return cls(features=f.contiguous(), positions=p.contiguous(), mask=m.contiguous())

    @classmethod
    def empty(cls) -> Anchors:
        """No anchors (``S = 0``): the image is left unmodulated."""
        return cls.of(torch.zeros(0, VEC_DIM), torch.zeros(0, 2))

    @property
    def n_valid(self) -> int:
        """Number of anchors with data."""
        return int(self.mask.sum())


def _as_rows(a: np.ndarray | torch.Tensor, width: int) -> torch.Tensor:
    """A float32 tensor (detached; torch inputs keep their device); an empty input becomes ``(0, width)``."""
    t = a.detach() if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a, dtype=np.float32))
    t = t.to(torch.float32)
    return t.reshape(0, width) if t.numel() == 0 else t


def gaussian_weights(
    positions: torch.Tensor, mask: torch.Tensor, hp: int, wp: int, sigma: float = 2.0
) -> torch.Tensor:
    """Normalised Gaussian weights of each anchor on each pre-merge patch (steps 2-3 of the module doc).

    :param positions: ``(S, 2)`` ``(y, x)`` in [0, 1]; non-finite rows get weight 0.
    :param mask: ``(S,)`` bool.
    :param hp: pre-merge patch rows (``grid_thw[1]``).
    :param wp: pre-merge patch columns (``grid_thw[2]``).
    :param sigma: Gaussian width in patches.
    :returns: ``W`` of shape ``(S, hp * wp)`` float32, patches in raster order; for each patch the column
        sums to ~1 where valid anchors are near and to 0 when no anchor is valid.
    """
    device = positions.device
    p = positions.to(torch.float32)
    finite = torch.isfinite(p).all(-1)
    p = torch.where(finite[:, None], p, torch.zeros_like(p))
    yy = torch.arange(hp, device=device, dtype=torch.float32).repeat_interleave(wp)  # raster order
    xx = torch.arange(wp, device=device, dtype=torch.float32).repeat(hp)
    d2 = (p[:, 0:1] * (hp - 1) - yy[None]).square() + (p[:, 1:2] * (wp - 1) - xx[None]).square()
    w = torch.exp(-d2 / (2.0 * float(sigma) ** 2)) * finite[:, None].to(torch.float32)
    w = w / (w.sum(dim=0, keepdim=True) + EPS)
    w = w * (mask.to(device) & finite)[:, None].to(torch.float32)
    return w / (w.sum(dim=0, keepdim=True) + EPS)


def modulation_fields(
    gamma: torch.Tensor,
    beta: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    hp: int,
    wp: int,
    merge_size: int,
    sigma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(gamma, beta)`` fields of one image on the merged grid (steps 2-4 of the module doc).

    :param gamma: ``(S, C)`` per-anchor scale (any float dtype; computed in float32).
    :param beta: ``(S, C)`` per-anchor shift.
    :param positions: ``(S, 2)`` ``(y, x)`` in [0, 1].
    :param mask: ``(S,)`` bool.
    :param hp: pre-merge patch rows.
    :param wp: pre-merge patch columns.
    :param merge_size: spatial merge size ``m`` (2 for Qwen2.5-VL); ``hp`` and ``wp`` must be multiples of it.
    :param sigma: Gaussian width in pre-merge patches.
    :returns: ``(G, B)``, each ``(hp // m * wp // m, C)`` float32 in raster order over the merged grid.
    :raises ValueError: if ``hp`` or ``wp`` is not a multiple of ``merge_size``.
    """
    if hp % merge_size or wp % merge_size:
        raise ValueError(f"patch grid {hp}x{wp} is not a multiple of the merge size {merge_size}")
    h, w = hp // merge_size, wp // merge_size
    weights = gaussian_weights(positions, mask, hp, wp, sigma)  # (S, hp*wp)
    c = gamma.shape[-1]
    both = torch.cat([gamma, beta], dim=-1).to(torch.float32)  # (S, 2C)
    field = weights.T @ both  # (hp*wp, 2C)
    field = field.T.reshape(1, 2 * c, hp, wp)
    field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    field = field.reshape(2 * c, h * w).T  # (h*w, 2C), raster order
    return field[:, :c], field[:, c:]


class TLM(nn.Module):
    """Token-wise Linear Modulation (paper Sec. 3.2; module docstring for the formula and the differences).

    ``film_mlp`` is ``nn.Sequential(Linear(64, H), SiLU(), Linear(H, 2C))`` so its state dict has the
    official keys ``0.weight, 0.bias, 2.weight, 2.bias``; default PyTorch init (not zero-init), as the
    official code.

    :param hidden_size: ``C``, the LLM hidden size (= the vision merger's ``out_hidden_size``).
    :param config: sigma, hidden_mult, image_size (:class:`TLMConfig`).
    """

    def __init__(self, hidden_size: int, config: TLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or TLMConfig()
        self.hidden_size = int(hidden_size)
        hidden = max(128, self.config.hidden_mult * self.hidden_size)
        self.film_mlp = nn.Sequential(
            nn.Linear(self.config.vec_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * self.hidden_size)
        )

    @property
    def sigma(self) -> float:
        """Gaussian width in pre-merge patches."""
        return self.config.sigma

    def anchor_modulations(
        self, features: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-anchor ``(gamma, beta)``, each ``(S, C)``, from ``features`` ``(S, 64)``.

        Runs on ``like``'s device; when ``like`` is bf16/fp16 the MLP runs under autocast in that dtype (the
        official bf16 training computation), else in the MLP's own dtype.
        """
        weight = self.film_mlp[0].weight
        v = features.to(device=like.device, dtype=weight.dtype)
        mixed = like.dtype in (torch.bfloat16, torch.float16)
        with torch.autocast(device_type=like.device.type, dtype=like.dtype, enabled=mixed):
            gamma, beta = self.film_mlp(v).chunk(2, dim=-1)
        return gamma, beta

    def image_fields(
        self, anchors: Anchors, hp: int, wp: int, merge_size: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float32 ``(G, B)`` fields ``(hp//m * wp//m, C)`` of one image; None without a valid anchor."""
        if anchors.features.shape[0] == 0 or not bool(anchors.mask.any()):
            return None
        gamma, beta = self.anchor_modulations(anchors.features, like)
        return modulation_fields(
            gamma,
            beta,
            anchors.positions.to(like.device),
            anchors.mask.to(like.device),
            hp,
            wp,
            merge_size,
            self.sigma,
        )

    def modulate(
        self,
        tokens: torch.Tensor,
        grid_thw: torch.Tensor,
        anchors: Sequence[Anchors | None],
        merge_size: int,
    ) -> torch.Tensor:
        """Modulate packed visual tokens image by image.

        :param tokens: ``(N, C)`` packed merger output (``visual(...).pooler_output``): images in order, each
            ``t * (hp/m) * (wp/m)`` tokens, slice-major then raster order; any float dtype.
        :param grid_thw: ``(B, 3)`` integer ``(t, hp, wp)`` per image (pre-merge patches).
        :param anchors: one :class:`Anchors` (or None: unmodulated) per image.
        :param merge_size: spatial merge size ``m``.
        :returns: ``(N, C)`` tensor, same dtype and device as ``tokens``; images without a valid anchor are
            the input values unchanged.
        :raises ValueError: on a count mismatch between ``tokens``, ``grid_thw`` and ``anchors``, or a grid
            that is not a multiple of ``merge_size``.
        """
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        if len(anchors) != len(grids):
            raise ValueError(f"TLM: {len(anchors)} anchor sets for {len(grids)} images")
        for _, hp, wp in grids:
            if hp % merge_size or wp % merge_size:
                raise ValueError(f"patch grid {hp}x{wp} is not a multiple of the merge size {merge_size}")
        counts = [t * (hp // merge_size) * (wp // merge_size) for t, hp, wp in grids]
        if tokens.ndim != 2 or sum(counts) != tokens.shape[0] or tokens.shape[1] != self.hidden_size:
            raise ValueError(
                f"TLM: tokens {tuple(tokens.shape)} do not match grid_thw {grids} "
                f"(expected ({sum(counts)}, {self.hidden_size}))"
            )
        out = []
        offset = 0
        for (t, hp, wp), n, anchor in zip(grids, counts, anchors, strict=True):
            chunk = tokens[offset : offset + n]
            offset += n
            fields = None if anchor is None else self.image_fields(anchor, hp, wp, merge_size, tokens)
            if fields is None:
                out.append(chunk)
                continue
            g, b = fields
            if t > 1:
                g, b = g.repeat(t, 1), b.repeat(t, 1)
            out.append((chunk.to(torch.float32) * (1.0 + g) + b).to(tokens.dtype))
        return torch.cat(out, dim=0) if out else tokens

    def forward(
        self,
        tokens: torch.Tensor,
        grid_thw: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        merge_size: int,
    ) -> torch.Tensor:
        """Modulate a batch given padded anchor tensors.

        :param tokens: ``(N, C)`` packed visual tokens (see :meth:`modulate`).
        :param grid_thw: ``(B, 3)``.
        :param features: ``(B, S, 64)``.
        :param positions: ``(B, S, 2)`` ``(y, x)`` in [0, 1].
        :param mask: ``(B, S)`` bool. A masked anchor with a finite position still enters the first
            normalisation (the DESIGN 3.4 formula), which lowers the field near it; give padding rows NaN
            positions so that they are absent altogether (or use :meth:`modulate` with per-image
            :class:`Anchors`).
        :param merge_size: spatial merge size.
        :returns: ``(N, C)`` modulated tokens.
        """
        if features.shape[0] != grid_thw.shape[0]:
            raise ValueError(f"TLM: {features.shape[0]} anchor sets for {grid_thw.shape[0]} images")
        anchors = [Anchors.of(features[i], positions[i], mask[i]) for i in range(features.shape[0])]
        return self.modulate(tokens, grid_thw, anchors, merge_size)
