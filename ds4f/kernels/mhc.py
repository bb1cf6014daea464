"""⑥ kernels, mHC step: a sublayer's output y [T, D] + the streams x [T, hc, D] before it in, the new streams and the
next sublayer's normed input out.

`hc_step(y, x, post, comb, fn, scale, base, norm_w, ...)` = model.mhc.hc_post (X'_k = post_k * y + sum_j comb[j,k]
X_j; skipped when y is None: X' = x), then model.mhc.hc_mix of X' with the next sublayer's (fn, scale, base) and its
RMSNorm (norm_w) -> (X' [T, hc, D], xn [T, D], post' [T, hc] fp32, comb' [T, hc, hc] fp32); fn None: (X', None, None,
None). Two Triton kernels on CUDA: (1) per (token block, D chunk): X' chunk, its bf16-rounded squares and its dots
with fn's columns as fp32 partials (the [24, hc*D] fn read by many programs, not one row per SM); (2) per token:
partials -> mix -> sigmoid / Sinkhorn -> pre / post / comb, then the collapse sum_j pre_j X'_j and the RMSNorm.
mix = (X' . fn) * rsqrt(mean X'^2 + eps) equals linear(rms_normalize(X'), fn) within fp32 rounding.
Fewer than DECODE_MAX_T tokens with hc = 4 (decode): one launch instead, ds4f/kernels/mhc_decode.py.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4f.kernels.mhc_decode import ENABLED as _DECODE_ON
from ds4f.kernels.mhc_decode import MAX_T as _DECODE_T
from ds4f.kernels.mhc_decode import hc_step_decode
from ds4f.kernels.sparse_attn import _INTERPRET, use_triton
from ds4f.model.layers import rms_normalize
from ds4f.model.mhc import hc_mix, hc_post

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.mhc_decode import _post_mix  # the post-mix tile both decode kernels share
except ImportError:  # CPU-only installs: the torch reference below
    triton = None


def hc_step_ref(y: torch.Tensor | None, x: torch.Tensor, post: torch.Tensor | None, comb: torch.Tensor | None,
                fn: torch.Tensor | None, scale: torch.Tensor | None, base: torch.Tensor | None,
                norm_w: torch.Tensor | None, iters: int, eps: float, norm_eps: float, rms_eps: float
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The model's functions, composed (see the module docstring)."""
    if y is not None:
        x = hc_post(y, x, post, comb)
    if fn is None:
        return x, None, None, None
    c, p, cb = hc_mix(x, fn, scale, base, x.shape[1], iters, eps, norm_eps)
    return x, (norm_w * rms_normalize(c.float(), rms_eps)).to(c.dtype), p, cb


