"""⑤ runner GPU fast path, mHC: 4-stream residual [T, hc, D] in, collapsed input + post / comb mixes out (batched)."""

from __future__ import annotations

import torch

from ds4f.kernels.sparse_attn import use_triton
from ds4f.model.mhc import hc_weights
from ds4f.runner.gpu.glue import hc_collapse, hc_mix_in

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None

if triton is not None:

    @triton.jit
    def _hc_sinkhorn(mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, iters, eps,
                     HC: tl.constexpr, BLOCK_T: tl.constexpr):
        # one program = BLOCK_T tokens; mix [T, (2+HC)*HC] -> pre [T, HC], post [T, HC], comb [T, HC, HC]
        NM: tl.constexpr = (2 + HC) * HC
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = offs_t < T
        j = tl.arange(0, HC)
        s0 = tl.load(scale_ptr)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        row = offs_t.to(tl.int64)[:, None] * NM
        pw = tl.load(mix_ptr + row + j[None, :], mask=tm[:, None], other=0.0)
        pre = tl.sigmoid(pw * s0 + tl.load(base_ptr + j)[None, :]) + eps
        qw = tl.load(mix_ptr + row + HC + j[None, :], mask=tm[:, None], other=0.0)
        post = 2.0 * tl.sigmoid(qw * s1 + tl.load(base_ptr + HC + j)[None, :])
        rc = j[:, None] * HC + j[None, :]  # [HC, HC] row-major
        cw = tl.load(mix_ptr + row[:, :, None] + 2 * HC + rc[None, :, :], mask=tm[:, None, None], other=0.0)
        c = cw * s2 + tl.load(base_ptr + 2 * HC + rc)[None, :, :]
        c = tl.exp(c - tl.max(c, 2)[:, :, None])
        c = c / tl.sum(c, 2)[:, :, None] + eps
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
        for _ in range(iters - 1):
            c = c / (tl.sum(c, 2)[:, :, None] + eps)
            c = c / (tl.sum(c, 1)[:, None, :] + eps)
        o = offs_t.to(tl.int64)[:, None] * HC + j[None, :]
        tl.store(pre_ptr + o, pre, mask=tm[:, None])
        tl.store(post_ptr + o, post, mask=tm[:, None])
        oc = offs_t.to(tl.int64)[:, None, None] * (HC * HC) + rc[None, :, :]
        tl.store(comb_ptr + oc, c, mask=tm[:, None, None])


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
           eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hc, D] -> collapsed [T, D] (x's dtype), post [T, hc] fp32, comb [T, hc, hc] fp32; = model.mhc.hc_mix.

    The split / sigmoid / softmax / Sinkhorn part runs as one Triton kernel (2*iters tiny torch ops otherwise)."""
    t = x.shape[0]
    mix = hc_mix_in(x, fn, norm_eps)
    if use_triton(x) and hc & (hc - 1) == 0 and t > 0:
        pre = torch.empty(t, hc, dtype=torch.float32, device=x.device)
        post = torch.empty_like(pre)
        comb = torch.empty(t, hc, hc, dtype=torch.float32, device=x.device)
        bt = 8  # one warp: the 2*iters dependent row / column sums stay inside a warp (no shared-memory round trips)
        _hc_sinkhorn[(triton.cdiv(t, bt),)](mix, scale, base, pre, post, comb, t, iters, eps, HC=hc, BLOCK_T=bt,
                                            num_warps=1)
    else:
        pre, post, comb = hc_weights(mix, scale, base, hc, iters, eps)
    return hc_collapse(pre, x), post, comb
