"""⑥ kernels, the radix top-k's passes, the Triton side (imported only where triton is): the digit passes
(`_topk_hist`), the gather with the per-row pick in its last program (`_topk_gather`), the pick as a launch of its own
(`_topk_final`) and the former compaction (`_topk_select`). ds4f/kernels/topk_radix.py holds their launches, knobs and
contracts, and re-exports them."""

from __future__ import annotations

import triton
import triton.language as tl

from ds4f.kernels.pdl import enter as pdl_enter
from ds4f.kernels.topk_small import _radix_step, _sort_key

PICK_BLOCK = 2048  # candidates the per-row pick streams at a time from its buffer (or the row) past its register lanes
_PICK_BLOCK = tl.constexpr(PICK_BLOCK)


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
def _claim(cnt_ptr, m):
    # slots for the lanes of mask m after those earlier programs claimed at the counter: [lanes] int32 positions
    base = tl.atomic_add(cnt_ptr, tl.sum(m.to(tl.int32), 0), sem="relaxed")
    return base + tl.cumsum(m.to(tl.int32), 0) - 1

@triton.jit
def _row_chunk(vlen_ptr, L, chunk, VLEN: tl.constexpr, SMALL: tl.constexpr):
    # program (row t, chunk c) -> (t, c, lim, go): lim = the row's valid length (columns at or past vlen_ptr[t]
    # are -inf by contract and never read); go: the chunk holds valid columns of a row past SMALL (rows of
    # <= SMALL valid entries were selected by topk_small's kernel)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lim = tl.minimum(tl.load(vlen_ptr + t), L) if VLEN else L
    return t, c, lim, (c * chunk < lim) & (lim > SMALL)

@triton.jit
def _hist_body(s_ptr, hist_ptr, t, c, lim, s_st, k, chunk, s_lv, LEVEL: tl.constexpr, NB: tl.constexpr,
               BLOCK: tl.constexpr, SPARSE: tl.constexpr = False):
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
    dst = hist_ptr + LEVEL * s_lv + t * NB + tl.arange(0, NB)
    if SPARSE:
        tl.atomic_add(dst, acc, mask=acc != 0, sem="relaxed")
    else:
        tl.atomic_add(dst, acc, sem="relaxed")

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
        tl.store(out_ptr + _claim(cnt_ptr + 2 * t, gt), offs, mask=gt)
        pos_e = _claim(cnt_ptr + 2 * t + 1, eq)
        tl.store(out_ptr + (k - krem) + pos_e, offs, mask=eq & (pos_e < krem))

@triton.jit
def _gather_body(s_ptr, hist_ptr, cnt_ptr, out_ptr, cand_ptr, t, c, lim, s_st, k, chunk, s_lv, CAP,
                 NB: tl.constexpr, BLOCK: tl.constexpr):
    # keys whose top 16 bits are above the k-th's -> out slots [0, k - krem) (counter 0); keys sharing them ->
    # cand_ptr[t] (ids in [0, CAP), keys in [CAP, 2 CAP); counter 1 counts them all, stored or not)
    out_ptr += t * k
    cand_ptr += t * 2 * CAP
    prefix, krem, take_all = _radix_state(hist_ptr, t, k, s_lv, 2, NB)
    hi = prefix >> 16  # take_all: 0, below every finite key's top bits
    for j in range(0, chunk, BLOCK):
        offs = c * chunk + j + tl.arange(0, BLOCK)
        m = offs < lim
        u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=m, other=float("-inf")))
        gt = m & ((u >> 16) > hi)
        eq = m & ((u >> 16) == hi) & ~take_all
        tl.store(out_ptr + _claim(cnt_ptr + 2 * t, gt), offs, mask=gt)
        pos_e = _claim(cnt_ptr + 2 * t + 1, eq)
        tl.store(cand_ptr + pos_e, offs, mask=eq & (pos_e < CAP))
        tl.store(cand_ptr + CAP + pos_e, u.to(tl.int32, bitcast=True), mask=eq & (pos_e < CAP))
    return prefix, krem, take_all