if triton is not None:

    @triton.jit
    def _hc_post_mix(y_ptr, x_ptr, post_ptr, comb_ptr, fn_ptr, xo_ptr, pd_ptr, ps_ptr, T, D, NSPLIT,
                     HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_Y: tl.constexpr, HAS_FN: tl.constexpr, SPLIT: tl.constexpr):
        # program = (BLOCK_T >= 16 tokens, BLOCK_D channels of every stream), dots through tl.dot;
        # x / xo [T, HC, D], fn [NM, HC*D] fp32; partials pd [T, NSPLIT, NM] (dots with fn), ps [T, NSPLIT] (sum of
        # squares)
        sp = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = sp * BLOCK_D + tl.arange(0, BLOCK_D)
        tm = t < T
        dm = d < D
        m2 = tm[:, None] & dm[None, :]
        t64 = t.to(tl.int64)
        xrow = t64[:, None] * (HC * D) + d[None, :]  # [BT, BD] of stream 0
        if HAS_Y:
            yv = tl.load(y_ptr + t64[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        r = tl.arange(0, NMP)
        rm = r < NM
        acc = tl.zeros([BLOCK_T, NMP], tl.float32)
        sq = tl.zeros([BLOCK_T], tl.float32)
        for k in tl.static_range(HC):
            if HAS_Y:  # 2-D tiles only (a [BT, HC, BD] fp32 tile spills); the HC stream tiles re-read from L1
                mixed = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
                for jj in tl.static_range(HC):
                    cj = tl.load(comb_ptr + t64 * (HC * HC) + jj * HC + k, mask=tm, other=0.0)
                    xj = tl.load(x_ptr + xrow + jj * D, mask=m2, other=0.0).to(tl.float32)
                    mixed += cj[:, None] * xj
                pk = tl.load(post_ptr + t64 * HC + k, mask=tm, other=0.0)
                xk = (pk[:, None] * yv + mixed).to(xo_ptr.dtype.element_ty)
                tl.store(xo_ptr + t64[:, None] * (HC * D) + k * D + d[None, :], xk, mask=m2)
            else:
                xk = tl.load(x_ptr + t64[:, None] * (HC * D) + k * D + d[None, :], mask=m2, other=0.0)
            if HAS_FN:
                xf = xk.to(tl.float32)
                sq += tl.sum(xf * xf, 1)
                f = tl.load(fn_ptr + r[:, None] * (HC * D) + k * D + d[None, :], mask=rm[:, None] & dm[None, :],
                            other=0.0)  # [NMP, BD]
                if SPLIT:  # bf16 X' is exact in bf16; fn = hi + mid + lo in bf16: 3 tensor-core dots
                    fh = f.to(tl.bfloat16)
                    f1 = f - fh.to(tl.float32)
                    fm = f1.to(tl.bfloat16)
                    fl = (f1 - fm.to(tl.float32)).to(tl.bfloat16)
                    xb = xk.to(tl.bfloat16)
                    acc = tl.dot(xb, tl.trans(fl), acc)
                    acc = tl.dot(xb, tl.trans(fm), acc)
                    acc = tl.dot(xb, tl.trans(fh), acc)
                else:
                    acc += tl.dot(xf, tl.trans(f), input_precision="ieee")
        if HAS_FN:
            tl.store(pd_ptr + (t64[:, None] * NSPLIT + sp) * NM + r[None, :], acc, mask=tm[:, None] & rm[None, :])
            tl.store(ps_ptr + t64 * NSPLIT + sp, sq, mask=tm)

    @triton.jit
    def _weights(pd_ptr, ps_ptr, scale_ptr, base_ptr, t, D, NSPLIT, NPD, eps, norm_eps, ITERS: tl.constexpr,
                 HC: tl.constexpr, NM: tl.constexpr, BLOCK_S: tl.constexpr):
        # token t's partials (pd [T, NPD, NM] dots, ps [T, NSPLIT] squares) -> mix -> pre [HC], post [HC],
        # comb [HC, HC] (= model.mhc.hc_weights)
        s = tl.arange(0, BLOCK_S)
        sm = s < NSPLIT
        pm = s < NPD
        j = tl.arange(0, HC)
        rc = j[:, None] * HC + j[None, :]  # [HC, HC] row-major (row j, column k)
        pbase = pd_ptr + (t * NPD + s) * NM  # [BLOCK_S] split rows
        rr = tl.rsqrt(tl.sum(tl.load(ps_ptr + t * NSPLIT + s, mask=sm, other=0.0), 0) / (HC * D) + norm_eps)
        pw = tl.sum(tl.load(pbase[:, None] + j[None, :], mask=pm[:, None], other=0.0), 0) * rr
        qw = tl.sum(tl.load(pbase[:, None] + HC + j[None, :], mask=pm[:, None], other=0.0), 0) * rr
        cw = tl.sum(tl.load(pbase[:, None, None] + 2 * HC + rc[None, :, :], mask=pm[:, None, None], other=0.0), 0) * rr
        s0 = tl.load(scale_ptr)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        pre = tl.sigmoid(pw * s0 + tl.load(base_ptr + j)) + eps
        post = 2.0 * tl.sigmoid(qw * s1 + tl.load(base_ptr + HC + j))
        c = cw * s2 + tl.load(base_ptr + 2 * HC + rc)
        c = tl.exp(c - tl.max(c, 1)[:, None])
        c = c / tl.sum(c, 1)[:, None] + eps
        c = c / (tl.sum(c, 0)[None, :] + eps)
        for _ in tl.static_range(ITERS - 1):
            c = c / (tl.sum(c, 1)[:, None] + eps)
            c = c / (tl.sum(c, 0)[None, :] + eps)
        return pre, post, c

    @triton.jit
    def _hc_finalize(x_ptr, pd_ptr, ps_ptr, scale_ptr, base_ptr, w_ptr, xn_ptr, post_ptr, comb_ptr, D, NSPLIT,
                     NPD, eps, norm_eps, rms_eps, ITERS: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # program = one token: partials -> mix -> pre / post / comb (= model.mhc.hc_weights) -> collapse + RMSNorm
        t = tl.program_id(0).to(tl.int64)
        pre, post, c = _weights(pd_ptr, ps_ptr, scale_ptr, base_ptr, t, D, NSPLIT, NPD, eps, norm_eps, ITERS, HC,
                                NM, BLOCK_S)
        j = tl.arange(0, HC)
        rc = j[:, None] * HC + j[None, :]
        tl.store(post_ptr + t * HC + j, post)
        tl.store(comb_ptr + t * (HC * HC) + rc, c)
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        xs = tl.load(x_ptr + t * (HC * D) + j[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)
        col = tl.sum(pre[:, None] * xs.to(tl.float32), 0).to(xn_ptr.dtype.element_ty).to(tl.float32)
        r2 = tl.rsqrt(tl.sum(col * col, 0) / D + rms_eps)
        w = tl.load(w_ptr + d, mask=dm, other=0.0)
        tl.store(xn_ptr + t * D + d, (w * (col * r2)).to(xn_ptr.dtype.element_ty), mask=dm)


    @triton.jit
    def _hc_post_mix_row(y_ptr, x_ptr, post_ptr, comb_ptr, fn_ptr, xo_ptr, pd_ptr, ps_ptr, D, NSPLIT,
                         HC: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_Y: tl.constexpr, HAS_FN: tl.constexpr, DOTS: tl.constexpr):
        # program = (token, BLOCK_D channels of every stream), all HC streams as one tile: few tokens (decode), or
        # many with DOTS=False (squares only; the mix is then one fp32 GEMM over X', see _hc_step_gemm)
        t = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        d = sp * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        j = tl.arange(0, HC)
        xk = _post_mix(y_ptr, x_ptr, post_ptr, comb_ptr, xo_ptr, t, d, dm, D, HC, HAS_Y)
        if HAS_FN:
            xf = xk.to(tl.float32)
            if DOTS:
                r = tl.arange(0, NMP)
                rm = r < NM
                f = tl.load(fn_ptr + r[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :],
                            mask=rm[:, None, None] & dm[None, None, :], other=0.0)  # [NMP, HC, BD]
                acc = tl.sum(tl.sum(f * xf[None, :, :], 2), 1)
                tl.store(pd_ptr + (t * NSPLIT + sp) * NM + r, acc, mask=rm)
            tl.store(ps_ptr + t * NSPLIT + sp, tl.sum(tl.sum(xf * xf, 1), 0))

    @triton.jit
    def _hc_weights_collapse(x_ptr, pd_ptr, ps_ptr, scale_ptr, base_ptr, c_ptr, cs_ptr, post_ptr, comb_ptr, D,
                             NSPLIT, NSB, eps, norm_eps, ITERS: tl.constexpr, HC: tl.constexpr, NM: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # program = (token, BLOCK_D chunk), one warp: the Sinkhorn's dependent row / column sums stay in the warp
        # (every chunk redoes the few-flop weights); collapse of the chunk, rounded, + its sum of squares
        t = tl.program_id(0).to(tl.int64)
        cb = tl.program_id(1)
        pre, post, c = _weights(pd_ptr, ps_ptr, scale_ptr, base_ptr, t, D, NSPLIT, NSPLIT, eps, norm_eps, ITERS, HC,
                                NM, BLOCK_S)
        j = tl.arange(0, HC)
        if cb == 0:
            tl.store(post_ptr + t * HC + j, post)
            tl.store(comb_ptr + t * (HC * HC) + j[:, None] * HC + j[None, :], c)
        d = cb * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        xs = tl.load(x_ptr + t * (HC * D) + j[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)
        col = tl.sum(pre[:, None] * xs.to(tl.float32), 0).to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + t * D + d, col, mask=dm)
        cf = col.to(tl.float32)
        tl.store(cs_ptr + t * NSB + cb, tl.sum(cf * cf, 0))

    @triton.jit
    def _hc_rms(c_ptr, cs_ptr, w_ptr, D, NSB, rms_eps, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # in place: collapsed rows c [T, D] -> w * c * rsqrt(mean c^2 + eps)
        t = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        r2 = tl.rsqrt(tl.sum(tl.load(cs_ptr + t * NSB + s, mask=s < NSB, other=0.0), 0) / D + rms_eps)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        c = tl.load(c_ptr + t * D + d, mask=dm, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d, mask=dm, other=0.0)
        tl.store(c_ptr + t * D + d, (w * (c * r2)).to(c_ptr.dtype.element_ty), mask=dm)


# From this many tokens on, the mix runs as one fp32 cuBLAS GEMM over X' instead of inside the post kernel (prefill:
# the in-kernel split dots measured 5.5 ms per call at 8192 tokens; the GEMM path is memory bound)
GEMM_MIX_MIN_T = 256
# Below this many tokens (at most mhc_decode.MAX_T) with hc = 4: the one-launch decode kernel (0: the kernels below;
# DS4F_HC_DECODE=0,0 sets 0). H200, graph of 16 chained calls: T = 1 11.0 vs 11.7 us, T = 4 11.6 vs 12.3, T = 15
# 22.7 vs 17.2 (the finishing programs serialize per token), so up to 4 tokens only
DECODE_MAX_T = min(_DECODE_T, 5) if _DECODE_ON else 0


def _hc_step_gemm(y: torch.Tensor | None, x: torch.Tensor, post: torch.Tensor | None, comb: torch.Tensor | None,
                  fn: torch.Tensor | None, scale: torch.Tensor | None, base: torch.Tensor | None,
                  norm_w: torch.Tensor | None, iters: int, eps: float, norm_eps: float, rms_eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """hc_step for many tokens (inputs already contiguous / fp32 where the caller made them so)."""
    t, hc, dim = x.shape
    nm = (2 + hc) * hc
    f32 = torch.float32
    bd = min(512, triton.next_power_of_2(dim))
    nsplit = triton.cdiv(dim, bd)
    xo = torch.empty_like(x) if y is not None else x
    ps = torch.empty(t, nsplit, dtype=f32, device=x.device)
    _hc_post_mix_row[(t, nsplit)](y if y is not None else x, x, post if post is not None else ps,
                                  comb if comb is not None else ps, ps, xo, ps, ps, dim, nsplit, HC=hc, NM=nm,
                                  NMP=max(16, triton.next_power_of_2(nm)), BLOCK_D=bd, HAS_Y=y is not None,
                                  HAS_FN=fn is not None, DOTS=False, num_warps=4)
    if fn is None:
        return xo, None, None, None
    pd = torch.nn.functional.linear(xo.view(t, hc * dim).float(), fn)  # [T, NM]: one split of the dots
    xn = torch.empty(t, dim, dtype=x.dtype, device=x.device)
    post2 = torch.empty(t, hc, dtype=f32, device=x.device)
    comb2 = torch.empty(t, hc, hc, dtype=f32, device=x.device)
    block_d = triton.next_power_of_2(dim)
    _hc_finalize[(t,)](xo, pd, ps, scale, base, norm_w, xn, post2, comb2, dim, nsplit, 1, eps, norm_eps, rms_eps,
                       ITERS=iters, HC=hc, NM=nm, BLOCK_S=triton.next_power_of_2(nsplit), BLOCK_D=block_d,
                       num_warps=8 if hc * block_d <= 16384 else 16)
    return xo, xn, post2, comb2


def decode_kernel(x: torch.Tensor, fn: torch.Tensor | None) -> bool:
    """Whether hc_step(..., x, ..., fn, ...) runs the one-launch decode kernel (and so honours sinkhorn_stream)."""
    t, hc, _ = x.shape
    return fn is not None and use_triton(x) and 0 < t < min(DECODE_MAX_T, GEMM_MIX_MIN_T) and hc == 4


def hc_step(y: torch.Tensor | None, x: torch.Tensor, post: torch.Tensor | None, comb: torch.Tensor | None,
            fn: torch.Tensor | None, scale: torch.Tensor | None, base: torch.Tensor | None,
            norm_w: torch.Tensor | None, iters: int, eps: float, norm_eps: float, rms_eps: float,
            sinkhorn_stream: torch.cuda.Stream | None = None, ar: Any = None, extra: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """See the module docstring. y [T, D], x [T, hc, D] (same dtype), post [T, hc] / comb [T, hc, hc] fp32,
    fn [(2+hc)*hc, hc*D] / scale [3] / base [(2+hc)*hc] / norm_w [D] fp32. sinkhorn_stream: where
    decode_kernel(x, fn) holds, comb's Sinkhorn runs on that stream (hc_step_decode: wait on it before reading comb).
    ar / extra (only where decode_kernel(x, fn) holds): y is this rank's partial sum, all-reduced inside the launch
    (hc_step_decode; with extra, y is fp32)."""
    t, hc, dim = x.shape
    assert y is None or (y.shape == (t, dim) and (y.dtype == x.dtype or extra is not None)), (
        None if y is None else y.shape, x.shape)
    if ar is not None and not decode_kernel(x, fn):
        raise ValueError("hc_step: an in-launch all-reduce (ar) needs the one-launch decode kernel (decode_kernel)")
    assert y is None or (post is not None and post.shape == (t, hc) and comb is not None
                         and comb.shape == (t, hc, hc))
    nm = (2 + hc) * hc
    assert fn is None or (fn.shape == (nm, hc * dim) and scale is not None and base is not None
                          and base.shape == (nm,) and norm_w is not None and norm_w.shape == (dim,))
    if y is None and fn is None:
        return x, None, None, None
    if not use_triton(x) or hc & (hc - 1) or t == 0:
        return hc_step_ref(y, x, post, comb, fn, scale, base, norm_w, iters, eps, norm_eps, rms_eps)
    f32 = torch.float32
    x = x.contiguous()
    if y is not None:
        y, post, comb = y.contiguous(), post.to(f32).contiguous(), comb.to(f32).contiguous()
    if fn is not None:
        fn, scale, base, norm_w = (v.to(f32).contiguous() for v in (fn, scale, base, norm_w))
    if t >= GEMM_MIX_MIN_T:
        return _hc_step_gemm(y, x, post, comb, fn, scale, base, norm_w, iters, eps, norm_eps, rms_eps)
    if t < DECODE_MAX_T and hc == 4:
        return hc_step_decode(y, x, post, comb, fn, scale, base, norm_w, iters, eps, norm_eps, rms_eps,
                              sinkhorn_stream=sinkhorn_stream, ar=ar, extra=extra)
    use_dot = t >= 16 and dim >= 16  # token tiles through tl.dot; else one token per program
    bd = min(128 if use_dot else 64, triton.next_power_of_2(dim))
    nsplit = triton.cdiv(dim, bd)
    xo = torch.empty_like(x) if y is not None else x
    pd = torch.empty(t, nsplit, nm, dtype=f32, device=x.device) if fn is not None else xo
    ps = torch.empty(t, nsplit, dtype=f32, device=x.device) if fn is not None else xo
    ptrs = (y if y is not None else x, x, post if post is not None else pd, comb if comb is not None else pd,
            fn if fn is not None else pd, xo, pd, ps)
    nmp = max(16, triton.next_power_of_2(nm))
    if use_dot:
        bt = 32 if t >= 32 else 16
        split = x.dtype == torch.bfloat16 and not _INTERPRET  # Triton 3.6's interpreter: bf16 tl.dot is wrong
        _hc_post_mix[(triton.cdiv(t, bt), nsplit)](
            *ptrs, t, dim, nsplit, HC=hc, NM=nm, NMP=nmp, BLOCK_T=bt, BLOCK_D=bd, HAS_Y=y is not None,
            HAS_FN=fn is not None, SPLIT=split, num_warps=8)
    else:
        _hc_post_mix_row[(t, nsplit)](*ptrs, dim, nsplit, HC=hc, NM=nm, NMP=nmp, BLOCK_D=bd, HAS_Y=y is not None,
                                      HAS_FN=fn is not None, DOTS=True, num_warps=4)
    if fn is None:
        return xo, None, None, None
    xn = torch.empty(t, dim, dtype=x.dtype, device=x.device)
    post2 = torch.empty(t, hc, dtype=f32, device=x.device)
    comb2 = torch.empty(t, hc, hc, dtype=f32, device=x.device)
    bs = triton.next_power_of_2(nsplit)
    if use_dot:  # one program per token
        block_d = triton.next_power_of_2(dim)
        _hc_finalize[(t,)](xo, pd, ps, scale, base, norm_w, xn, post2, comb2, dim, nsplit, nsplit, eps, norm_eps,
                           rms_eps,
                           ITERS=iters, HC=hc, NM=nm, BLOCK_S=bs, BLOCK_D=block_d,
                           num_warps=8 if hc * block_d <= 16384 else 16)
    else:  # few tokens: spread the collapse over D chunks (weights redone per chunk), then the RMS in place
        cd = min(256, triton.next_power_of_2(dim))
        nsb = triton.cdiv(dim, cd)
        cs = torch.empty(t, nsb, dtype=f32, device=x.device)
        _hc_weights_collapse[(t, nsb)](xo, pd, ps, scale, base, xn, cs, post2, comb2, dim, nsplit, nsb, eps,
                                       norm_eps, ITERS=iters, HC=hc, NM=nm, BLOCK_S=bs, BLOCK_D=cd, num_warps=1)
        _hc_rms[(t, nsb)](xn, cs, norm_w, dim, nsb, rms_eps, BLOCK_S=triton.next_power_of_2(nsb), BLOCK_D=cd,
                          num_warps=1)
    return xo, xn, post2, comb2
