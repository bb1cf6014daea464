"""The one-program-per-row top-k (ds4f.kernels.topk_small) and the interleaved decode indexer tiling under the Triton
interpreter (CPU, tiny shapes, a subprocess each): ids and their order against an ordered torch oracle (keys above
the k-th largest in ascending id, the lowest ids equal to it, -1 padding) and against the multi-pass path without
the small kernel, over ties, -0.0, -inf inside the valid range, valid_len 0, < k, == k, past the small lanes and == L;
sets against topk_indices_ref. The indexer: n_inner 4 (blocks grid-strided) bit-equal to n_inner 1 and the
reference within tolerance, rows with a short valid length over a long L."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from interp import run_interpreted

from ds4f.kernels.ref import indexer_scores_ref, topk_indices_ref

pytest.importorskip("triton")


def sort_keys(s: torch.Tensor) -> torch.Tensor:
    """fp32 scores -> their order-preserving uint32 radix keys (int64; -inf not special-cased)."""
    bits = s.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >> 31 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def ordered_ref(s: torch.Tensor, k: int, vlen: torch.Tensor | None) -> torch.Tensor:
    """scores [T, L] -> [T, k] int32 in the radix path's order, on the order-preserving key (so -0.0 < +0.0)."""
    T, L = s.shape
    key = sort_keys(s)
    valid = s != float("-inf")
    if vlen is not None:
        valid &= torch.arange(L)[None, :] < vlen.long()[:, None]
    out = torch.full((T, k), -1, dtype=torch.int32)
    for r in range(T):
        ids = valid[r].nonzero().flatten()
        if ids.numel() >= k:  # exactly k: still those above the smallest first
            kth = key[r, ids].sort(descending=True).values[k - 1]
            gt, eq = ids[key[r, ids] > kth], ids[key[r, ids] == kth]
            ids = torch.cat([gt, eq[: k - gt.numel()]])
        out[r, : ids.numel()] = ids.int()
    return out


def _scores(T: int, L: int, vl: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    s = (torch.randn(T, L, generator=g) * 4).round() / 4  # few distinct values: ties at the k-th place
    s[1, ::3] = -0.0
    s[2, torch.randperm(L, generator=g)[: L // 2]] = float("-inf")  # -inf inside the valid range
    s[3, 5:] = float("-inf")  # fewer finite than k although valid_len is larger
    s[torch.arange(L)[None, :] >= vl[:, None].long()] = float("-inf")
    return s


def check_topk_small() -> None:
    from ds4f.kernels import indexer

    g = torch.Generator().manual_seed(7)
    k, L = 64, 5000
    vl = torch.tensor([2048, 3000, 4096, 700, 0, 10, 64, 2049, 4097, L], dtype=torch.int32)
    s = _scores(len(vl), L, vl, g)
    want = ordered_ref(s, k, vl)
    old = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=vl, programs=1, small=0, cand=(0, 0))
    assert torch.equal(old, want), "multi-pass in one chunk vs the ordered oracle"
    for small in (4096, 512):  # 4096: the 2048-lane tile and the 4096-lane tile; rows past it: the passes
        new = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=vl, programs=1, small=small, cand=(0, 0))
        assert torch.equal(new, want), small
        multi = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=vl, programs=3, small=small)
        ref = topk_indices_ref(s, k)
        for r in range(len(vl)):  # several chunks: the order (and a tied k-th's subset) may differ, not the top
            a, b = multi[r][multi[r] >= 0], ref[r][ref[r] >= 0]
            assert a.numel() == b.numel() and torch.equal(s[r, a.long()].sort().values, s[r, b.long()].sort().values)
            assert torch.equal(multi[r] >= 0, want[r] >= 0)
    print("small rows ordered equal")
    for length in (300, 2048):  # L <= small: the one launch only, valid_len given or not
        s2 = s[:, :length].contiguous()
        v2 = vl.clamp(max=length)
        got = indexer.topk_indices(s2, k, backend="radix", valid_len=v2, small=4096)
        assert torch.equal(got, ordered_ref(s2, k, v2)), length
        got = indexer.topk_indices(s2, k, backend="radix", small=4096)
        assert torch.equal(got, ordered_ref(s2, k, None)), length
        assert torch.equal(got, indexer.topk_indices(s2, k, backend="radix", programs=1, small=0, cand=(0, 0))), length
    got = indexer.topk_indices(s, k, block=256, backend="radix", programs=1, small=512)  # no valid_len, L > small
    assert torch.equal(got, ordered_ref(s, k, None))
    print("one launch ordered equal")
    # distinct scores (the digit walk stops once the k-th's bin holds just the keys still needed), rows whose k-th
    # ties fill its bin exactly, and k = 1 / k = L
    c = torch.randn(6, 2048, generator=g) * torch.tensor([1.0, 1e-3, 1e4, 1.0, 1.0, 1.0])[:, None]
    c[3] = c[3].abs()
    c[4, :600] = 1.5  # 600 tied maxima, k inside them
    c[5, 100:] = (c[5, 100:] * 2).round()  # ties below a few distinct keys at the top
    for kk in (1, 64, 512, 2048):
        want = ordered_ref(c, kk, None)
        assert torch.equal(indexer.topk_indices(c, kk, backend="radix", small=4096), want), kk
        assert torch.equal(indexer.topk_indices(c, kk, backend="radix", programs=1, small=0, cand=(0, 0)), want), kk
    print("early stop ordered equal")


