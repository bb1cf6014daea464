"""⑥ kernels, decode top-k of long rows in three launches after the indexer: scores [T, L] fp32 + valid_len [T] in,
the attention index list [T, W + k] int32 (window rows, then the picks' pool rows) or ids [T, k] out.

The radix select of ds4f.kernels.indexer.topk_indices (8-bit digits of the order-preserving key,
topk_small._sort_key), with fewer passes over the row:
- the indexer (ds4f.kernels.indexer.indexer_scores with hist=) adds each row's first-digit histogram as it writes
  the scores, so no pass reads the row for it;
- launches 1 and 2 (`_long_hist`, LEVEL 1 and 2): every chunk program of a long row histograms the next digit of
  the keys matching the k-th's prefix so far; in launch 1, program 0 of a short row (<= lanes valid entries) selects
  it whole (topk_small._select_row) and copies the window rows of a long one;
- launch 3 (`_long_sel`): keys whose top 24 bits are above the k-th's go straight to the output; keys sharing the
  k-th's 24 bits (bins 2^-15 wide: a handful for real scores) go to a candidate list; the last-arriving program
  resolves the last digit among them (a rescan of the row if more than CAND share the bin: ties) and re-arms the
  row's histograms and counters to zero for the next call.
The former path took 7 launches: topk_small's (zeroing), 4 digit passes, the compaction, the id -> pool row mapping.
The state (histograms, counters, candidates) is a persistent buffer per device whose histograms and counters every
call leaves zeroed (ds4f.kernels.arrival's contract): allocate it outside a graph capture, one call at a time per
device. Order inside a row: the keys above the k-th's 24-bit bin in arrival order, then the rest; callers use the
set. H200 (bench/bench_topk_decode.py --chain): 11-bit digits measured 2.8x slower than the 7 launches (Triton's
histogram over 2048 bins), hence 8 bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.indexer import SMALL_KNOBS, TOPK_KNOBS, small_warps
from ds4f.kernels.sparse_attn import sm_count

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.topk_radix import _radix_state
    from ds4f.kernels.topk_small import SMALL_LANES, _radix_step, _select_row, _sort_key
except ImportError:  # CPU-only installs: callers take the reference path
    triton = None

NB = 256  # bins of a digit (8 bits)
LEVELS = 3  # digits histogrammed over the row (the indexer's and two passes); the fourth over the candidates
CAND = 1024  # candidate ids per row the finisher resolves in registers (more: it rescans the row)
MAX_ROWS = 32  # rows per call (decode batches); the state is sized for them
CNT = 4  # per-row counters: picks written, candidates, programs arrived, (pad)
ROW = LEVELS * NB + CNT + CAND  # int32 per row of state: hist[LEVELS] | counters | candidates


@dataclass(frozen=True)
class State:
    buf: torch.Tensor  # [MAX_ROWS, ROW] int32; histograms and counters zero between calls (candidates: scratch)

    @property
    def hist0(self) -> torch.Tensor:
        """[MAX_ROWS, NB] int32 first-digit histograms (the indexer's hist= argument)."""
        return self.buf[:, :NB]

    def armed(self) -> bool:
        """Histograms and counters all zero (host sync: tests)."""
        return int(self.buf[:, : LEVELS * NB + CNT].abs().sum()) == 0


def sort_key(scores: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 holding topk_small._sort_key's uint32: the same order, -inf -> 0, finite -> >= 2^23."""
    bits = scores.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    key = torch.where(bits >> 31 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return torch.where(scores == float("-inf"), 0, key)


def hist_ref(scores: torch.Tensor, valid_len: torch.Tensor) -> torch.Tensor:
    """[T, NB] int32: per row, the counts of the first digit (key >> 24) of the finite scores below valid_len (what
    indexer_scores(hist=) adds)."""
    T, L = scores.shape
    key = sort_key(scores)
    ok = (key != 0) & (torch.arange(L, device=scores.device)[None, :] < valid_len.long()[:, None])
    out = torch.zeros(T, NB, dtype=torch.int32, device=scores.device)
    for t in range(T):
        out[t] = torch.bincount(key[t][ok[t]] >> 24, minlength=NB).int()
    return out


def state(device: torch.device) -> State:
    """The device's persistent top-k state (zeroed; every call leaves its histograms and counters zeroed)."""
    return State(arrival.counters(device, MAX_ROWS * ROW, "topk_long")[: MAX_ROWS * ROW].view(MAX_ROWS, ROW))


if triton is not None:
    _NB = tl.constexpr(NB)  # the module's sizes as the kernels see them
    _LV = tl.constexpr(LEVELS)
    _CNT = tl.constexpr(CNT)
    _CAND = tl.constexpr(CAND)
    _ROW = tl.constexpr(ROW)

    @triton.jit
    def _pool_rows(ids, m, t, bt_ptr, s_bt, comp_base, epb, ROWS: tl.constexpr):
        # entry ids -> what the output holds: ids, or (ROWS) their pool rows comp_base + bt[t, id // epb] * epb +
        # id % epb
        if ROWS:
            blk = tl.load(bt_ptr + t * s_bt + ids // epb, mask=m, other=0)
            return (comp_base + blk * epb + ids % epb).to(tl.int32)
        return ids.to(tl.int32)

    @triton.jit
    def _long_hist(s_ptr, vlen_ptr, st_ptr, out_ptr, L, s_st, s_ot, k, chunk, bt_ptr, s_bt, win_ptr, s_wt,
                   comp_base, epb, LEVEL: tl.constexpr, N: tl.constexpr, N2: tl.constexpr, KP: tl.constexpr,
                   BLOCK: tl.constexpr, WP: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr = False):
        # program = (row t, chunk c). Long row: digit LEVEL's histogram of its chunk's keys matching the k-th's
        # prefix of the LEVEL digits before. LEVEL 1 also: a short row selected whole by program 0, which also
        # re-arms the indexer's histogram; a long row's window rows copied by program 0
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        lim = tl.minimum(tl.load(vlen_ptr + t), L)
        row = st_ptr + t * _ROW
        if lim <= N:
            if LEVEL == 1:  # noqa: SIM102 (LEVEL is static, c a tensor: no `and` between them in Triton)
                if c == 0:
                    tl.store(row + tl.arange(0, _NB), tl.zeros([_NB], tl.int32))
                    if N2 > 0:
                        if lim <= N2:
                            _select_row(s_ptr, out_ptr, t, lim, s_st, s_ot, k, bt_ptr, s_bt, win_ptr, s_wt,
                                        comp_base, epb, N2, KP, _NB, WP, ROWS)
                        else:
                            _select_row(s_ptr, out_ptr, t, lim, s_st, s_ot, k, bt_ptr, s_bt, win_ptr, s_wt,
                                        comp_base, epb, N, KP, _NB, WP, ROWS)
                    else:
                        _select_row(s_ptr, out_ptr, t, lim, s_st, s_ot, k, bt_ptr, s_bt, win_ptr, s_wt, comp_base,
                                    epb, N, KP, _NB, WP, ROWS)
        else:
            if ROWS and LEVEL == 1:  # noqa: SIM102
                if c == 0:
                    offs_w = tl.arange(0, WP)
                    tl.store(out_ptr + t * s_ot + offs_w, tl.load(win_ptr + t * s_wt + offs_w))
            if c * chunk < lim:
                prefix, _, take_all = _radix_state(row, 0, k, _NB, LEVEL, _NB)
                if take_all == 0:  # else fewer than k finite keys: every one is taken, no digit to refine
                    acc = tl.zeros([_NB], tl.int32)
                    for j in range(0, chunk, BLOCK):
                        offs = c * chunk + j + tl.arange(0, BLOCK)
                        u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=offs < lim, other=float("-inf")))
                        sel = (u != 0) & ((u >> (32 - 8 * LEVEL)) == (prefix >> (32 - 8 * LEVEL)))
                        acc += tl.histogram(((u >> (24 - 8 * LEVEL)) & 255).to(tl.int32), _NB, mask=sel)
                    tl.atomic_add(row + LEVEL * _NB + tl.arange(0, _NB), acc, mask=acc != 0)

    @triton.jit
    def _long_sel(s_ptr, vlen_ptr, st_ptr, out_ptr, L, s_st, s_ot, k, chunk, n_chunks, bt_ptr, s_bt, comp_base, epb,
                  N: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, WP: tl.constexpr, ROWS: tl.constexpr,
                  PDL: tl.constexpr = False):
        # program = (row t, chunk c) of a long row: keys above the k-th's 24-bit prefix -> out, keys with it -> the
        # candidates; the last to arrive picks the rest and re-arms the row's state
        pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        lim = tl.minimum(tl.load(vlen_ptr + t), L)
        if lim > N:
            row = st_ptr + t * _ROW
            cnt = row + _LV * _NB
            cand = cnt + _CNT
            outp = out_ptr + t * s_ot + WP
            prefix, krem, take_all = _radix_state(row, 0, k, _NB, _LV, _NB)
            p24 = prefix >> 8  # take_all: 0, below every finite key's top 24 bits (>= 2^15)
            if c * chunk < lim:
                for j in range(0, chunk, BLOCK):
                    offs = c * chunk + j + tl.arange(0, BLOCK)
                    m = offs < lim
                    u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=m, other=float("-inf")))
                    top = u >> 8
                    gt = m & (u != 0) & (top > p24)
                    eq = m & (u != 0) & (top == p24) & ~take_all
                    base = tl.atomic_add(cnt, tl.sum(gt.to(tl.int32), 0))
                    pos = base + tl.cumsum(gt.to(tl.int32), 0) - 1
                    tl.store(outp + pos, _pool_rows(offs, gt, t, bt_ptr, s_bt, comp_base, epb, ROWS), mask=gt)
                    base_c = tl.atomic_add(cnt + 1, tl.sum(eq.to(tl.int32), 0))
                    pos_c = base_c + tl.cumsum(eq.to(tl.int32), 0) - 1
                    tl.store(cand + pos_c, offs.to(tl.int32), mask=eq & (pos_c < _CAND))
            tl.debug_barrier()  # every thread's candidate stores issued before the (one-thread) release below
            if tl.atomic_add(cnt + 2, 1) == n_chunks - 1:  # acq_rel: every other program's stores are visible
                ngt = tl.atomic_add(cnt, 0)
                ncand = tl.atomic_add(cnt + 1, 0)
                offs_k = tl.arange(0, KP)
                tl.store(outp + offs_k, tl.full([KP], -1, tl.int32), mask=(offs_k >= ngt) & (offs_k < k) & take_all)
                offs_b = tl.arange(0, _NB)
                if (krem > 0) & (ncand <= _CAND):
                    offs_c = tl.arange(0, _CAND)
                    mc = offs_c < ncand
                    ids = tl.load(cand + offs_c, mask=mc, other=0)
                    u = _sort_key(tl.load(s_ptr + t * s_st + ids, mask=mc, other=float("-inf")))
                    d = (u & 255).to(tl.int32)
                    b, above, _ = _radix_step(tl.histogram(d, _NB, mask=mc), offs_b, krem)
                    gt = mc & (d > b)
                    eq = mc & (d == b)
                    pos = ngt + tl.cumsum(gt.to(tl.int32), 0) - 1
                    tl.store(outp + pos, _pool_rows(ids, gt, t, bt_ptr, s_bt, comp_base, epb, ROWS), mask=gt)
                    pos_e = ngt + above + tl.cumsum(eq.to(tl.int32), 0) - 1
                    eq = eq & (pos_e < k)
                    tl.store(outp + pos_e, _pool_rows(ids, eq, t, bt_ptr, s_bt, comp_base, epb, ROWS), mask=eq)
                if (krem > 0) & (ncand > _CAND):  # many keys share the k-th's top 24 bits (ties): rescan the row
                    h = tl.zeros([_NB], tl.int32)
                    for j in range(0, L, BLOCK):
                        offs = j + tl.arange(0, BLOCK)
                        u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=offs < lim, other=float("-inf")))
                        h += tl.histogram((u & 255).to(tl.int32), _NB, mask=(u != 0) & ((u >> 8) == p24))
                    b, above, _ = _radix_step(h, offs_b, krem)
                    n_g = ngt
                    n_e = ngt + above
                    for j in range(0, L, BLOCK):
                        offs = j + tl.arange(0, BLOCK)
                        u = _sort_key(tl.load(s_ptr + t * s_st + offs, mask=offs < lim, other=float("-inf")))
                        sel = (u != 0) & ((u >> 8) == p24)
                        d = (u & 255).to(tl.int32)
                        gt = sel & (d > b)
                        eq = sel & (d == b)
                        pos = n_g + tl.cumsum(gt.to(tl.int32), 0) - 1
                        tl.store(outp + pos, _pool_rows(offs, gt, t, bt_ptr, s_bt, comp_base, epb, ROWS), mask=gt)
                        pos_e = n_e + tl.cumsum(eq.to(tl.int32), 0) - 1
                        eq = eq & (pos_e < k)
                        tl.store(outp + pos_e, _pool_rows(offs, eq, t, bt_ptr, s_bt, comp_base, epb, ROWS), mask=eq)
                        n_g += tl.sum(gt.to(tl.int32), 0)
                        n_e += tl.sum(eq.to(tl.int32), 0)
                for lv in tl.static_range(_LV):  # re-armed for the next call
                    tl.store(row + lv * _NB + offs_b, tl.zeros([_NB], tl.int32))
                tl.store(cnt + tl.arange(0, _CNT), tl.zeros([_CNT], tl.int32))


