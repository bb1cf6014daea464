"""⑥ kernels, GPU tests: each Triton kernel on CUDA against its pure-torch reference, V4-Flash widths and odd sizes."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON, fused_moe, indexer_scores, quantize_rows, sparse_attn, topk_indices
from ds4f.kernels.ref import fused_moe_ref, indexer_scores_ref, sparse_attn_ref, topk_indices_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

# tolerances (‖out - ref‖ / ‖ref‖ against fp32 references on the same bf16/fp8 inputs):
ATTN_TOL = 1.5e-2  # softmax weights are rounded to bf16 before the PV product
INDEX_TOL = 1e-4  # exact bf16 products, fp32 sums: only the summation order differs
# Hopper's fp8 MMA keeps fewer accumulator bits than fp32 (measured 1.1e-4 .. 1.3e-4 rel on the H200, 3 cases)
INDEX_FP8_TOL = 5e-4
MOE_TOL = 1.5e-2  # bf16 output; the activation is bf16 in both


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _attn_case(T, H, D, N, K, frac_invalid, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    pool = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    idx = torch.randint(0, N, (T, K), device="cuda", generator=g, dtype=torch.int32)
    idx[torch.rand(T, K, device="cuda", generator=g) < frac_invalid] = -1
    sink = torch.randn(H, device="cuda", generator=g)
    return q, pool, idx, sink


@pytest.mark.parametrize(
    "T,H,D,N,K,splits",
    [
        (1, 64, 512, 100_000, 640, None),  # decode, CSA layer: window 128 + top-512, split-K
        (1, 64, 512, 5_000, 192, None),  # decode, HCA layer
        (8, 64, 512, 100_000, 640, 1),  # no split
        (300, 64, 512, 20_000, 640, None),  # prefill
        (3, 20, 192, 1_000, 37, None),  # odd heads, width, key count
        (2, 16, 64, 50, 1, None),
    ],
)
def test_sparse_attn_bf16(T, H, D, N, K, splits):
    q, pool, idx, sink = _attn_case(T, H, D, N, K, 0.2, seed=T + K)
    idx[0, :] = -1  # a token with no valid key: o = 0
    o = sparse_attn(q, pool, idx, sink, D**-0.5, num_splits=splits)
    ref = sparse_attn_ref(q, pool, idx, sink, D**-0.5)
    assert torch.isfinite(o).all()
    assert (o[0] == 0).all()
    assert _rel(o, ref) < ATTN_TOL


@pytest.mark.parametrize(
    "T,K,ng,bcast", [(1, 640, 8, True), (64, 640, 8, True), (64, 640, 8, False), (5, 100, 1, True)]
)
def test_sparse_attn_fp8(T, K, ng, bcast):
    H, D, N = 64, 512, 50_000
    q, pool, idx, sink = _attn_case(T, H, D, N, K, 0.1, seed=7 + T)
    pool = (pool.float() * torch.logspace(-2, 2, N, device="cuda")[:, None]).bfloat16()  # rows of many magnitudes
    qp, sc = quantize_rows(pool, D // ng)
    o = sparse_attn(q, qp, idx, sink, D**-0.5, sc, scale_bcast=bcast)
    assert _rel(o, sparse_attn_ref(q, qp, idx, sink, D**-0.5, sc)) < ATTN_TOL


def test_sparse_attn_splits_agree():
    q, pool, idx, sink = _attn_case(2, 64, 512, 10_000, 1000, 0.3, seed=3)
    a = sparse_attn(q, pool, idx, sink, 512**-0.5, num_splits=1).float()
    for s in (2, 7, 31):
        b = sparse_attn(q, pool, idx, sink, 512**-0.5, num_splits=s).float()
        assert _rel(b, a) < 1e-2


@pytest.mark.parametrize("T,heads", [(1, 32), (1, 64), (4, 64)])
def test_sparse_attn_live_bound(T, heads):
    # HCA decode at a short context in 1M-sized tables: K = 128 window + 8192 entries, live keys few; with the key
    # splits sized by the capacity (DecodePolicy.dyn off) the live bound gives the same output (bf16 pool and
    # fp8_ds_mla split rows), splits past it skipped; sized by live (the default) the same up to rounding
    import importlib
    from dataclasses import replace

    from ds4f.kernels.fp8 import quantize_kv_rows

    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    D, N, K = 512, 20_000, 128 + 8192
    q, pool, idx, sink = _attn_case(T, heads, D, N, K, 0.0, seed=11 + T)
    live = torch.tensor([130, 128 + 3000, 1, 0][:T], device="cuda", dtype=torch.int32)
    idx[torch.arange(K, device="cuda")[None, :] >= live[:, None]] = -1
    nope, exp, rope = quantize_kv_rows(pool, 64)
    saved = sa.POLICY
    try:
        for dyn in (False, True):
            sa.POLICY = replace(saved, dyn=dyn)
            a = sparse_attn(q, pool, idx, sink, D**-0.5)
            b = sparse_attn(q, pool, idx, sink, D**-0.5, live=live)
            assert torch.equal(a, b) or dyn
            assert _rel(b, sparse_attn_ref(q, pool, idx, sink, D**-0.5)) < ATTN_TOL and _rel(b, a) < ATTN_TOL
            a = sparse_attn(q, nope, idx, sink, D**-0.5, exp, kv_rope=rope)
            b = sparse_attn(q, nope, idx, sink, D**-0.5, exp, kv_rope=rope, live=live)
            assert (torch.equal(a, b) or dyn) and _rel(b, a) < ATTN_TOL
    finally:
        sa.POLICY = saved


@pytest.mark.parametrize(
    "T,S,Hi,d,L,prefill",
    [
        (1, 1, 64, 128, 65_536, False),  # decode at 256K context
        (4, 4, 64, 128, 3_000, False),  # batched decode, one sequence each
        (513, 1, 64, 128, 2_048, True),  # prefill chunk, causal valid_len
        (7, 2, 20, 64, 333, False),  # odd sizes
    ],
)
def test_indexer_scores(T, S, Hi, d, L, prefill):
    g = torch.Generator(device="cuda").manual_seed(L)
    q = torch.randn(T, Hi, d, device="cuda", generator=g).bfloat16()
    w = torch.randn(T, Hi, device="cuda", generator=g)
    N = 4 * L
    kp = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    slots = torch.randint(0, N, (S, L), device="cuda", generator=g, dtype=torch.int32)
    seq_of = (torch.arange(T, device="cuda") * S // T).int()
    if prefill:  # token t sits at position 4L - T + t: valid entries (pos + 1) // 4
        vlen = ((4 * L - T + torch.arange(T, device="cuda") + 1) // 4).int()
    else:
        vlen = torch.randint(0, L + 1, (T,), device="cuda", generator=g, dtype=torch.int32)
        vlen[0] = L
    out = indexer_scores(q, w, kp, slots, seq_of, vlen)
    ref = indexer_scores_ref(q, w, kp, slots, seq_of, vlen)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    assert _rel(out[fin], ref[fin]) < INDEX_TOL
    kq, ks = quantize_rows(kp, d)
    out8 = indexer_scores(q, w, kq, slots, seq_of, vlen, k_scale=ks.view(-1))
    ref8 = indexer_scores_ref(q, w, kq, slots, seq_of, vlen, k_scale=ks)
    assert _rel(out8[fin], ref8[fin]) < INDEX_TOL
    if torch.cuda.get_device_capability() >= (8, 9):  # e4m3 queries (DS4F_INDEX_FP8): the fp8 MMA
        from ds4f.kernels.indexer import quant_heads_fp8

        q8, qs = quant_heads_fp8(q)
        outq = indexer_scores(q8, w * qs, kq, slots, seq_of, vlen, k_scale=ks.view(-1))
        refq = indexer_scores_ref(q8, w * qs, kq, slots, seq_of, vlen, k_scale=ks)
        assert torch.equal(torch.isfinite(outq), fin)
        assert _rel(outq[fin], refq[fin]) < INDEX_FP8_TOL


def test_indexer_scores_past_int32_elements():
    # a 1M-context prefill chunk: [8192, 262144] scores = 2^31 elements (int32 offsets wrapped: illegal access)
    T, L, Hi, d = 8200, 262_144, 16, 16
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(T, Hi, d, device="cuda", generator=g).bfloat16()
    w = torch.randn(T, Hi, device="cuda", generator=g)
    kp = torch.randn(L, d, device="cuda", generator=g).bfloat16()
    slots = torch.arange(L, device="cuda", dtype=torch.int32)[None]
    seq_of = torch.zeros(T, device="cuda", dtype=torch.int32)
    vlen = torch.full((T,), L, device="cuda", dtype=torch.int32)
    out = indexer_scores(q, w, kp, slots, seq_of, vlen)
    last = slice(T - 3, T)  # rows whose offsets pass 2^31
    ref = indexer_scores_ref(q[last], w[last], kp, slots, seq_of[last], vlen[last])
    assert _rel(out[last], ref) < INDEX_TOL


@pytest.mark.parametrize("T,L,k,n_valid", [(1, 262_144, 512, None), (3, 1000, 512, 300), (16, 40_000, 512, None)])
def test_topk_indices_same_set(T, L, k, n_valid):
    g = torch.Generator(device="cuda").manual_seed(L)
    s = torch.stack([torch.randperm(L, device="cuda", generator=g) for _ in range(T)]).float() / L - 0.5
    if n_valid is not None:
        s[:, n_valid:] = float("-inf")
    got = topk_indices(s, k)
    want = topk_indices_ref(s, k)
    assert got.shape == (T, k) and got.dtype == torch.int32
    for t in range(T):
        assert set(got[t].tolist()) == set(want[t].tolist())
    # per-row valid lengths (decode over a long max_ctx): the radix passes skip the -inf tail
    vl = torch.randint(1, L + 1, (T,), device="cuda", generator=g, dtype=torch.int32)
    vl[0] = min(L, 3 * k)
    s2 = s.masked_fill(torch.arange(L, device="cuda")[None, :] >= vl[:, None], float("-inf"))
    got2 = topk_indices(s2, k, valid_len=vl)
    want2 = topk_indices_ref(s2, k)
    for t in range(T):
        assert set(got2[t].tolist()) == set(want2[t].tolist())


def test_topk_indices_ties():
    g = torch.Generator(device="cuda").manual_seed(11)
    s = torch.randint(0, 40, (4, 50_000), device="cuda", generator=g).float()  # ~1250 copies of each value
    s[3, 100:] = float("-inf")
    got = topk_indices(s, 512)
    for t in range(3):
        ids = got[t].long()
        assert len(set(ids.tolist())) == 512 and (ids >= 0).all()
        rest = torch.ones(s.shape[1], dtype=torch.bool, device="cuda")
        rest[ids] = False
        assert s[t, ids].min() >= s[t, rest].max()
    assert set(got[3, :100].tolist()) == set(range(100)) and (got[3, 100:] == -1).all()


@pytest.mark.parametrize(
    "T,E,k,D,I",
    [
        (1, 256, 6, 4096, 2048),  # V4-Flash decode
        (64, 256, 6, 4096, 2048),  # batched decode
        (700, 256, 6, 4096, 2048),  # prefill (~16 picks per expert)
        (4000, 32, 6, 4096, 2048),  # prefill, many picks per expert
        (37, 10, 3, 200, 96),  # odd sizes
        (5, 10, 3, 200, 96),  # odd sizes, one block per pick
    ],
)
def test_fused_moe(T, E, k, D, I):
    g = torch.Generator(device="cuda").manual_seed(T + E)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * (3 / D**0.5)).bfloat16()
    w2 = (torch.randn(E, D, I, device="cuda", generator=g) / I**0.5).bfloat16()
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    wt = torch.rand(T, k, device="cuda", generator=g)
    out = fused_moe(x, w13, w2, ids, wt, 2.0)  # a small limit so the clamp is exercised
    ref = fused_moe_ref(x, w13, w2, ids, wt, 2.0)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < MOE_TOL