def _same_top(got: torch.Tensor, s: torch.Tensor, k: int, vl: torch.Tensor | None) -> None:
    """got [T, k]: distinct ids whose scores are the k largest of each row (a tied k-th's subset may differ from
    the oracle's), -1 exactly where the ordered oracle has it."""
    want = ordered_ref(s, k, vl)
    for r in range(s.shape[0]):
        a, b = got[r][got[r] >= 0], want[r][want[r] >= 0]
        assert a.numel() == b.numel() and a.unique().numel() == a.numel(), r
        assert torch.equal(s[r, a.long()].sort().values, s[r, b.long()].sort().values), r
        assert torch.equal(got[r] >= 0, want[r] >= 0), r


def check_topk_cand() -> None:
    """Rows past the small lanes through two digit passes, the gather and the per-row pick: in registers, from the
    candidate buffer, and streaming the row where its k-th's top 16 bits are shared by more keys than the buffer
    holds (600 tied maxima; scores rounded to a few values; 4097 near-equal keys), against the oracle's top values,
    the pick in the gather launch (its row's last program to arrive) and in a launch of its own."""
    from ds4f.kernels import indexer, topk_radix

    g = torch.Generator().manual_seed(5)
    k, L = 64, 5000
    vl = torch.tensor([5000, 3000, 700, 0, 10, 4097, 2049, 5000], dtype=torch.int32)
    s = _scores(len(vl), L, vl, g)
    s[6, :600] = 1.5  # 600 tied maxima: k inside them
    s[7] = (s[7] * 2).round()  # a few distinct values, each shared by hundreds of keys
    # distinct, all with the same top 16 key bits (1 + [0, 2.9e-3)); the top 64 span two 24-bit prefixes
    s[5, :4097] = 1.0 + torch.randperm(4097, generator=g) * (3 * 2.0**-22)
    for fused in (True, False):  # DS4F_TOPK_FUSED_FINAL: the pick in the gather launch's last program / its own
        topk_radix.FUSED_FINAL = fused
        for small in (0, 512):
            for cand in ((512, 8192), (16, 8192), (16, 64)):  # registers / the buffer / the row past 64 candidates
                for progs in (1, 3):
                    got = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=vl, programs=progs,
                                               small=small, cand=cand)
                    _same_top(got, s, k, vl)
    topk_radix.FUSED_FINAL = True
    _same_top(indexer.topk_indices(s, 1, block=256, backend="radix", programs=2, small=0, cand=(16, 64)), s, 1, None)
    # every candidate needed: 30 keys above, then exactly the 34 sharing the k-th's top 16 bits (distinct low bits)
    r = torch.randn(2, L, generator=g) * 0.1
    at = torch.randperm(L, generator=g)
    r[:, at[:30]] = 8.0 + torch.rand(30, generator=g)
    r[:, at[30:64]] = 2.0 + torch.arange(34) * 2.0**-20
    for cand in ((16, 8192), (16, 32), (64, 8192)):
        _same_top(indexer.topk_indices(r, k, block=256, backend="radix", programs=3, small=0, cand=cand), r, k, None)
    print("candidate top-k equal")


