"""⑥ kernels, KV row quantization: rows [N, D] in, fp8 e4m3 rows + power-of-two group scales out (and back)."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(x: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (q [N, D] e4m3, scale [N, D // group] fp32) with x ≈ q * scale per group of `group` columns.

    scale = 2^ceil(log2(amax / 448)), amax floored at 1e-4 (vLLM fp8_ds_mla's rule); values are rounded to bf16
    first, so a power-of-two scale makes dequantization to bf16 exact."""
    n, d = x.shape
    assert d % group == 0, f"D={d} must be a multiple of group={group}"
    xg = x.to(torch.bfloat16).float().view(n, d // group, group)
    amax = xg.abs().amax(dim=-1).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (xg / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n, d)
    return q, scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q [N, D] e4m3, scale [N, D // G]) -> [N, D] in `dtype`."""
    n, d = q.shape
    return (q.float().view(n, scale.shape[1], -1) * scale[:, :, None]).view(n, d).to(dtype)
