"""The two-launch decode top-k of long rows (ds4f.kernels.topk_long) and the indexer's fused first-digit histogram,
under the Triton interpreter (CPU, a subprocess each): the histogram the indexer adds equals the torch count of the
keys it wrote; the picks as sets (their scores) against topk_indices_ref and, mapped to pool rows, against
glue.topk_rows over it; rows short enough for one program, long rows over several chunk programs, ties at the k-th
place (fewer than and more than the candidate list holds: the finisher's rescan), fewer finite keys than k inside a
long valid length, valid length 0; the state back at zero after every call, and two calls in a row."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted

pytest.importorskip("triton")


def _same_picks(got: torch.Tensor, s: torch.Tensor, k: int, vl: torch.Tensor) -> None:
    from ds4f.kernels.ref import topk_indices_ref

    L = s.shape[1]
    masked = torch.where(torch.arange(L)[None, :] < vl.long()[:, None], s, float("-inf"))
    ref = topk_indices_ref(masked, k)
    for r in range(s.shape[0]):
        a, b = got[r][got[r] >= 0], ref[r][ref[r] >= 0]
        assert a.numel() == b.numel(), (r, a.numel(), b.numel())
        assert a.unique().numel() == a.numel(), r
        assert torch.equal(masked[r, a.long()].sort().values, masked[r, b.long()].sort().values), r
        assert (got[r][a.numel():] == -1).all(), r


def check_topk_long() -> None:
    from ds4f.kernels import topk_long
    from ds4f.kernels.ref import topk_indices_ref
    from ds4f.runner.gpu.glue import topk_rows

    g = torch.Generator().manual_seed(5)
    st = topk_long.State(torch.zeros(topk_long.MAX_ROWS, topk_long.ROW, dtype=torch.int32))
    k, L = 48, 6000
    vl = torch.tensor([6000, 300, 0, 5000, 1500, 5999, 4700, 2100], dtype=torch.int32)
    s = torch.randn(len(vl), L, generator=g) * torch.tensor([1, 1, 1, 1e-3, 1e4, 1, 1, 1.0])[:, None]
    s[5, :4500] = 2.5  # 4500 tied at the k-th place: more than the candidate list holds (rescan)
    s[5, 4500:4510] = 3.0
    s[6, 1000:1200] = 7.0  # 200 tied, k inside them: candidates only
    s[7, torch.randperm(2100, generator=g)[:2080]] = float("-inf")  # 20 finite < k in a long valid length
    s[torch.arange(L)[None, :] >= vl.long()[:, None]] = float("-inf")
    for lanes in (512, 4096):  # 4096: rows <= 2048 take the narrow tile, <= 4096 the wide one
        for rep in range(2):  # the second call finds the state the first one re-armed
            st.buf[: len(vl), : topk_long.NB] = topk_long.hist_ref(s, vl)
            ids = topk_long.select(s, vl, k, st, lanes, 4, block=256, programs=5)
            _same_picks(ids, s, k, vl)
            assert st.armed(), (lanes, rep)
    print("ids match")
    bt = torch.randperm(64, generator=g)[None, :].repeat(len(vl), 1)
    win = torch.arange(len(vl) * 16, dtype=torch.int32).view(len(vl), 16)
    st.buf[: len(vl), : topk_long.NB] = topk_long.hist_ref(s, vl)
    rows = topk_long.select(s, vl, k, st, 512, 4, block=256, programs=5, rows=(bt, win, 1000, 100))
    assert st.armed()
    masked = torch.where(torch.arange(L)[None, :] < vl.long()[:, None], s, float("-inf"))
    want = topk_rows(topk_indices_ref(masked, k), bt, win, 1000, 100)
    assert torch.equal(rows[:, :16], win)
    for r in range(len(vl)):
        if r != 5:  # row 5's tied k-th: an arbitrary subset of the ties (compared as scores above)
            assert torch.equal(rows[r].sort().values, want[r].sort().values), r
    print("rows match")


def check_indexer_hist() -> None:
    from ds4f.kernels import indexer, topk_long
    from ds4f.kernels.ref import topk_indices_ref

    g = torch.Generator().manual_seed(6)
    T, HI, DI, L = 3, 8, 32, 3000
    q = torch.randn(T, HI, DI, generator=g).bfloat16()
    w = torch.randn(T, HI, generator=g)
    keys = torch.randn(4000, DI, generator=g).bfloat16()
    slots = torch.randperm(4000, generator=g)[:L].int()[None].repeat(2, 1).contiguous()
    seq = torch.tensor([0, 1, 1], dtype=torch.int32)
    vl = torch.tensor([3000, 700, 2500], dtype=torch.int32)
    st = topk_long.State(torch.zeros(topk_long.MAX_ROWS, topk_long.ROW, dtype=torch.int32))
    sc = indexer.indexer_scores(q, w, keys, slots, seq, vl, block_l=64, n_inner=4, token_block=1, zero_rank=True,
                                hist=st.hist0)
    assert torch.equal(st.buf[:T, : topk_long.NB], topk_long.hist_ref(sc, vl))
    assert topk_long.State(st.buf[T:]).armed()
    ids = topk_long.select(sc, vl, 64, st, 1024, 4, block=256, programs=4)
    _same_picks(ids, sc, 64, vl)
    assert torch.equal(ids.sort(1).values, topk_indices_ref(sc, 64).sort(1).values)
    assert st.armed()
    print("indexer hist match")


def test_topk_long_interpreted() -> None:
    out = run_interpreted("test_topk_long", "check_topk_long", timeout=900)
    assert "ids match" in out and "rows match" in out, out


def test_indexer_hist_interpreted() -> None:
    out = run_interpreted("test_topk_long", "check_indexer_hist", timeout=900)
    assert "indexer hist match" in out, out


def test_hist_ref_counts_finite_keys_below_valid_len() -> None:
    from ds4f.kernels import topk_long

    s = torch.tensor([[1.0, -1.0, float("-inf"), 0.0, -0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    h = topk_long.hist_ref(s, torch.tensor([6, 2], dtype=torch.int32))
    assert h.shape == (2, topk_long.NB) and h[0].sum() == 5 and h[1].sum() == 2
    key = topk_long.sort_key(s)
    assert key[0, 2] == 0 and key[0, 4] < key[0, 3] < key[0, 0] < key[0, 5] and key[0, 1] < key[0, 4]
    assert int(h[0, int(key[0, 5]) >> 24]) >= 1