def check_pool_rows() -> None:
    """topk_pool_rows (ids mapped to pool rows in the launch that selects them) against topk_indices + glue.topk_rows;
    None (the caller maps ids) past the small kernel's lanes."""
    from ds4f.kernels import indexer
    from ds4f.runner.gpu.glue import topk_rows

    g = torch.Generator().manual_seed(11)
    k, L, W, epb, base = 64, 2048, 16, 8, 1000
    vl = torch.tensor([2048, 700, 0, 10, 64, 1999], dtype=torch.int32)
    s = _scores(len(vl), L, vl, g)
    bt = torch.randint(0, 5000, (len(vl), L // epb), generator=g)  # int64 block ids
    win = torch.randint(-1, 900, (len(vl), W), generator=g, dtype=torch.int32)
    got = indexer.topk_pool_rows(s, k, vl, bt, win, base, epb)  # L <= the small lanes: one launch
    want = topk_rows(ordered_ref(s, k, vl), bt, win, base, epb)
    assert got is not None and got.dtype == torch.int32 and torch.equal(got, want)
    assert indexer.topk_pool_rows(torch.zeros(2, 9000), k, None, bt[:2], win[:2], base, epb) is None  # L > lanes
    print("pool rows equal")


def check_pool_rows_long() -> None:
    """Rows past the small lanes written as attention index lists by the small kernel (short rows) and the gather
    launch's fused pick (topk_indices(rows=), what topk_pool_rows_long runs): equal to glue.topk_rows of the ids the
    same passes select (window rows, pool rows, -1 past a row's finite keys), over the register, buffer and
    streaming picks, with the first-digit histogram from the indexer's buffer or counted by the passes."""
    from ds4f.kernels import indexer
    from ds4f.runner.gpu.glue import topk_rows

    g = torch.Generator().manual_seed(19)
    k, L, W, epb, base = 64, 5000, 16, 8, 1000
    vl = torch.tensor([5000, 3000, 700, 4000, 10, 4097, 2049, 0], dtype=torch.int32)
    s = _scores(len(vl), L, vl, g)  # row 3: 5 finite keys in a long row (fewer than k: -1 rows)
    s[5, :4097] = 1.0 + torch.randperm(4097, generator=g) * (3 * 2.0**-22)
    s[6, :600] = 1.5
    bt = torch.randint(0, 5000, (len(vl), -(-L // epb)), generator=g)
    win = torch.randint(-1, 900, (len(vl), W), generator=g, dtype=torch.int32)
    t = len(vl)
    for cand in ((512, 8192), (16, 8192), (16, 64)):
        for hist in (False, True):
            kw = dict(block=256, backend="radix", valid_len=vl, programs=3, small=512, cand=cand)
            buf = None
            if hist:  # the indexer's first digit: the row's key histogram, the rest zeroed
                key = sort_keys(s)
                buf = torch.zeros(4 * t * 256 + 2 * t, dtype=torch.int32)
                for r in range(t):
                    fin = (s[r] != float("-inf")) & (torch.arange(L) < vl[r])
                    buf[r * 256:(r + 1) * 256] = torch.bincount(key[r][fin] >> 24, minlength=256).int()
            ids = indexer.topk_indices(s, k, hist_buf=None if buf is None else buf.clone(), **kw)
            _same_top(ids, s, k, vl)
            got = indexer.topk_indices(s, k, hist_buf=buf, rows=(bt, win, base, epb), **kw)
            assert got.dtype == torch.int32 and torch.equal(got, topk_rows(ids, bt, win, base, epb)), (cand, hist)
    # L within the default small lanes (8192): the one launch of topk_pool_rows applies, not this path
    assert indexer.topk_pool_rows_long(s, k, vl, None, bt, win, base, epb) is None
    print("long pool rows equal")


def check_topk_stats() -> None:
    """DS4F_TOPK_STATS: the gather launch's pick counts its rows' candidates (the valid keys sharing the k-th's top
    16 bits) as counted from the scores: picks, sum, max, past the lanes, past the buffer, the keys still needed."""
    from ds4f.kernels import indexer, topk_radix

    g = torch.Generator().manual_seed(23)
    k, L = 64, 5000
    vl = torch.tensor([5000, 3000, 700, 4000, 10, 4097, 2049, 0], dtype=torch.int32)
    s = _scores(len(vl), L, vl, g)
    s[5, :4097] = 1.0 + torch.randperm(4097, generator=g) * (3 * 2.0**-22)  # 4097 candidates: past 16 lanes, 64 cap
    want = [0, 0, 0, 0, 0, 0]
    key = sort_keys(s)
    for r in range(len(vl)):
        fin = key[r][(s[r] != float("-inf")) & (torch.arange(L) < vl[r])]
        if vl[r] <= 512 or fin.numel() < k:  # the small kernel's rows; fewer than k: every key, no pick
            continue
        hi = fin.sort(descending=True).values[k - 1] >> 16
        n = int(((fin >> 16) == hi).sum())
        want = [want[0] + 1, want[1] + n, max(want[2], n), want[3] + (n > 16), want[4] + (n > 64),
                want[5] + k - int(((fin >> 16) > hi).sum())]
    assert want[0] >= 4 and want[3] >= 1 and want[4] >= 1, want  # the case covers every counter
    was, topk_radix.STATS = topk_radix.STATS, True
    try:
        topk_radix._STATS.clear()
        got = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=vl, programs=3, small=512,
                                   cand=(16, 64))
        _same_top(got, s, k, vl)
        buf = topk_radix._STATS[s.device]
        assert buf.tolist() == want, (buf.tolist(), want)
        line = topk_radix.stats_line()
        assert f"picks on cpu: {want[0]}," in line and f"max {want[2]}," in line, line
        assert not buf.any() and topk_radix.stats_line() == ""  # read and cleared
    finally:
        topk_radix.STATS = was
        topk_radix._STATS.clear()
    print("topk stats equal")


def check_indexer_strided() -> None:
    from ds4f.kernels import indexer

    slots, seq, vl, (bf16, _) = _indexer_cases(3, [1100, 130, 0, 64])
    q, w, keys, di = bf16["q"], bf16["w"], bf16["k_pool"], 32
    ref = indexer_scores_ref(q, w, keys, slots, seq, vl, di**-0.5)
    one = indexer.indexer_scores(q, w, keys, slots, seq, vl, block_l=32, n_inner=1, zero_rank=True)
    for n_inner in (3, 4):  # 1100 columns: the last program's later blocks fall past L
        got = indexer.indexer_scores(q, w, keys, slots, seq, vl, block_l=32, n_inner=n_inner, zero_rank=True)
        assert torch.equal(got, one), n_inner
        got = indexer.indexer_scores(q, w, keys, slots, seq, vl, block_l=32, n_inner=n_inner, zero_rank=True,
                                     strided=False)
        assert torch.equal(got, one), (n_inner, "adjacent")
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(one)) and (one[~fin] == float("-inf")).all()
    torch.testing.assert_close(one[fin], ref[fin], atol=1e-3, rtol=1e-3)
    print("indexer strided equal")


def _indexer_cases(seed: int, vl: list[int], n: int = 1100, hi: int = 16, di: int = 32) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, list[dict]]:
    """Random indexer inputs, one sequence of n keys, a token per valid length -> (slots, seq, valid_len, the
    keyword arguments of indexer_scores' q / w / keys for bf16 keys, then for e4m3 keys and queries)."""
    from ds4f.kernels.fp8 import quantize_rows
    from ds4f.kernels.index_q import quant_heads_fp8

    g = torch.Generator().manual_seed(seed)
    t = len(vl)
    q = torch.randn(t, hi, di, generator=g).bfloat16()
    w = torch.randn(t, hi, generator=g)
    keys = torch.randn(n, di, generator=g).bfloat16()
    k8, ks = quantize_rows(keys, di)
    slots = torch.randperm(n, generator=g).int()[None]
    q8, qs = quant_heads_fp8(q)
    return slots, torch.zeros(t, dtype=torch.int32), torch.tensor(vl, dtype=torch.int32), [
        dict(q=q, w=w, k_pool=keys), dict(q=q8, w=w * qs, k_pool=k8, k_scale=ks.view(-1))]


def check_indexer_hist() -> None:
    """DS4F_INDEXER_HIST: the decode indexer's first-digit histogram equals the one counted from the scores it
    wrote (bf16 and e4m3 keys, strided and adjacent blocks, rows with valid lengths 0, short, past the small lanes,
    == L), the same scores as without it, and topk_indices over its buffer (first digit pass and zeroing skipped)
    picks the same top values as the plain radix path, with the small kernel on and off and both pick paths."""
    from ds4f.kernels import indexer

    slots, seq, vl, cases = _indexer_cases(13, [1100, 130, 0, 700, 513])
    t, k = len(vl), 64
    for kw in cases:
        for n_inner, strided in ((3, True), (4, False), (1, True)):
            kwi = dict(slots=slots, seq_of=seq, valid_len=vl, block_l=32, n_inner=n_inner, zero_rank=True,
                       strided=strided, **kw)
            buf = torch.zeros(4 * t * 256 + 2 * t, dtype=torch.int32)
            sc = indexer.indexer_scores(hist=buf, **kwi)
            assert torch.equal(sc, indexer.indexer_scores(**kwi)), (kw["q"].dtype, n_inner, strided)
            key = sort_keys(sc)
            fin = sc != float("-inf")
            want = torch.stack([torch.bincount(key[r][fin[r]] >> 24, minlength=256) for r in range(t)])
            assert torch.equal(buf[: t * 256].view(t, 256).long(), want), (kw["q"].dtype, n_inner, strided)
            assert not buf[t * 256:].any()  # the other levels and the counters stay zero for the top-k
            for small, cand in ((512, (512, 8192)), (0, (16, 64)), (512, (0, 0))):
                b2 = buf.clone()
                got = indexer.topk_indices(sc, k, block=256, backend="radix", valid_len=vl, programs=3, small=small,
                                           cand=cand, hist_buf=b2)
                _same_top(got, sc, k, vl)
    print("indexer hist equal")


def check_topk_sparse_add() -> None:
    """DS4F_TOPK_SPARSE_ADD: digit passes that add only their nonzero bins give the same picks (four passes + the
    compaction, and the candidate path), over ties, -0.0, -inf inside the valid range, short and empty rows."""
    from ds4f.kernels import indexer, topk_radix

    g = torch.Generator().manual_seed(17)
    k, L = 64, 3000
    vl = torch.tensor([3000, 2000, 1500, 700, 0, 65], dtype=torch.int32)
    s = _scores(len(vl), L, vl, g)
    topk_radix.SPARSE_ADD = True
    try:
        for cand in ((0, 0), (512, 8192), (16, 64)):
            got = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=vl, programs=3, small=0, cand=cand)
            _same_top(got, s, k, vl)
    finally:
        topk_radix.SPARSE_ADD = False
    print("sparse add equal")


def test_ordered_ref_matches_topk_ref() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 200, generator=g)  # distinct scores: the same set as torch.topk
    s[1, 50:] = float("-inf")
    for k in (16, 200, 300):
        a, b = ordered_ref(s, k, None), topk_indices_ref(s, k)
        assert all(set(a[r].tolist()) == set(b[r].tolist()) for r in range(3)), k


