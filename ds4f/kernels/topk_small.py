"""⑥ kernels, top-k of short rows in one program each: scores [T, L] fp32 + valid_len [T] in, ids [T, k] int32 out.

The radix select of ds4f.kernels.indexer.topk_indices (4 digits of 8 bits of the order-preserving key, -inf never
selectable) done on registers: a row whose valid length lim = min(valid_len[t], L) is at most N lanes is loaded
whole, its four histograms taken in-program, and its picks written in the order the multi-pass kernels write a row
that fits one chunk: the keys above the k-th largest in ascending id, then the lowest ids among those equal to it
(as many as still needed), then -1 where fewer than k keys are finite. A longer row only gets k x -1 (the multi-pass
kernels overwrite it) and, with ZERO, its histogram and counter rows zeroed for them: no fill launches. Which rows
take this path is decided on the device from valid_len; the lane counts are static (graph-safe, no host sync).
Per digit: the histogram, one reverse scan and one packed max (bin, its suffix count, the count above it); the walk
stops after a digit whose k-th bin holds exactly the keys still needed (distinct scores: after 2 or 3 of the 4).
ROWS (decode's CSA layers): the row written is the attention index list itself, the window's rows then the picks'
pool rows, which replaces the torch mapping (glue.topk_rows) and its launch."""

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
    def _radix_step(h, offs_b, krem):
        # histogram h [NB] of one digit among the keys still in play -> (b, above, in_b): the k-th largest lies in
        # the highest bin b whose suffix count cge[b] reaches krem (b = -1: fewer than krem keys), above = keys in
        # bins > b, in_b = keys in bin b. cge is non-increasing in b, so one max over (b, cge[b], cge[b] - h[b])
        # packed in an int64 finds all three (counts < 2^20)
        cge = tl.cumsum(h, 0, reverse=True)
        pk = tl.max(tl.where(cge >= krem, (offs_b.to(tl.int64) << 40) | (cge.to(tl.int64) << 20) | (cge - h), -1), 0)
        b = tl.where(pk < 0, -1, (pk >> 40).to(tl.int32))
        above = (pk & 0xFFFFF).to(tl.int32)
        return b, above, ((pk >> 20) & 0xFFFFF).to(tl.int32) - above

    @triton.jit
    def _select_row(s_ptr, out_ptr, t, lim, s_st, s_ot, k, bt_ptr, s_bt, win_ptr, s_wt, comp_base, epb,
                    N: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, WP: tl.constexpr, ROWS: tl.constexpr):
        # row t's lim (<= N) leading scores -> out[t, :k] (ROWS: out[t, WP:WP + k] pool rows after the window's WP)
        offs = tl.arange(0, N)
        offs_b = tl.arange(0, NB)
        m = offs < lim
        u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=m, other=float("-inf")))
        val = offs
        if ROWS:  # issued before the digit walk, used after it: entry id -> its block's pool row
            blk = tl.load(bt_ptr + t * s_bt + offs // epb, mask=m, other=0)
            val = (comp_base + blk * epb + offs % epb).to(tl.int32)
            offs_w = tl.arange(0, WP)
            tl.store(out_ptr + t * s_ot + offs_w, tl.load(win_ptr + t * s_wt + offs_w))
            out_ptr += WP
        # digit walk (8 bits a level, as topk_radix._radix_state): krem keys still to take among those matching prefix;
        # it stops early once the k-th's bin holds exactly the keys still needed (the k-th is then their minimum)
        krem = tl.full([], 0, tl.int32) + k  # tensors from the start (k = 1 is specialized to a constant)
        take_all = tl.full([], 0, tl.int1)
        done = take_all
        prefix = tl.full([], 0, tl.uint32)
        for lv in tl.static_range(4):
            if done == 0:
                sel = u != 0
                if lv > 0:
                    sel = sel & ((u >> (32 - 8 * lv)) == (prefix >> (32 - 8 * lv)))
                digit = ((u >> (24 - 8 * lv)) & 255).to(tl.int32)
                h = tl.histogram(digit, NB, mask=sel)
                b, above, in_b = _radix_step(h, offs_b, krem)
                take_all = b < 0
                krem = tl.where(take_all, krem, krem - above)
                prefix = tl.where(take_all, 0, prefix | (b.to(tl.uint32) << (24 - 8 * lv)))
                hit = (in_b == krem) & ~take_all
                done = take_all | hit
                if lv < 3:  # noqa: SIM102 (lv is static, hit a tensor: no `and` between them in Triton)
                    if hit:
                        prefix = tl.min(tl.where(sel & (digit == b), u, 0xFFFFFFFF), 0)
        # keys above the k-th (prefix) in ascending id, then those equal to it: one scan of both counts (< 2^15)
        gt = m & (u > prefix)
        eq = m & (u == prefix) & ~take_all
        c = tl.cumsum(gt.to(tl.int32) | (eq.to(tl.int32) << 15), 0)
        pos = (c & 0x7FFF) - 1
        n_gt = tl.max(c & 0x7FFF, 0)
        tl.store(out_ptr + t * s_ot + pos, val, mask=gt)
        pos_e = n_gt + (c >> 15) - 1
        tl.store(out_ptr + t * s_ot + pos_e, val, mask=eq & (pos_e < k))
        n = tl.where(take_all, n_gt, k)  # slots [n, k) stay -1
        offs_k = tl.arange(0, KP)
        tl.store(out_ptr + t * s_ot + offs_k, tl.full([KP], -1, tl.int32), mask=(offs_k >= n) & (offs_k < k))

    @triton.jit
    def _topk_small(s_ptr, vlen_ptr, out_ptr, hist_ptr, cnt_ptr, L, s_st, s_ot, k, s_lv,
                    bt_ptr, s_bt, win_ptr, s_wt, comp_base, epb,
                    N: tl.constexpr, N2: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, VLEN: tl.constexpr,
                    ZERO: tl.constexpr, WP: tl.constexpr = 0, ROWS: tl.constexpr = False, PDL: tl.constexpr = False):
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
                _select_row(s_ptr, out_ptr, t, lim, s_st, s_ot, k, bt_ptr, s_bt, win_ptr, s_wt, comp_base, epb,
                            N2, KP, NB, WP, ROWS)
        if wide:
            if lim <= N:
                _select_row(s_ptr, out_ptr, t, lim, s_st, s_ot, k, bt_ptr, s_bt, win_ptr, s_wt, comp_base, epb,
                            N, KP, NB, WP, ROWS)
            else:  # the multi-pass kernels fill in the picks
                offs_k = tl.arange(0, KP)
                tl.store(out_ptr + t * s_ot + offs_k, tl.full([KP], -1, tl.int32), mask=offs_k < k)


def launch_small(scores: torch.Tensor, valid_len: torch.Tensor | None, out: torch.Tensor, hist: torch.Tensor | None,
                 cnt: torch.Tensor | None, k: int, lanes: int, s_lv: int, num_warps: int,
                 rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> None:
    """scores [T, L], valid_len [T] int32 or None (every row L long), out [T, k] int32 (any contents) -> rows of
    <= lanes valid entries selected, the others -1; hist / cnt (or None): zeroed per row for the multi-pass kernels.
    lanes: a power of two. rows = (bt_tok [T, blocks] int64, win [T, W] int32, comp_base, epb): out [T, W + k] gets
    the window rows then the picks' pool rows comp_base + bt_tok[t, id // epb] * epb + id % epb (-1 = none), what
    glue.topk_rows makes of the ids (rows past the lanes: -1 in its first k entries, for the passes to overwrite)."""
    T, L = scores.shape
    assert lanes & (lanes - 1) == 0 and lanes < 1 << 16 and 0 < k < 1 << 15
    n2 = SMALL_LANES if lanes > SMALL_LANES else 0
    zero = hist is not None
    if rows is None:
        bt, win, base, epb, wp = out, out, 0, 1, 0
    else:
        bt, win, base, epb = rows
        wp = win.shape[1]
        assert win.shape[0] == T and wp & (wp - 1) == 0 and win.stride(1) == 1
        assert out.shape == (T, wp + k) and bt.stride(1) == 1
    assert out.stride(1) == 1
    _topk_small[(T,)](scores, valid_len if valid_len is not None else out, out, hist if zero else out,
                      cnt if zero else out, L, scores.stride(0), out.stride(0), k, s_lv, bt, bt.stride(0), win,
                      win.stride(0), base, epb, N=lanes, N2=n2, KP=triton.next_power_of_2(k), NB=256,
                      VLEN=valid_len is not None, ZERO=zero, WP=wp, ROWS=rows is not None, num_warps=num_warps,
                      **pdl.launch(scores.device))