@triton.jit
def _pick_stream(src_ptr, out_ptr, length, CAP, hi, krem, ROW: tl.constexpr, NB: tl.constexpr,
                 BLOCK: tl.constexpr, CM: tl.constexpr):
    # the krem largest of the keys whose top 16 bits are hi, BLOCK entries at a time -> out_ptr[0, krem):
    # ROW: scores src_ptr[0, length) (ids = columns); else the candidate buffer (ids at src_ptr, key bits at
    # src_ptr + CAP, length of them, every one with top bits hi; CM: their loads' cache modifier)
    offs_b = tl.arange(0, NB)
    pre = hi
    kr = krem
    for lv in tl.static_range(2):  # digits 2 and 3 of the matching keys, then the compaction
        h = tl.zeros([NB], tl.int32)
        for j in range(0, length, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            m = offs < length
            if ROW:
                u = _sort_key(tl.load(src_ptr + offs, mask=m, other=float("-inf")))
            else:
                u = tl.load(src_ptr + CAP + offs, mask=m, other=0, cache_modifier=CM).to(tl.uint32,
                                                                                          bitcast=True)
            sel = m & ((u >> (16 - 8 * lv)) == pre)
            h += tl.histogram(((u >> (8 - 8 * lv)) & 255).to(tl.int32), NB, mask=sel)
        b, above, _ = _radix_step(h, offs_b, kr)
        kr = kr - above
        pre = (pre << 8) | b.to(tl.uint32)
    n_gt = tl.full([], 0, tl.int32)
    n_eq = n_gt
    for j in range(0, length, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        m = offs < length
        if ROW:
            u = _sort_key(tl.load(src_ptr + offs, mask=m, other=float("-inf")))
            ids = offs
        else:
            u = tl.load(src_ptr + CAP + offs, mask=m, other=0, cache_modifier=CM).to(tl.uint32, bitcast=True)
            ids = tl.load(src_ptr + offs, mask=m, other=0, cache_modifier=CM)
        gt = m & ((u >> 16) == hi) & (u > pre)
        eq = m & (u == pre)
        tl.store(out_ptr + n_gt + tl.cumsum(gt.to(tl.int32), 0) - 1, ids, mask=gt)
        pos_e = (krem - kr) + n_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
        tl.store(out_ptr + pos_e, ids, mask=eq & (pos_e < krem))
        n_gt += tl.sum(gt.to(tl.int32), 0)
        n_eq += tl.sum(eq.to(tl.int32), 0)

@triton.jit
def _final_body(s_ptr, cnt_ptr, out_ptr, cand_ptr, t, lim, s_st, k, CAP, prefix, krem, take_all,
                NB: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr, CM: tl.constexpr, st_ptr=None,
                STATS: tl.constexpr = False):
    # the krem keys still needed among the n sharing the k-th's top 16 bits (prefix, krem, take_all: the radix
    # state after two digits) -> out slots [k - krem, k): in registers (n <= NC lanes, the usual case), from
    # the candidate buffer BLOCK at a time (n <= CAP), else by streaming the row (exact, slow: one program
    # reads it three times). CM: the cache modifier of the counter / buffer loads (".cg" in the gather launch).
    # STATS: DS4F_TOPK_STATS' counters (st_ptr: int64 [6])
    if take_all == 0:
        n = tl.load(cnt_ptr + 2 * t + 1, cache_modifier=CM)
        if STATS:
            n64 = n.to(tl.int64)
            tl.atomic_add(st_ptr, 1, sem="relaxed")
            tl.atomic_add(st_ptr + 1, n64, sem="relaxed")
            tl.atomic_max(st_ptr + 2, n64, sem="relaxed")
            tl.atomic_add(st_ptr + 3, (n > NC).to(tl.int64), sem="relaxed")
            tl.atomic_add(st_ptr + 4, (n > CAP).to(tl.int64), sem="relaxed")
            tl.atomic_add(st_ptr + 5, krem.to(tl.int64), sem="relaxed")
        out_ptr += t * k + (k - krem)
        cand_ptr += t * 2 * CAP
        hi = prefix >> 16
        if n <= NC:
            offs_b = tl.arange(0, NB)
            offs = tl.arange(0, NC)
            m = offs < n
            ids = tl.load(cand_ptr + offs, mask=m, other=0, cache_modifier=CM)
            lo = tl.load(cand_ptr + CAP + offs, mask=m, other=0, cache_modifier=CM).to(tl.uint32,
                                                                                       bitcast=True) & 0xFFFF
            d2 = (lo >> 8).to(tl.int32)
            b2, above, _ = _radix_step(tl.histogram(d2, NB, mask=m), offs_b, krem)
            krem2 = krem - above
            b3, above, _ = _radix_step(tl.histogram((lo & 255).to(tl.int32), NB, mask=m & (d2 == b2)), offs_b,
                                       krem2)
            krem3 = krem2 - above
            kth = ((b2 << 8) | b3).to(tl.uint32)
            gt = m & (lo > kth)
            eq = m & (lo == kth)
            c = tl.cumsum(gt.to(tl.int32) | (eq.to(tl.int32) << 15), 0)  # both counts < 2^15
            tl.store(out_ptr + (c & 0x7FFF) - 1, ids, mask=gt)
            pos_e = (krem - krem3) + (c >> 15) - 1
            tl.store(out_ptr + pos_e, ids, mask=eq & (pos_e < krem))
        elif n <= CAP:
            _pick_stream(cand_ptr, out_ptr, n, CAP, hi, krem, False, NB, BLOCK, CM)
        else:
            _pick_stream(s_ptr + t * s_st, out_ptr, lim, CAP, hi, krem, True, NB, BLOCK, "")

@triton.jit
def _rows_body(ids_ptr, rows_ptr, t, k, n, bt_ptr, s_bt, win_ptr, s_wt, s_rt, comp_base, epb,
               WP: tl.constexpr, KP: tl.constexpr):
    # row t's ids (ids_ptr[t * k:][:k], the first n of them written) -> rows_ptr[t] = the window's WP rows,
    # then each id's pool row comp_base + bt[t, id // epb] * epb + id % epb (-1 past n or for id -1):
    # glue.topk_rows's mapping
    offs_w = tl.arange(0, WP)
    tl.store(rows_ptr + t * s_rt + offs_w, tl.load(win_ptr + t * s_wt + offs_w))
    offs = tl.arange(0, KP)
    ids = tl.load(ids_ptr + t * k + offs, mask=offs < n, other=-1, cache_modifier=".cg")
    i0 = tl.maximum(ids, 0)
    blk = tl.load(bt_ptr + t * s_bt + i0 // epb, mask=ids >= 0, other=0)
    r = tl.where(ids >= 0, comp_base + blk * epb + i0 % epb, -1).to(tl.int32)
    tl.store(rows_ptr + t * s_rt + WP + offs, r, mask=offs < k)

@triton.jit
def _topk_gather(s_ptr, vlen_ptr, hist_ptr, cnt_ptr, out_ptr, cand_ptr, L, s_st, k, chunk, s_lv, CAP,
                 rows_ptr, s_rt, bt_ptr, s_bt, win_ptr, s_wt, comp_base, epb,
                 NB: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr, SMALL: tl.constexpr,
                 FINAL: tl.constexpr = False, NC: tl.constexpr = 0, ROWS: tl.constexpr = False,
                 WP: tl.constexpr = 0, KP: tl.constexpr = 0, PDL: tl.constexpr = False, st_ptr=None,
                 STATS: tl.constexpr = False):
    # FINAL: the last of a row's programs to arrive (a counter in the row's unused fourth-digit histogram,
    # zeroed with the others before the call) runs _topk_final's pick (its stores and the buffer's are the
    # other programs' released stores: acq_rel counter, .cg loads); ROWS: then writes the row's attention
    # index list (_rows_body) to rows_ptr. Its shape (one loop over the chunk's tiles, ids read back for the rows)
    # is deliberate: session 26's variant (first tile peeled out of the loop, pool rows stored by every program) used
    # 244 registers against 168 and ran ~5 us longer per CSA layer in the model after a 1M prompt on H200
    pdl_enter(PDL)
    t, c, lim, go = _row_chunk(vlen_ptr, L, chunk, VLEN, SMALL)
    if go:
        prefix, krem, take_all = _gather_body(s_ptr, hist_ptr, cnt_ptr, out_ptr, cand_ptr, t, c, lim, s_st, k,
                                              chunk, s_lv, CAP, NB, BLOCK)
        if FINAL:
            tl.debug_barrier()  # every thread's stores issued before the release below
            arrived = tl.atomic_add(hist_ptr + 3 * s_lv + t * NB, 1, sem="acq_rel", scope="gpu")
            if arrived == (lim + chunk - 1) // chunk - 1:
                _final_body(s_ptr, cnt_ptr, out_ptr, cand_ptr, t, lim, s_st, k, CAP, prefix, krem, take_all,
                            NB, NC, _PICK_BLOCK, ".cg", st_ptr, STATS)
                if ROWS:
                    tl.debug_barrier()  # the pick's stores before the reads of the whole row
                    n = tl.where(take_all, tl.load(cnt_ptr + 2 * t, cache_modifier=".cg"), k)
                    _rows_body(out_ptr, rows_ptr, t, k, n, bt_ptr, s_bt, win_ptr, s_wt, s_rt, comp_base, epb,
                               WP, KP)

@triton.jit
def _topk_final(s_ptr, vlen_ptr, hist_ptr, cnt_ptr, out_ptr, cand_ptr, L, s_st, k, s_lv, CAP,
                NB: tl.constexpr, NC: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr,
                SMALL: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)  # grid (T,): chunk 0 of each row
    t, _, lim, go = _row_chunk(vlen_ptr, L, 0, VLEN, SMALL)
    if go:
        prefix, krem, take_all = _radix_state(hist_ptr, t, k, s_lv, 2, NB)
        _final_body(s_ptr, cnt_ptr, out_ptr, cand_ptr, t, lim, s_st, k, CAP, prefix, krem, take_all, NB, NC,
                    BLOCK, "")

@triton.jit
def _topk_hist(s_ptr, vlen_ptr, hist_ptr, L, s_st, k, chunk, s_lv,
               LEVEL: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr,
               SMALL: tl.constexpr, PDL: tl.constexpr = False, SPARSE: tl.constexpr = False):
    # one 8-bit radix digit (from the top) of the keys that match the prefix chosen so far
    pdl_enter(PDL)
    t, c, lim, go = _row_chunk(vlen_ptr, L, chunk, VLEN, SMALL)
    if go:  # (a data-dependent loop bound would not run under the interpreter)
        _hist_body(s_ptr, hist_ptr, t, c, lim, s_st, k, chunk, s_lv, LEVEL, NB, BLOCK, SPARSE)

@triton.jit
def _topk_select(s_ptr, vlen_ptr, hist_ptr, cnt_ptr, out_ptr, L, s_st, k, chunk, s_lv,
                 NB: tl.constexpr, BLOCK: tl.constexpr, VLEN: tl.constexpr, SMALL: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t, c, lim, go = _row_chunk(vlen_ptr, L, chunk, VLEN, SMALL)
    if go:
        _select_body(s_ptr, hist_ptr, cnt_ptr, out_ptr, t, c, lim, s_st, k, chunk, s_lv, NB, BLOCK)
