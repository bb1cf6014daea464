"""Decode top-k with the one-program-per-row kernel (ds4f.kernels.topk_small) on CUDA, inside a CUDA graph captured
once and replayed (twice per valid length) while valid_len changes on the device, as a decode graph serves every
depth: T in 1, 4, 16; L = 2048 and 262,144 (max_model_len 1M at ratio 4); valid_len 0 .. L. Against an ordered
torch oracle (keys above the k-th in ascending id, then the lowest tied ids, then -1) for rows of <= small entries
and rows in one radix chunk, torch.topk's values otherwise, and the former path (no small kernel, fill kernels).
Also the decode indexers (heads-major and keys-major, programs striding over key blocks) bit-equal to their
adjacent-block tilings."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON, indexer_scores, topk_indices
from ds4f.kernels.indexer import DECODE_KM, SMALL_KNOBS, TOPK_KNOBS
from ds4f.kernels.ref import indexer_scores_ref, topk_indices_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

K = 512
VLENS = (0, 100, 512, 2048, 8192, 262144)


def sort_keys(s: torch.Tensor) -> torch.Tensor:
    """fp32 scores -> their order-preserving uint32 radix keys (int64; -inf not special-cased)."""
    bits = s.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >> 31 != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


def indexer_inputs(seed: int, T: int, L: int, fp8: bool, hi: int = 64, d: int = 128) -> tuple[torch.Tensor, ...]:
    """Random decode indexer inputs over one sequence's L keys -> q, w, keys (bf16, or e4m3 with per-row scales ks),
    ks (None for bf16), slots [1, L], seq [T]."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, hi, d, device="cuda", generator=g).bfloat16()
    w = torch.randn(T, hi, device="cuda", generator=g)
    keys = torch.randn(L, d, device="cuda", generator=g).bfloat16()
    ks = None
    if fp8:
        ks = keys.float().abs().amax(1).clamp(min=1e-6) / 448
        keys = (keys.float() / ks[:, None]).to(torch.float8_e4m3fn)
    slots = torch.randperm(L, device="cuda", generator=g).int()[None]
    return q, w, keys, ks, slots, torch.zeros(T, dtype=torch.int32, device="cuda")


def ordered_ref(s: torch.Tensor, k: int, vlen: torch.Tensor) -> torch.Tensor:
    """[T, L] -> [T, k] int32 in the radix path's order, on the order-preserving uint32 key."""
    T, L = s.shape
    key = sort_keys(s)
    ar = torch.arange(L, device=s.device)
    valid = (s != float("-inf")) & (ar[None, :] < vlen.long()[:, None])
    key = torch.where(valid, key, 0)
    kk = min(k, L)
    n = valid.sum(1)
    full = n >= k
    kth = torch.where(full, key.topk(kk, dim=1).values[:, -1], 0)
    gt = valid & (key > kth[:, None])
    eq = valid & (key == kth[:, None]) & full[:, None]
    rank = torch.where(gt, ar, torch.where(eq, L + ar, 2 * L)).sort(dim=1).values[:, :kk]
    ids = torch.where(rank < 2 * L, rank % L, -1).int()
    return torch.cat([ids, ids.new_full((T, k - kk), -1)], 1)


def _same_top(got: torch.Tensor, s: torch.Tensor, k: int) -> None:
    """got's picks hold the k largest values of each row (a tied k-th's subset aside): as torch.topk's."""
    ref = topk_indices_ref(s, k)
    for r in range(s.shape[0]):
        a, b = got[r][got[r] >= 0].long(), ref[r][ref[r] >= 0].long()
        assert a.numel() == b.numel() and a.unique().numel() == a.numel(), r
        assert torch.equal(s[r, a].sort().values, s[r, b].sort().values), r


