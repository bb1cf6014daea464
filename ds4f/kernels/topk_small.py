"""⑥ kernels, top-k of short rows in one program each: scores [T, L] fp32 + valid_len [T] in, ids [T, k] int32 out.

The radix select of ds4f.kernels.indexer.topk_indices (4 digits of 8 bits of the order-preserving key, -inf never
selectable) done on registers: a row whose valid length lim = min(valid_len[t], L) is at most N lanes is loaded
whole, its four histograms taken in-program, and its picks written in the order the multi-pass kernels write a row
that fits one chunk: the keys above the k-th largest in ascending id, then the lowest ids among those equal to it
(as many as still needed), then -1 where fewer than k keys are finite. A longer row only gets k x -1 (the multi-pass
kernels overwrite it) and, with ZERO, its histogram and counter rows zeroed for them: no fill launches. Which rows
take this path is decided on the device from valid_len; the lane counts are static (graph-safe, no host sync)."""

from __future__ import annotations

import torch

from ds4f.kernels import pdl

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: topk_indices runs its reference instead
    triton = None

SMALL_LANES = 2048  # a second, narrower register tile for rows of <= 2048 entries (depth <= 8K at ratio 4)

if triton is not None:

    @triton.jit
    def _sort_key(s):
        # fp32 -> uint32 with the same order; -inf (not selectable) -> 0, every finite score -> >= 2^23
        bits = s.to(tl.uint32, bitcast=True)
        u = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        return tl.where(s == float("-inf"), 0, u)

    @triton.jit
    def _radix_step(h, offs_b, krem, take_all, prefix, lv: tl.constexpr):
        # one digit of the radix select: histogram h [NB] of level lv's digits among the keys still in play ->
        # (krem, take_all, prefix) after it (the k-th largest lies in the highest bin whose suffix count reaches krem)
        cge = tl.sum(h, 0) - tl.cumsum(h, 0) + h  # keys in bins >= b
        b = tl.max(tl.where(cge >= krem, offs_b, -1), 0)
        above = tl.sum(tl.where(offs_b == b, cge - h, 0), 0)
        take_all = take_all | (b < 0)
        krem = tl.where(take_all, 0, krem - above)
        prefix = tl.where(take_all, 0, prefix | (b.to(tl.uint32) << (24 - 8 * lv)))
        return krem, take_all, prefix

    @triton.jit
    def _select_row(s_ptr, out_ptr, t, lim, s_st, k, N: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr):
        # row t's lim (<= N) leading scores -> out[t, :k]; the same digit walk as indexer._radix_state
        offs = tl.arange(0, N)
        offs_b = tl.arange(0, NB)
        m = offs < lim
        u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=m, other=float("-inf")))
        krem = k
        take_all = k < 0
        prefix = (k * 0).to(tl.uint32)
        for lv in tl.static_range(4):
            sel = u != 0
            if lv > 0:
                sel = sel & ((u >> (32 - 8 * lv)) == (prefix >> (32 - 8 * lv)))
            digit = ((u >> (24 - 8 * lv)) & 255).to(tl.int32)
            h = tl.histogram(digit, NB, mask=sel & ~take_all)
            krem, take_all, prefix = _radix_step(h, offs_b, krem, take_all, prefix, lv)
        gt = m & (u > prefix)
        pos = tl.cumsum(gt.to(tl.int32), 0) - 1
        tl.store(out_ptr + t * k + pos, offs, mask=gt)
        eq = m & (u == prefix) & ~take_all
        pos_e = tl.cumsum(eq.to(tl.int32), 0) - 1
        tl.store(out_ptr + t * k + (k - krem) + pos_e, offs, mask=eq & (pos_e < krem))
        n = tl.where(take_all, tl.sum(gt.to(tl.int32), 0), k)  # slots [n, k) stay -1
        offs_k = tl.arange(0, KP)
        tl.store(out_ptr + t * k + offs_k, tl.full([KP], -1, tl.int32), mask=(offs_k >= n) & (offs_k < k))

    @triton.jit
    def _topk_small(s_ptr, vlen_ptr, out_ptr, hist_ptr, cnt_ptr, L, s_st, k, s_lv,
                    N: tl.constexpr, N2: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, VLEN: tl.constexpr,
                    ZERO: tl.constexpr, PDL: tl.constexpr = False):
        # program = row t. N: the widest row handled here; N2 (< N, or 0): a narrower tile for rows of <= N2
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        t = tl.program_id(0).to(tl.int64)
        lim = tl.minimum(tl.load(vlen_ptr + t), L) if VLEN else L
        if ZERO:  # the multi-pass kernels' per-row histograms (4 levels) and their two slot counters
            offs_b = tl.arange(0, NB)
            for lv in tl.static_range(4):
                tl.store(hist_ptr + lv * s_lv + t * NB + offs_b, tl.zeros([NB], tl.int32))
            tl.store(cnt_ptr + 2 * t + tl.arange(0, 2), tl.zeros([2], tl.int32))
        wide = lim >= 0
        if N2 > 0:
            wide = lim > N2
            if lim <= N2:
                _select_row(s_ptr, out_ptr, t, lim, s_st, k, N2, KP, NB)
        if wide:
            if lim <= N:
                _select_row(s_ptr, out_ptr, t, lim, s_st, k, N, KP, NB)
            else:
                offs_k = tl.arange(0, KP)
                tl.store(out_ptr + t * k + offs_k, tl.full([KP], -1, tl.int32), mask=offs_k < k)


def launch_small(scores: torch.Tensor, valid_len: torch.Tensor | None, out: torch.Tensor, hist: torch.Tensor | None,
                 cnt: torch.Tensor | None, k: int, lanes: int, s_lv: int, num_warps: int) -> None:
    """scores [T, L], valid_len [T] int32 or None (every row L long), out [T, k] int32 (any contents) -> rows of
    <= lanes valid entries selected, the others -1; hist / cnt (or None): zeroed per row for the multi-pass kernels.
    lanes: a power of two."""
    T, L = scores.shape
    n2 = SMALL_LANES if lanes > SMALL_LANES else 0
    zero = hist is not None
    _topk_small[(T,)](scores, valid_len if valid_len is not None else out, out, hist if zero else out,
                      cnt if zero else out, L, scores.stride(0), k, s_lv, N=lanes, N2=n2,
                      KP=triton.next_power_of_2(k), NB=256, VLEN=valid_len is not None, ZERO=zero,
                      num_warps=num_warps, **pdl.launch(scores.device))
