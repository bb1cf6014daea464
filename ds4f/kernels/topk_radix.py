"""⑥ kernels, the multi-program radix top-k of long rows (ds4f.kernels.indexer.topk_indices' passes): scores [T, L]
fp32 + per-row histograms / slot counters (zeroed by topk_small's launch) in, ids [T, k] int32 out.

Four 8-bit digits of the order-preserving key (topk_small._sort_key), each a grid of (row, chunk) programs adding
their chunk's histogram of the keys that match the k-th's prefix so far into the row's histogram, then a compaction
of the keys above the k-th and of as many equal to it as still needed. Two launch forms over the same bodies:
- passes: one launch per digit and one for the compaction (5; `_topk_hist`, `_topk_select`);
- fused (`_topk_fused`): all five phases in one launch, the programs of a row meeting at a barrier (an arrival
  counter they spin on) between phases, as the launch boundary did. Every program of the grid must be resident at
  once: the grid is at most `fused_cap` programs (128, at most 2 per SM; 4 warps each, a few KB of shared memory), and
  nothing waits on this kernel while holding SMs (a CUDA graph launches a dependent node after it completes; PDL
  dependents are scheduled only once every program passed pdl.enter, that is, is resident). The barrier counters
  are a persistent zeroed buffer (ds4f.kernels.arrival) the last program of a row re-arms. The interpreter runs
  programs one after another (a barrier would never open), so there, and unless DS4F_TOPK_FUSED=1, the passes run.
A decode step at 1M context runs this in each of 21 CSA layers (262,144 entries per row): the four passes and the
compaction each waited for the one before to drain."""

from __future__ import annotations

import os

import torch

from ds4f.kernels import arrival, pdl

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.topk_small import _radix_step, _sort_key
except ImportError:  # CPU-only installs: topk_indices runs its reference instead
    triton = None

# opt-in: H200, indexer + top-512 + rows per CSA layer (bench/bench_topk_decode.py --chain): one token at 262,144
# valid entries 65.4 vs 54.6 us with the passes, four tokens 146.2 vs 112.0; only rows the one-program kernel takes
# gain (the passes' empty launches: 20.3 vs 22.7 us). The barrier rounds cost more than the launch boundaries.
FUSED = os.environ.get("DS4F_TOPK_FUSED", "0") == "1" and os.environ.get("TRITON_INTERPRET") != "1"
FUSED_MAX_PROGRAMS = 128  # programs of one fused launch (all rows): co-resident on any sm_80+ GPU of >= 64 SMs

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
            h = tl.load(hist_ptr + lv * s_lv + t * NB + offs, cache_modifier=".cg")  # L2: the fused form's adds
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

    @triton.jit
    def _row_sync(bar_ptr, target):
        # arrive (release: this program's histogram adds are visible first), then wait for `target` arrivals of
        # the row (acquire: the others' adds are visible to the loads after)
        tl.debug_barrier()  # every thread's adds issued before the (one-thread) release below
        tl.atomic_add(bar_ptr, 1)
        seen = tl.atomic_add(bar_ptr, 0)
        while seen < target:
            seen = tl.atomic_add(bar_ptr, 0)

    @triton.jit
    def _topk_fused(s_ptr, vlen_ptr, hist_ptr, cnt_ptr, out_ptr, bar_ptr, L, s_st, k, chunk, s_lv,
                    NB: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr, SMALL: tl.constexpr,
                    PDL: tl.constexpr = False):
        # the four digit passes and the compaction in one launch; a row's programs meet at bar_ptr[t] between
        # phases (every program of the row, also those past its valid length, arrives). The row's 5th arrival
        # round re-arms the counter: its last program stores 0 once every other one has left its last wait
        pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        n = tl.num_programs(1)
        lim = tl.minimum(tl.load(vlen_ptr + t), L) if VLEN else L
        if lim > SMALL:  # the same for every program of the row: all of them sync, or none
            work = c * chunk < lim
            for lv in tl.static_range(4):
                if work:
                    _hist_body(s_ptr, hist_ptr, t, c, lim, s_st, k, chunk, s_lv, lv, NB, BLOCK)
                _row_sync(bar_ptr + t, (lv + 1) * n)
            if work:
                _select_body(s_ptr, hist_ptr, cnt_ptr, out_ptr, t, c, lim, s_st, k, chunk, s_lv, NB, BLOCK)
            if tl.atomic_add(bar_ptr + t, 1) == 5 * n - 1:
                tl.store(bar_ptr + t, 0)


def fused_cap(device: torch.device) -> int:
    """Programs a one-launch grid may have on device: 0 (the passes: CPU, the interpreter, DS4F_TOPK_FUSED=0), else
    FUSED_MAX_PROGRAMS but at most 2 per SM (a small GPU: GB10 has 48)."""
    if not FUSED or device.type != "cuda":
        return 0
    i = device.index if device.index is not None else torch.cuda.current_device()
    return min(FUSED_MAX_PROGRAMS, 2 * torch.cuda.get_device_properties(i).multi_processor_count)


def launch_passes(scores: torch.Tensor, valid_len: torch.Tensor | None, hist: torch.Tensor, cnt: torch.Tensor,
                  out: torch.Tensor, k: int, block: int, chunk: int, small: int) -> None:
    """The radix select of the rows past `small` valid entries into out [T, k] (hist [4 * T * 256] and cnt [2 * T]
    zeroed): one fused launch where the grid is within fused_cap, else the five passes."""
    T, L = scores.shape
    nb, n_chunks = 256, triton.cdiv(L, chunk)
    grid = (T, n_chunks)
    vl = valid_len if valid_len is not None else cnt
    common = dict(NB=nb, BLOCK=block, VLEN=valid_len is not None, SMALL=small, num_warps=4,
                  **pdl.launch(scores.device))
    if T * n_chunks <= fused_cap(scores.device):
        bar = arrival.counters(scores.device, FUSED_MAX_PROGRAMS, "topk_fused")  # re-armed by the kernel
        _topk_fused[grid](scores, vl, hist, cnt, out, bar, L, scores.stride(0), k, chunk, T * nb, **common)
        return
    for level in range(4):
        _topk_hist[grid](scores, vl, hist, L, scores.stride(0), k, chunk, T * nb, LEVEL=level, **common)
    _topk_select[grid](scores, vl, hist, cnt, out, L, scores.stride(0), k, chunk, T * nb, **common)


__all__ = ["FUSED", "FUSED_MAX_PROGRAMS", "fused_cap", "launch_passes"]
