"""⑥ kernels, the multi-program radix top-k of long rows (ds4f.kernels.indexer.topk_indices' passes): scores [T, L]
fp32 + per-row histograms / slot counters (zeroed by topk_small's launch) in, ids [T, k] int32 out.

Four 8-bit digits of the order-preserving key (topk_small._sort_key), each a grid of (row, chunk) programs adding
their chunk's histogram of the keys that match the k-th's prefix so far into the row's histogram, then a compaction
of the keys above the k-th and of as many equal to it as still needed: one launch per digit and one for the
compaction (`_topk_hist`, `_topk_select`). Measured and removed (session 12): the five phases in one launch with a
row's programs meeting at an arrival-counter barrier between them (every program resident at once): indexer + top-512
+ rows at 262,144 entries 65.4 vs 54.6 us at one token, 146.2 vs 112.0 at four (H200, session 11,
bench/results/topk_decode.jsonl); the barrier rounds cost more than the launch boundaries.
A decode step at 1M context runs this in each of 21 CSA layers (262,144 entries per row): the four passes and the
compaction each waited for the one before to drain."""

from __future__ import annotations

import torch

from ds4f.kernels import pdl

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.topk_small import _radix_step, _sort_key
except ImportError:  # CPU-only installs: topk_indices runs its reference instead
    triton = None

if triton is not None:

    @triton.jit
    def _radix_state(hist_ptr, t, k, s_lv, LEVELS: tl.constexpr, NB: tl.constexpr):
        # (prefix, krem, take_all) after LEVELS digits: keys with the prefix's top bits hold the k-th largest;
        # krem of them are still needed. take_all: fewer than k valid keys, so every valid key is picked.
        offs = tl.arange(0, NB)
        krem = k
        take_all = k < 0
        prefix = (k * 0).to(tl.uint32)
        for lv in tl.static_range(LEVELS):
            h = tl.load(hist_ptr + lv * s_lv + t * NB + offs, cache_modifier=".cg")  # L2: other programs' adds
            b, above, _ = _radix_step(h, offs, krem)
            take_all = take_all | (b < 0)
            krem = tl.where(take_all, 0, krem - above)
            prefix = tl.where(take_all, 0, prefix | (b.to(tl.uint32) << (24 - 8 * lv)))
        return prefix, krem, take_all

    @triton.jit
    def _hist_body(s_ptr, hist_ptr, t, c, lim, s_st, k, chunk, s_lv, LEVEL: tl.constexpr, NB: tl.constexpr,
                   BLOCK: tl.constexpr):
        # chunk c of row t: digit LEVEL's histogram of the keys matching the k-th's prefix of the digits before
        prefix, krem, take_all = _radix_state(hist_ptr, t, k, s_lv, LEVEL, NB)
        acc = tl.zeros([NB], tl.int32)
        for j in range(0, chunk, BLOCK):
            offs = c * chunk + j + tl.arange(0, BLOCK)
            m = offs < lim
            u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=m, other=float("-inf")))
            sel = (u != 0) & ~take_all
            if LEVEL > 0:
                sel = sel & ((u >> (32 - 8 * LEVEL)) == (prefix >> (32 - 8 * LEVEL)))
            digit = ((u >> (24 - 8 * LEVEL)) & 255).to(tl.int32)
            acc += tl.histogram(digit, NB, mask=sel)
        tl.atomic_add(hist_ptr + LEVEL * s_lv + t * NB + tl.arange(0, NB), acc)

    @triton.jit
    def _select_body(s_ptr, hist_ptr, cnt_ptr, out_ptr, t, c, lim, s_st, k, chunk, s_lv, NB: tl.constexpr,
                     BLOCK: tl.constexpr):
        # keys above the k-th go to slots [0, k - krem), krem keys equal to it to [k - krem, k), via counters
        out_ptr += t * k
        kth, krem, take_all = _radix_state(hist_ptr, t, k, s_lv, 4, NB)
        for j in range(0, chunk, BLOCK):
            offs = c * chunk + j + tl.arange(0, BLOCK)
            m = offs < lim
            u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=m, other=float("-inf")))
            gt = m & (u > kth)
            eq = m & (u == kth) & ~take_all
            base = tl.atomic_add(cnt_ptr + 2 * t, tl.sum(gt.to(tl.int32), 0))
            pos = base + tl.cumsum(gt.to(tl.int32), 0) - 1
            tl.store(out_ptr + pos, offs, mask=gt)
            base_e = tl.atomic_add(cnt_ptr + 2 * t + 1, tl.sum(eq.to(tl.int32), 0))
            pos_e = base_e + tl.cumsum(eq.to(tl.int32), 0) - 1
            tl.store(out_ptr + (k - krem) + pos_e, offs, mask=eq & (pos_e < krem))

    @triton.jit
    def _topk_hist(s_ptr, vlen_ptr, hist_ptr, L, s_st, k, chunk, s_lv,
                   LEVEL: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr,
                   SMALL: tl.constexpr, PDL: tl.constexpr = False):
        # one 8-bit radix digit (from the top) of the keys that match the prefix chosen so far; VLEN: columns at
        # or past vlen_ptr[t] are -inf by contract and never read (a chunk entirely past it adds nothing).
        # SMALL > 0: rows of <= SMALL valid entries were selected by topk_small's kernel: nothing to do
        pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        lim = tl.minimum(tl.load(vlen_ptr + t), L) if VLEN else L
        if (c * chunk < lim) & (lim > SMALL):  # (a data-dependent loop bound would not run under the interpreter)
            _hist_body(s_ptr, hist_ptr, t, c, lim, s_st, k, chunk, s_lv, LEVEL, NB, BLOCK)

    @triton.jit
    def _topk_select(s_ptr, vlen_ptr, hist_ptr, cnt_ptr, out_ptr, L, s_st, k, chunk, s_lv,
                     NB: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr, SMALL: tl.constexpr,
                     PDL: tl.constexpr = False):
        pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        lim = tl.minimum(tl.load(vlen_ptr + t), L) if VLEN else L
        if (c * chunk < lim) & (lim > SMALL):
            _select_body(s_ptr, hist_ptr, cnt_ptr, out_ptr, t, c, lim, s_st, k, chunk, s_lv, NB, BLOCK)


def launch_passes(scores: torch.Tensor, valid_len: torch.Tensor | None, hist: torch.Tensor, cnt: torch.Tensor,
                  out: torch.Tensor, k: int, block: int, chunk: int, small: int) -> None:
    """The radix select of the rows past `small` valid entries into out [T, k] (hist [4 * T * 256] and cnt [2 * T]
    zeroed): the four digit passes, then the compaction."""
    T, L = scores.shape
    nb, n_chunks = 256, triton.cdiv(L, chunk)
    grid = (T, n_chunks)
    vl = valid_len if valid_len is not None else cnt
    common = dict(NB=nb, BLOCK=block, VLEN=valid_len is not None, SMALL=small, num_warps=4,
                  **pdl.launch(scores.device))
    for level in range(4):
        _topk_hist[grid](scores, vl, hist, L, scores.stride(0), k, chunk, T * nb, LEVEL=level, **common)
    _topk_select[grid](scores, vl, hist, cnt, out, L, scores.stride(0), k, chunk, T * nb, **common)


__all__ = ["launch_passes"]