@pytest.mark.parametrize("T", [1, 4, 16])
@pytest.mark.parametrize("L", [2048, 262144])
def test_topk_small_graph(T: int, L: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(T + L)
    base = torch.randn(T, L, device="cuda", generator=g)
    base[T // 2:] = (base[T // 2:] * 8).round() / 8  # the upper rows: many ties at the k-th place
    scores = torch.empty_like(base)
    vl = torch.zeros(T, dtype=torch.int32, device="cuda")
    topk_indices(scores.fill_(0), K, valid_len=vl)  # compile outside the capture
    topk_indices(scores, K, valid_len=vl, small=0, cand=(0, 0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        new = topk_indices(scores, K, valid_len=vl)
        old = topk_indices(scores, K, valid_len=vl, small=0, cand=(0, 0))
    chunk = TOPK_KNOBS[0]  # rows within one chunk: the former path's order is deterministic too
    for v in VLENS:
        lens = torch.tensor([min(v + r * 7, L) for r in range(T)], dtype=torch.int32, device="cuda")
        vl.copy_(lens)
        cols = torch.arange(L, device="cuda")[None, :] >= lens.long()[:, None]
        scores.copy_(base.masked_fill(cols, float("-inf")))
        for _ in range(2):
            new.fill_(-7)
            graph.replay()
            torch.cuda.synchronize()
            want = ordered_ref(scores, K, lens)
            for r in range(T):
                n = int(lens[r])
                if n <= SMALL_KNOBS[0] or n <= chunk:
                    assert torch.equal(new[r], want[r]), (v, r)
                if n <= chunk:
                    assert torch.equal(old[r], want[r]), (v, r)
            _same_top(new, scores, K)
            _same_top(old, scores, K)


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_strided_equal(fp8: bool) -> None:
    T, d, L = 4, 128, 262144
    q, w, keys, ks, slots, seq = indexer_inputs(5, T, L, fp8, d=d)
    for lens in ([2048, 2049, 100, 0], [L, L - 5, 8192, 1]):
        vl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for n_l in (L, 2048):  # a long pool at short depth; a pool the size of the depth
            sl, v = slots[:, :n_l].contiguous(), vl.clamp(max=n_l)
            # the heads-major decode kernel (decode_km=()) and the keys-major one (the default), each strided
            # against its adjacent-block tiling
            for km in ((), DECODE_KM):
                kw = dict(k_scale=ks, zero_rank=True, decode_km=km)
                new = indexer_scores(q, w, keys, sl, seq, v, **kw)
                if km:
                    old = indexer_scores(q, w, keys, sl, seq, v, **kw, strided=False)
                else:
                    old = indexer_scores(q, w, keys, sl, seq, v, **kw, block_l=128, n_inner=4, num_warps=4,
                                         num_stages=3, strided=False)
                assert torch.equal(new, old), (lens, n_l, km)
    ref = indexer_scores_ref(q, w, keys, slots, seq, vl, d**-0.5, None if ks is None else ks[:, None])
    fin = torch.isfinite(ref)
    for km in ((), DECODE_KM):
        new = indexer_scores(q, w, keys, slots, seq, vl, k_scale=ks, decode_km=km)
        assert torch.equal(fin, torch.isfinite(new))
        assert ((new[fin] - ref[fin]).norm() / ref[fin].norm()).item() < 1e-4, km


@pytest.mark.parametrize("fp8", [False, True])
def test_indexer_hist_topk_graph(fp8: bool) -> None:
    # DS4F_INDEXER_HIST: the decode indexer counts the first radix digit (decode_hist_buffer), the top-k skips that
    # pass; in a CUDA graph replayed at several depths over a 262,144-entry pool: the histogram as counted from the
    # written scores, the scores bit-equal to the plain indexer's, the picks the k largest
    from ds4f.kernels import indexer as ix

    T, L = 2, 262144
    q, w, keys, ks, slots, seq = indexer_inputs(8, T, L, fp8)
    vl = torch.zeros(T, dtype=torch.int32, device="cuda")
    was, ix.INDEXER_HIST = ix.INDEXER_HIST, T
    try:
        def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            buf = ix.decode_hist_buffer(q, L, K)
            assert buf is not None
            sc = indexer_scores(q, w, keys, slots, seq, vl, k_scale=ks, zero_rank=True, hist=buf)
            h0 = buf[: T * 256].clone()
            return sc, h0, topk_indices(sc, K, valid_len=vl, hist_buf=buf)

        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
    finally:
        ix.INDEXER_HIST = was
    for lens in ([L, 9000], [8193, L - 3], [40000, 100]):
        vl.copy_(torch.tensor(lens, dtype=torch.int32))
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            sc, h0, got = out
            assert torch.equal(sc, indexer_scores(q, w, keys, slots, seq, vl, k_scale=ks, zero_rank=True)), lens
            key = sort_keys(sc)
            fin = sc != float("-inf")
            want = torch.stack([torch.bincount(key[r][fin[r]] >> 24, minlength=256) for r in range(T)])
            assert torch.equal(h0.view(T, 256).long(), want), lens
            for r in range(T):
                if lens[r] > SMALL_KNOBS[0]:  # the rows the radix path picks (the others: the small kernel)
                    ids = got[r][got[r] >= 0].long()
                    assert ids.numel() == K and ids.unique().numel() == K, lens
                    top = sc[r].topk(K).values.sort().values
                    assert torch.equal(sc[r, ids].sort().values, top), (lens, r)


@pytest.mark.parametrize("fused", [True, False])
def test_topk_pool_rows_long_graph(fused: bool) -> None:
    # decode's long pools (262,144 entries, DS4F_INDEXER_HIST): the attention rows written by the small kernel and
    # the gather launch's fused pick (topk_pool_rows_long) in a CUDA graph replayed at several depths, as
    # glue.topk_rows of the ids the separate-pick path selects from the same histogram (same sets: sorted rows);
    # DS4F_TOPK_FUSED_FINAL=0: no such path (None)
    from ds4f.kernels import indexer as ix
    from ds4f.kernels import topk_radix
    from ds4f.runner.gpu.glue import topk_rows

    T, L, W, epb, base = 2, 262144, 128, 64, 4096
    q, w, keys, ks, slots, seq = indexer_inputs(9, T, L, True)
    vl = torch.zeros(T, dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    bt = torch.randperm(1 << 14, device="cuda", generator=g)[: T * (L // epb)].view(T, -1)
    win = torch.randint(-1, 4000, (T, W), device="cuda", generator=g, dtype=torch.int32)
    was, ix.INDEXER_HIST, topk_radix.FUSED_FINAL = ix.INDEXER_HIST, T, fused
    try:
        def run() -> tuple[torch.Tensor, torch.Tensor | None]:
            buf = ix.decode_hist_buffer(q, L, K)
            assert buf is not None
            sc = indexer_scores(q, w, keys, slots, seq, vl, k_scale=ks, zero_rank=True, hist=buf)
            b2 = buf.clone()
            topk_radix.FUSED_FINAL = False
            ids = topk_indices(sc, K, valid_len=vl, hist_buf=b2)
            topk_radix.FUSED_FINAL = fused
            return ids, ix.topk_pool_rows_long(sc, K, vl, buf, bt, win, base, epb)

        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ids, rows = run()
    finally:
        ix.INDEXER_HIST, topk_radix.FUSED_FINAL = was, True
    if not fused:
        assert rows is None
        return
    assert rows is not None
    for lens in ([L, 9000], [8193, L - 3], [40000, 100], [0, 5]):
        vl.copy_(torch.tensor(lens, dtype=torch.int32))
        for _ in range(2):
            rows.fill_(-7)
            graph.replay()
            torch.cuda.synchronize()
            want = topk_rows(ids, bt, win, base, epb)
            assert torch.equal(rows[:, :W], want[:, :W]), lens
            assert torch.equal(rows[:, W:].sort(1).values, want[:, W:].sort(1).values), lens


@pytest.mark.parametrize("T", [1, 4, 16])
@pytest.mark.parametrize("L", [2048, 8192])
def test_topk_pool_rows_graph(T: int, L: int) -> None:
    """The top-k kernel writing attention rows itself (window rows, then pool rows) inside a replayed CUDA graph,
    equal to the ordered ids mapped by glue.topk_rows (the path it replaces), distinct and tied scores."""
    from ds4f.kernels.indexer import topk_pool_rows
    from ds4f.runner.gpu.glue import topk_rows

    g = torch.Generator(device="cuda").manual_seed(T * L)
    W, epb, base = 128, 64, 4096
    raw = torch.randn(T, L, device="cuda", generator=g)
    raw[T // 2:] = (raw[T // 2:] * 8).round() / 8
    scores, vl = torch.empty_like(raw), torch.zeros(T, dtype=torch.int32, device="cuda")
    bt = torch.randperm(1 << 14, device="cuda", generator=g)[: T * (L // epb)].view(T, -1)
    win = torch.randint(-1, 4000, (T, W), device="cuda", generator=g, dtype=torch.int32)
    topk_pool_rows(scores.fill_(0), K, vl, bt, win, base, epb)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = topk_pool_rows(scores, K, vl, bt, win, base, epb)
    assert got is not None
    for v in (0, 100, 512, 513, 2048, L - 3, L):
        lens = torch.tensor([min(v + r * 5, L) for r in range(T)], dtype=torch.int32, device="cuda")
        vl.copy_(lens)
        scores.copy_(raw.masked_fill(torch.arange(L, device="cuda")[None, :] >= lens.long()[:, None], float("-inf")))
        got.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, topk_rows(ordered_ref(scores, K, lens), bt, win, base, epb)), v