def select(scores: torch.Tensor, valid_len: torch.Tensor, k: int, st: State, lanes: int, warps: int,
           block: int = 2048, programs: int = 128,
           rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """scores [T, L] written by indexer_scores(hist=st.hist0) -> [T, k] ids (rows None) or [T, W + k] window rows
    then pool rows (rows = (bt_tok [T, blocks] int64, win [T, W] int32, comp_base, epb)); -1 = none. lanes (a power
    of two): rows of <= lanes valid entries are selected whole by one program with `warps` warps (as
    topk_small.launch_small); longer ones by the chunk programs (chunks of `block`, `programs` per row)."""
    T, L = scores.shape
    assert 0 < T <= MAX_ROWS and L < 1 << 20 and 0 < k <= lanes and lanes & (lanes - 1) == 0 and k < 1 << 15
    assert scores.stride(1) == 1 and valid_len.shape == (T,) and valid_len.dtype == torch.int32
    if rows is None:
        out = torch.empty((T, k), dtype=torch.int32, device=scores.device)
        bt, win, base, epb, wp = out, out, 0, 1, 0
    else:
        bt, win, base, epb = rows
        wp = win.shape[1]
        assert win.shape[0] == T and wp & (wp - 1) == 0 and win.stride(1) == 1 and bt.stride(1) == 1
        out = torch.empty((T, wp + k), dtype=torch.int32, device=scores.device)
    n_chunks = max(1, min(triton.cdiv(L, block), programs))
    chunk = triton.cdiv(triton.cdiv(L, n_chunks), block) * block
    n_chunks = triton.cdiv(L, chunk)
    kp = triton.next_power_of_2(k)
    n2 = SMALL_LANES if lanes > SMALL_LANES else 0
    for level in (1, 2):
        _long_hist[(T, n_chunks)](scores, valid_len, st.buf, out, L, scores.stride(0), out.stride(0), k, chunk, bt,
                                  bt.stride(0), win, win.stride(0), base, epb, LEVEL=level, N=lanes, N2=n2, KP=kp,
                                  BLOCK=block, WP=wp, ROWS=rows is not None, num_warps=warps,
                                  **pdl.launch(scores.device))
    _long_sel[(T, n_chunks)](scores, valid_len, st.buf, out, L, scores.stride(0), out.stride(0), k, chunk, n_chunks,
                             bt, bt.stride(0), base, epb, N=lanes, KP=kp, BLOCK=block, WP=wp, ROWS=rows is not None,
                             num_warps=warps, **pdl.launch(scores.device))
    return out


def applies(T: int, L: int, W: int, device: torch.device) -> bool:
    """The two-launch top-k (the indexer adding its first-digit histogram) serves this decode call: Triton on CUDA,
    1..MAX_ROWS rows, L past DS4F_TOPK_SMALL's lanes, W a power of two."""
    small = SMALL_KNOBS[0]
    return (triton is not None and device.type == "cuda" and 0 < T <= MAX_ROWS and small > 0
            and small < L and L < 1 << 20 and W >= 1 and W & (W - 1) == 0)


def decode_rows(scores: torch.Tensor, k: int, valid_len: torch.Tensor, st: State,
                rows: tuple[torch.Tensor, torch.Tensor, int, int]) -> torch.Tensor:
    """select with ds4f.kernels.indexer's decode knobs: rows of <= DS4F_TOPK_SMALL lanes in one program, longer ones
    in DS4F_TOPK_DECODE's chunks; scores written by indexer_scores(hist=st.hist0) -> [T, W + k] attention rows."""
    lanes = SMALL_KNOBS[0]
    programs = TOPK_KNOBS[1] or triton.cdiv(2 * sm_count(scores.device), scores.shape[0])
    return select(scores, valid_len, k, st, lanes, small_warps(lanes), TOPK_KNOBS[0], programs, rows=rows)


__all__ = ["CAND", "LEVELS", "MAX_ROWS", "NB", "State", "applies", "decode_rows", "hist_ref", "select", "sort_key",
           "state"]
