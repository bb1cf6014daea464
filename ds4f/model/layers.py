"""⑥ model building blocks: RMSNorm and interleaved RoPE (main / compress+YaRN tables); tensors in, tensors out."""

from __future__ import annotations

import math

import torch
from torch import nn

from ds4f.model.args import SWA, ModelArgs


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, computed in fp32; weight kept fp32 (HF keeps every norm fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * rms_normalize(x.float(), self.eps)).to(x.dtype)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMSNorm over the last dim, in x's dtype (callers pass fp32)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def yarn_inv_freq(dim: int, base: float, factor: float, original_max: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """YaRN-blended inverse frequencies [dim/2] (correction range truncated to integers, mscale not applied)."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrap, interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def corr_dim(rot: float) -> float:
        return dim * math.log(original_max / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    return interp * (1 - keep) + extrap * keep


class Rope(nn.Module):
    """Interleaved (GPT-J) rotation of the LAST `rope_dim` channels; cos/sin computed in fp32 per call from inv_freq.

    inv_freq is a plain CPU tensor, not a buffer: it is derived from the config, so a model built on the meta device
    (and materialized by a loader) still has it; it follows the positions' device on use.
    """

    def __init__(self, rope_dim: int, inv_freq: torch.Tensor):
        super().__init__()
        self.rope_dim = rope_dim
        self.inv_freq = inv_freq.to("cpu", torch.float32)
        self._on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def for_layer(cls, args: ModelArgs, layer: int) -> Rope:
        """SWA layers (and MTP): theta rope_theta, plain. CSA/HCA: compress_rope_theta with YaRN when configured."""
        d = args.qk_rope_head_dim
        if args.layer_type(layer) == SWA:
            return cls(d, 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)))
        return cls.compress(args)

    @classmethod
    def compress(cls, args: ModelArgs) -> Rope:
        d, base, y = args.qk_rope_head_dim, args.compress_rope_theta, args.yarn
        if y is None:
            return cls(d, 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d)))
        return cls(d, yarn_inv_freq(d, base, y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] int -> cos, sin [N, rope_dim/2] fp32."""
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[:, None] * inv[None, :]
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, cs: tuple[torch.Tensor, torch.Tensor], inverse: bool = False) -> torch.Tensor:
        """x [N, ..., dim]; cs from cos_sin over the N positions. Returns x's dtype; math in fp32."""
        cos, sin = cs
        if inverse:
            sin = -sin
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape), sin.view(shape)
        nope, rope = x[..., : -self.rope_dim], x[..., -self.rope_dim:].float()
        even, odd = rope[..., 0::2], rope[..., 1::2]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