def test_topk_small_interpreted() -> None:
    out = run_interpreted("test_topk_small", "check_topk_small")
    assert "small rows ordered equal" in out and "one launch ordered equal" in out, out
    assert "early stop ordered equal" in out, out


@pytest.mark.parametrize("bad", ["500,8192", "512,256", "512"])
def test_topk_cand_knob_refused(bad: str) -> None:
    r = subprocess.run([sys.executable, "-c", "import ds4f.kernels.indexer"], capture_output=True, text=True,
                       env={**os.environ, "DS4F_TOPK_CAND": bad})
    assert r.returncode != 0 and "DS4F_TOPK_CAND" in r.stderr, r.stderr[-500:]


@pytest.mark.parametrize(("check", "says"), [
    ("check_topk_cand", "candidate top-k equal"), ("check_pool_rows", "pool rows equal"),
    ("check_pool_rows_long", "long pool rows equal"),
    ("check_indexer_strided", "indexer strided equal"), ("check_indexer_hist", "indexer hist equal"),
    ("check_topk_sparse_add", "sparse add equal"), ("check_topk_stats", "topk stats equal")])
def test_interpreted(check: str, says: str) -> None:
    out = run_interpreted("test_topk_small", check)
    assert says in out, out


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_topk_small_builds(arch: int) -> None:
    """The small kernel (both tiles, with and without the scratch zeroing) and the passes' early exit compile for
    sm_80 / sm_90 without a GPU (what only the compiler sees: layouts, shared memory of the 8192-lane histogram)."""
    from test_kernels_build import build, registers

    from ds4f.kernels import indexer as ix
    from ds4f.kernels import topk_small as ts

    t = dict(s_ptr="*fp32", vlen_ptr="*i32", hist_ptr="*i32", cnt_ptr="*i32", out_ptr="*i32", bt_ptr="*i64",
             win_ptr="*i32")
    for lanes, n2, zero, wp in ((8192, 2048, True, 0), (2048, 0, False, 0), (8192, 2048, False, 128)):
        c = dict(N=lanes, N2=n2, KP=512, NB=256, VLEN=True, ZERO=zero, WP=wp, ROWS=wp > 0)
        k = build(ts._topk_small, t, c, arch, 8)
        assert k["shared"] <= 160 * 1024
    for level in range(4):
        for sparse in (False, True):  # DS4F_TOPK_SPARSE_ADD: the masked adds
            build(ix._topk_hist, t, dict(LEVEL=level, NB=256, BLOCK=2048, VLEN=True, SMALL=8192, SPARSE=sparse),
                  arch)
    build(ix._topk_select, t, dict(NB=256, BLOCK=2048, VLEN=True, SMALL=8192), arch)
    from ds4f.kernels import topk_radix as tr

    tg = dict(t, cand_ptr="*i32", rows_ptr="*i32", st_ptr="*i64")
    for final, rows in ((False, False), (True, False), (True, True)):  # the gather launch with the fused pick
        for stats in (False, True):  # DS4F_TOPK_STATS' counters
            build(tr._topk_gather, tg, dict(NB=256, BLOCK=2048, VLEN=True, SMALL=8192, FINAL=final, NC=512,
                                            ROWS=rows, WP=128 if rows else 0, KP=512, STATS=stats and final), arch)
    if arch == 90:  # the decode launch at 1M as the runtime specializes it (3 stages, aligned pointers and strides):
        # 168 registers with triton 3.6; session 26's variant at 244 ran ~5 us longer per CSA layer in the model
        div = ("s_ptr", "vlen_ptr", "hist_ptr", "cnt_ptr", "out_ptr", "cand_ptr", "rows_ptr", "bt_ptr", "win_ptr",
               "k", "chunk", "s_lv", "CAP", "s_rt", "s_bt", "s_wt")
        k = build(tr._topk_gather, tg, dict(NB=256, BLOCK=2048, VLEN=True, SMALL=8192, FINAL=True, NC=512, ROWS=True,
                                            WP=128, KP=512), arch, 4, 3, div16=div)
        regs = registers(k)
        assert regs is None or regs <= 192, regs
