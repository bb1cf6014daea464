"""⑥ kernels, mHC step for few tokens (decode, T < 16, hc = 4): ds4f.kernels.mhc.hc_step's contract in ONE launch.

`hc_step_decode(y, x, post, comb, fn, scale, base, norm_w, ...)` -> (X' [T, 4, D], xn [T, D], post' [T, 4] fp32,
comb' [T, 4, 4] fp32), the same outputs as ds4f.kernels.mhc.hc_step_ref (inputs contiguous, fp32 where hc_step
makes them so; y None: X' = x; fn None: (X', None, None, None)).

Program = (token, BLOCK_D channels of the 4 streams): X' chunk (post-mix), its dots with fn's 24 rows and its
sum of squares -> fp32 partials pd [T, NSPLIT + 1, NMP] (column NM holds the squares, columns past it 0; row NSPLIT
is the finisher's scratch). Then every program bumps its token's arrival count (stores -> CTA barrier -> acq_rel
atomic); the last to arrive reloads the partials and X' (L2) and does mix -> pre / post / Sinkhorn comb (16 scalars
per thread: no cross-thread traffic in the 20 iterations) -> collapse -> RMSNorm, then re-arms the count to 0
(CUDA-graph replays find it zeroed). The counts are one persistent int32 buffer per device (allocate it outside a
graph capture: run a call first), so calls on one device must not overlap on two streams.

Under tensor parallelism the sublayer output y arrives as each rank's partial sum; with `ar` each program first
all-reduces its own y chunk by the push protocol of ds4f/kernels/push_allreduce.py (store to the peers, flag, wait,
rank-order sum, one bf16 rounding) and goes on with the sum: the all-reduce launch before this one and its handoff
leave the chain, and the streams' loads overlap the wait. DS4F_HC_AR (ds4f/distributed/symm.py) switches it.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.knobs import env_knobs

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.push_allreduce import _own_term, _push_sum, _rne_bf16
except ImportError:  # CPU-only installs: hc_step falls back to its torch reference
    triton = None

MAX_T = 16  # tokens per call (one arrival count each)
# DS4F_HC_DECODE="block_d,num_warps" overrides the launch (0 = the built-in pick: 32 channels per program at T = 1,
# else 64; D / 512 warps, 4..16); block_d 0 with num_warps 0 ("0,0") switches this kernel off (hc_step's old path)
# H200, T = 1, graph of 16 chained calls (bench/bench_mhc.py --sweep): 32 channels x 4 warps 9.6 us, x 8 warps 11.0,
# 64 x 4 9.9, 128 x 4 10.1
_KNOBS = env_knobs("DS4F_HC_DECODE", 2, "32,4", minimum=0)
ENABLED = _KNOBS != (0, 0)

if triton is not None:

    @triton.jit
    def _norm4(a, b, c, d, eps):
        # one reciprocal, four products (within an ulp of four divisions): the 20 rounds are a serial chain
        r = 1.0 / ((a + b) + (c + d) + eps)
        return a * r, b * r, c * r, d * r

    @triton.jit
    def _softmax4(a, b, c, d, eps):  # softmax of a row, + eps (model.mhc.hc_weights)
        m = tl.maximum(tl.maximum(a, b), tl.maximum(c, d))
        a = tl.exp(a - m)
        b = tl.exp(b - m)
        c = tl.exp(c - m)
        d = tl.exp(d - m)
        s = (a + b) + (c + d)
        return a / s + eps, b / s + eps, c / s + eps, d / s + eps

    @triton.jit
    def _rows(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps):
        c00, c01, c02, c03 = _norm4(c00, c01, c02, c03, eps)
        c10, c11, c12, c13 = _norm4(c10, c11, c12, c13, eps)
        c20, c21, c22, c23 = _norm4(c20, c21, c22, c23, eps)
        c30, c31, c32, c33 = _norm4(c30, c31, c32, c33, eps)
        return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33

    @triton.jit
    def _cols(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps):
        c00, c10, c20, c30 = _norm4(c00, c10, c20, c30, eps)
        c01, c11, c21, c31 = _norm4(c01, c11, c21, c31, eps)
        c02, c12, c22, c32 = _norm4(c02, c12, c22, c32, eps)
        c03, c13, c23, c33 = _norm4(c03, c13, c23, c33, eps)
        return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33

    @triton.jit
    def _lin4(m_ptr, b_ptr, off, rr, sc):  # 4 mix entries from `off`: (dot * rsqrt) * scale + base
        return (tl.load(m_ptr + off) * rr * sc + tl.load(b_ptr + off),
                tl.load(m_ptr + off + 1) * rr * sc + tl.load(b_ptr + off + 1),
                tl.load(m_ptr + off + 2) * rr * sc + tl.load(b_ptr + off + 2),
                tl.load(m_ptr + off + 3) * rr * sc + tl.load(b_ptr + off + 3))

    @triton.jit
    def _store4(p, a, b, c, d):
        tl.store(p, a)
        tl.store(p + 1, b)
        tl.store(p + 2, c)
        tl.store(p + 3, d)

    @triton.jit
    def _mix_store(yv, xs, cm, pk, xo_ptr, xrow, dm):
        # X'_k = post_k * y + sum_j comb[j, k] X_j over [HC, BD] (fp32 in), stored in xo's dtype and returned
        xk = (pk[:, None] * yv[None, :] + tl.sum(cm[:, :, None] * xs[:, None, :], 0)).to(xo_ptr.dtype.element_ty)
        tl.store(xo_ptr + xrow, xk, mask=dm[None, :])
        return xk

    @triton.jit
    def _post_mix(y_ptr, x_ptr, post_ptr, comb_ptr, xo_ptr, t, d, dm, D, HC: tl.constexpr, HAS_Y: tl.constexpr):
        # token t's channels d of all HC streams: X'_k = post_k * y + sum_j comb[j, k] X_j (stored, xo's dtype), or
        # X as is without y -> [HC, BD] in the streams' dtype
        j = tl.arange(0, HC)
        xrow = t * (HC * D) + j[:, None] * D + d[None, :]  # [HC, BD]
        if HAS_Y:
            xs = tl.load(x_ptr + xrow, mask=dm[None, :], other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + t * D + d, mask=dm, other=0.0).to(tl.float32)
            cm = tl.load(comb_ptr + t * (HC * HC) + j[:, None] * HC + j[None, :])  # [j, k]
            pk = tl.load(post_ptr + t * HC + j)
            xk = _mix_store(yv, xs, cm, pk, xo_ptr, xrow, dm)
        else:
            xk = tl.load(x_ptr + xrow, mask=dm[None, :], other=0.0)
        return xk

    @triton.jit
    def _post_mix_ar(y_ptr, extra_ptr, x_ptr, post_ptr, comb_ptr, xo_ptr, t, d, dm, D, pid, addr_ptr, epoch_ptr,
                     err_ptr, rank, timeout, BLOCK_D: tl.constexpr, W: tl.constexpr, CAP: tl.constexpr,
                     MAXB: tl.constexpr, TIMER: tl.constexpr, TRAP: tl.constexpr, SW_ROUND: tl.constexpr,
                     ADD: tl.constexpr):
        # _post_mix (HAS_Y) with y the sum over the TP ranks of their terms (push_allreduce._push_sum: this
        # program is the push protocol's program pid, message elements pid * BLOCK_D + [0, BLOCK_D) = token t's
        # channels d, as D % BLOCK_D == 0); the term is y's bf16 chunk, or with ADD bf16(y + extra) (y fp32). The
        # streams, comb and post are loaded first: their latency overlaps the wait for the peers
        j = tl.arange(0, 4)
        xrow = t * (4 * D) + j[:, None] * D + d[None, :]  # [4, BD]
        xs = tl.load(x_ptr + xrow, mask=dm[None, :], other=0.0).to(tl.float32)
        cm = tl.load(comb_ptr + t * 16 + j[:, None] * 4 + j[None, :])  # [j, k]
        pk = tl.load(post_ptr + t * 4 + j)
        e = tl.load(epoch_ptr + pid) + 1
        offs = tl.max_contiguous(tl.multiple_of(pid * BLOCK_D + tl.arange(0, BLOCK_D), BLOCK_D), BLOCK_D)
        mine = _own_term(y_ptr, extra_ptr, offs, dm, ADD, SW_ROUND)
        acc = _push_sum(mine, e, offs, dm, pid, addr_ptr, epoch_ptr, err_ptr, rank, timeout, W, CAP, MAXB, TIMER, TRAP)
        yv = _rne_bf16(acc, SW_ROUND).to(tl.float32)  # the bf16 sum push_allreduce would have stored
        return _mix_store(yv, xs, cm, pk, xo_ptr, xrow, dm)

    @triton.jit
    def _finish(xo_ptr, pd_ptr, scale_ptr, base_ptr, w_ptr, xn_ptr, post_ptr, comb_ptr, t, D, NSPLIT, eps,
                norm_eps, rms_eps, ITERS: tl.constexpr, NM: tl.constexpr, NMP: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_F: tl.constexpr, SINK: tl.constexpr):
        # token t, all partials in: mix -> pre / post / comb (= model.mhc.hc_weights) -> collapse -> RMSNorm
        s = tl.arange(0, BLOCK_S)
        r = tl.arange(0, NMP)
        prow = pd_ptr + t * ((NSPLIT + 1) * NMP)
        p = tl.load(prow + s[:, None] * NMP + r[None, :], mask=(s < NSPLIT)[:, None], other=0.0,
                    cache_modifier=".cg")  # written by other programs: from L2
        d = tl.arange(0, BLOCK_F)
        dm = d < D
        xb = xo_ptr + t * (4 * D) + d
        x0 = tl.load(xb, mask=dm, other=0.0, cache_modifier=".cg")
        x1 = tl.load(xb + D, mask=dm, other=0.0, cache_modifier=".cg")
        x2 = tl.load(xb + 2 * D, mask=dm, other=0.0, cache_modifier=".cg")
        x3 = tl.load(xb + 3 * D, mask=dm, other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + d, mask=dm, other=0.0)
        # the split sums to scratch row NSPLIT, read back as scalars that every thread holds
        mrow = prow + NSPLIT * NMP
        tl.store(mrow + r, tl.sum(p, 0))
        tl.debug_barrier()
        rr = tl.rsqrt(tl.load(mrow + NM) / (4 * D) + norm_eps)
        s0 = tl.load(scale_ptr)
        s1 = tl.load(scale_ptr + 1)
        s2 = tl.load(scale_ptr + 2)
        a0, a1, a2, a3 = _lin4(mrow, base_ptr, 0, rr, s0)
        col = ((tl.sigmoid(a0) + eps) * x0.to(tl.float32) + (tl.sigmoid(a1) + eps) * x1.to(tl.float32)
               + (tl.sigmoid(a2) + eps) * x2.to(tl.float32) + (tl.sigmoid(a3) + eps) * x3.to(tl.float32))
        col = col.to(xn_ptr.dtype.element_ty).to(tl.float32)
        r2 = tl.rsqrt(tl.sum(col * col, 0) / D + rms_eps)
        tl.store(xn_ptr + t * D + d, (w * (col * r2)).to(xn_ptr.dtype.element_ty), mask=dm)
        q0, q1, q2, q3 = _lin4(mrow, base_ptr, 4, rr, s1)
        _store4(post_ptr + t * 4, 2.0 * tl.sigmoid(q0), 2.0 * tl.sigmoid(q1), 2.0 * tl.sigmoid(q2),
                2.0 * tl.sigmoid(q3))
        c00, c01, c02, c03 = _lin4(mrow, base_ptr, 8, rr, s2)
        c10, c11, c12, c13 = _lin4(mrow, base_ptr, 12, rr, s2)
        c20, c21, c22, c23 = _lin4(mrow, base_ptr, 16, rr, s2)
        c30, c31, c32, c33 = _lin4(mrow, base_ptr, 20, rr, s2)
        cb = comb_ptr + t * 16
        if SINK:
            _sinkhorn_store(cb, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33,
                            eps, ITERS)
        else:  # the logits; _hc_sinkhorn finishes comb (on another stream: off the next sublayer's path)
            _store4(cb, c00, c01, c02, c03)
            _store4(cb + 4, c10, c11, c12, c13)
            _store4(cb + 8, c20, c21, c22, c23)
            _store4(cb + 12, c30, c31, c32, c33)

    @triton.jit
    def _sinkhorn_store(cb, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps,
                        ITERS: tl.constexpr):
        # comb logits -> row softmax + eps -> column normalize -> ITERS - 1 row / column rounds -> cb[0:16]
        c00, c01, c02, c03 = _softmax4(c00, c01, c02, c03, eps)
        c10, c11, c12, c13 = _softmax4(c10, c11, c12, c13, eps)
        c20, c21, c22, c23 = _softmax4(c20, c21, c22, c23, eps)
        c30, c31, c32, c33 = _softmax4(c30, c31, c32, c33, eps)
        c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 = _cols(
            c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps)
        for _ in range(ITERS - 1):
            c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 = _rows(
                c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps)
            c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 = _cols(
                c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps)
        _store4(cb, c00, c01, c02, c03)
        _store4(cb + 4, c10, c11, c12, c13)
        _store4(cb + 8, c20, c21, c22, c23)
        _store4(cb + 12, c30, c31, c32, c33)

    @triton.jit
    def _hc_sinkhorn(comb_ptr, eps, ITERS: tl.constexpr):
        # program = token: comb [T, 4, 4] logits (the finisher's, SINK=False) -> comb in place
        cb = comb_ptr + tl.program_id(0).to(tl.int64) * 16
        _sinkhorn_store(cb, tl.load(cb), tl.load(cb + 1), tl.load(cb + 2), tl.load(cb + 3), tl.load(cb + 4),
                        tl.load(cb + 5), tl.load(cb + 6), tl.load(cb + 7), tl.load(cb + 8), tl.load(cb + 9),
                        tl.load(cb + 10), tl.load(cb + 11), tl.load(cb + 12), tl.load(cb + 13), tl.load(cb + 14),
                        tl.load(cb + 15), eps, ITERS)

    @triton.jit
    def _hc_decode(y_ptr, x_ptr, post_ptr, comb_ptr, fn_ptr, scale_ptr, base_ptr, w_ptr, xo_ptr, pd_ptr, cnt_ptr,
                   xn_ptr, post2_ptr, comb2_ptr, D, NSPLIT, eps, norm_eps, rms_eps, ITERS: tl.constexpr,
                   NM: tl.constexpr, NMP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_F: tl.constexpr, HAS_Y: tl.constexpr, HAS_FN: tl.constexpr, SINK: tl.constexpr,
                   PDL: tl.constexpr = False, AR: tl.constexpr = False, addr_ptr=None, epoch_ptr=None, err_ptr=None,
                   extra_ptr=None, rank=0, timeout=0, W: tl.constexpr = 1, CAP: tl.constexpr = 1,
                   MAXB: tl.constexpr = 1, TIMER: tl.constexpr = False, TRAP: tl.constexpr = False,
                   SW_ROUND: tl.constexpr = False, ADD: tl.constexpr = False):
        # x / xo [T, 4, D], fn [NM, 4*D] fp32, pd [T, NSPLIT + 1, NMP] fp32, cnt [>= T] int32 (zero between calls);
        # AR (HAS_Y): y is this rank's partial sum, reduced over the TP ranks here (_post_mix_ar; the push protocol's
        # arguments as push_allreduce._push_ar's)
        t = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        d = sp * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        j = tl.arange(0, 4)
        if HAS_FN:  # fn's HBM read first, so its latency overlaps the streams' loads and the post-mix (with PDL:
            # also the tail of the kernel before, ds4f.kernels.pdl)
            r = tl.arange(0, NMP)
            f = tl.load(fn_ptr + r[:, None, None] * (4 * D) + j[None, :, None] * D + d[None, None, :],
                        mask=(r < NM)[:, None, None] & dm[None, None, :], other=0.0)  # [NMP, 4, BD]
        pdl_enter(PDL)
        if AR:
            xk = _post_mix_ar(y_ptr, extra_ptr, x_ptr, post_ptr, comb_ptr, xo_ptr, t, d, dm, D, t * NSPLIT + sp,
                              addr_ptr, epoch_ptr, err_ptr, rank, timeout, BLOCK_D, W, CAP, MAXB, TIMER, TRAP,
                              SW_ROUND, ADD)
        else:
            xk = _post_mix(y_ptr, x_ptr, post_ptr, comb_ptr, xo_ptr, t, d, dm, D, 4, HAS_Y)
        if HAS_FN:
            xf = xk.to(tl.float32)
            acc = tl.sum(tl.sum(f * xf[None, :, :], 2), 1)
            acc = tl.where(r == NM, tl.sum(tl.sum(xf * xf, 1), 0), acc)
            tl.store(pd_ptr + (t * (NSPLIT + 1) + sp) * NMP + r, acc)  # whole rows (0 past NM): unmasked reloads
            tl.debug_barrier()  # every thread's X' and partials stored before the release below
            done = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
            if done == NSPLIT - 1:
                _finish(xo_ptr, pd_ptr, scale_ptr, base_ptr, w_ptr, xn_ptr, post2_ptr, comb2_ptr, t, D, NSPLIT, eps,
                        norm_eps, rms_eps, ITERS, NM, NMP, BLOCK_S, BLOCK_F, SINK)
                tl.atomic_xchg(cnt_ptr + t, 0)


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device, per-token arrival counts; zero between calls (the finishing program re-arms its token's)."""
    return arrival.counters(device, MAX_T, "mhc_decode")


def hc_step_decode(y: torch.Tensor | None, x: torch.Tensor, post: torch.Tensor | None, comb: torch.Tensor | None,
                   fn: torch.Tensor | None, scale: torch.Tensor | None, base: torch.Tensor | None,
                   norm_w: torch.Tensor | None, iters: int, eps: float, norm_eps: float, rms_eps: float,
                   block_d: int | None = None, num_warps: int | None = None, split_sinkhorn: bool = False,
                   sinkhorn_stream: torch.cuda.Stream | None = None, ar: Any = None,
                   extra: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """See the module docstring (checked, contiguous inputs from hc_step; y or fn given).

    ar (a push_allreduce.PushAllReduce whose block is the channels per program; y and fn given): y is this rank's
    partial sum of the sublayer output and the launch all-reduces it first, as push_allreduce's launch would (the
    same bits, one launch less); extra (bf16, y's shape): y is fp32 and the term is bf16(y + extra)
    (PushAllReduce's ADD). Every rank makes the same calls in the same order (a collective).

    split_sinkhorn or sinkhorn_stream: the finishing program stores comb's logits and a second launch (_hc_sinkhorn)
    turns them into comb; with sinkhorn_stream it runs there (forked from the current stream): the caller must make
    its stream wait on sinkhorn_stream before comb is read (xn and post are final when this launch ends)."""
    t, hc, dim = x.shape
    assert hc == 4 and 0 < t <= MAX_T and iters >= 1, (x.shape, iters)
    nm = (2 + hc) * hc
    nmp = triton.next_power_of_2(nm + 1)
    knobs = _KNOBS or (0, 0)
    bd = block_d or knobs[0] or (32 if t == 1 else 64)
    bd = min(triton.next_power_of_2(bd), triton.next_power_of_2(dim))
    ar_kw: dict[str, Any] = {}
    if ar is not None:  # the protocol's program j owns message elements [j * block, (j + 1) * block) in every call
        bd = ar.block
        assert y is not None and fn is not None and dim % bd == 0 and t * dim <= ar.cap, (bd, dim, t, ar.cap)
        assert y.dtype == (torch.bfloat16 if extra is None else torch.float32) and y.is_contiguous(), y.dtype
        assert extra is None or (extra.dtype == torch.bfloat16 and extra.shape == y.shape), extra
        ar_kw = dict(AR=True, addr_ptr=ar.addrs, epoch_ptr=ar.epoch, err_ptr=ar.err, rank=ar.rank,
                     timeout=ar.timeout, W=ar.world, CAP=ar.cap, MAXB=ar.maxb, TIMER=ar.timer, TRAP=ar.trap,
                     SW_ROUND=not ar.timer, ADD=extra is not None,
                     extra_ptr=extra.contiguous() if extra is not None else y)
    bf = triton.next_power_of_2(dim)
    nw = num_warps or knobs[1] or max(4, min(16, bf // 512))
    nsplit = triton.cdiv(dim, bd)
    dev, f32 = x.device, torch.float32
    xo = torch.empty_like(x) if y is not None else x
    if fn is not None:
        pd = torch.empty(t, nsplit + 1, nmp, dtype=f32, device=dev)
        xn = torch.empty(t, dim, dtype=x.dtype, device=dev)
        post2 = torch.empty(t, hc, dtype=f32, device=dev)
        comb2 = torch.empty(t, hc, hc, dtype=f32, device=dev)
        cnt = _counters(dev)
        scratch = (fn, scale, base, norm_w, xo, pd, cnt, xn, post2, comb2)
    else:
        scratch = (xo, xo, xo, xo, xo, xo, xo, xo, xo, xo)
    _hc_decode[(t, nsplit)](y if y is not None else x, x, post if post is not None else xo,
                            comb if comb is not None else xo, *scratch, dim, nsplit, eps, norm_eps, rms_eps,
                            ITERS=iters, NM=nm, NMP=nmp, BLOCK_D=bd, BLOCK_S=triton.next_power_of_2(nsplit),
                            BLOCK_F=bf, HAS_Y=y is not None, HAS_FN=fn is not None,
                            SINK=not (split_sinkhorn or sinkhorn_stream is not None), num_warps=nw,
                            **pdl.launch(x.device), **ar_kw)
    if fn is None:
        return xo, None, None, None
    if sinkhorn_stream is not None:
        sinkhorn_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(sinkhorn_stream):
            _hc_sinkhorn[(t,)](comb2, eps, ITERS=iters, num_warps=1)
    elif split_sinkhorn:
        _hc_sinkhorn[(t,)](comb2, eps, ITERS=iters, num_warps=1)
    return xo, xn, post2, comb2
