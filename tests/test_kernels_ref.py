"""⑥ kernels, CPU tests: the pure-torch references (ds4f/kernels/ref.py) against straightforward float64 math."""

from __future__ import annotations

import math

import pytest
import torch

from ds4f.kernels import fused_moe, indexer_scores, moe_align, quantize_rows, sparse_attn, topk_indices
from ds4f.kernels.fp8 import dequantize_rows
from ds4f.kernels.ref import (
    fused_moe_ref,
    indexer_scores_ref,
    sparse_attn_ref,
    swiglu_clamp,
    topk_indices_ref,
)


def _attn_dense(q, pool, idx, sink, scale):
    """Per (t, h): explicit logits over the valid picks plus a sink column, softmax in float64, sink dropped."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for t in range(T):
        ids = [int(i) for i in idx[t] if i >= 0]
        rows = pool[ids].double()  # [n, D]
        for h in range(H):
            logits = torch.cat([rows @ q[t, h].double() * scale, sink[h].double().view(1)])
            p = torch.softmax(logits, 0)[:-1]
            out[t, h] = p @ rows
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_sparse_attn_ref_matches_dense_softmax_with_sink_column():
    g = torch.Generator().manual_seed(0)
    T, H, D, N, K = 4, 5, 32, 40, 12
    q = torch.randn(T, H, D, generator=g)
    pool = torch.randn(N, D, generator=g)
    idx = torch.randint(0, N, (T, K), generator=g, dtype=torch.int32)
    idx[1, ::3] = -1
    idx[2] = -1  # no valid key: the sink alone is in the denominator, so o = 0
    sink = torch.randn(H, generator=g)
    o = sparse_attn_ref(q, pool, idx, sink, D**-0.5)
    ref = _attn_dense(q, pool, idx, sink, D**-0.5)
    assert _rel(o, ref) < 1e-5
    assert torch.all(o[2] == 0)
    # sink = -inf is plain softmax attention; the output is a convex combination of the rows
    o2 = sparse_attn_ref(q[:2], pool, idx[:2], torch.full((H,), -math.inf), D**-0.5)
    assert _rel(o2, _attn_dense(q[:2], pool, idx[:2], torch.full((H,), -math.inf), D**-0.5)) < 1e-5


def test_sparse_attn_ref_ignores_order_and_padding():
    g = torch.Generator().manual_seed(1)
    q, pool, sink = torch.randn(2, 3, 16, generator=g), torch.randn(30, 16, generator=g), torch.randn(3, generator=g)
    idx = torch.randint(0, 30, (2, 10), generator=g, dtype=torch.int32)
    perm = idx[:, torch.randperm(10, generator=g)]
    padded = torch.cat([idx, torch.full((2, 7), -1, dtype=torch.int32)], 1)
    base = sparse_attn_ref(q, pool, idx, sink, 0.25)
    assert torch.allclose(sparse_attn_ref(q, pool, perm, sink, 0.25), base, atol=1e-6)
    assert torch.allclose(sparse_attn_ref(q, pool, padded, sink, 0.25), base, atol=1e-6)


def test_fp8_rows_roundtrip_and_exact_bf16_dequant():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 128, generator=g) * torch.logspace(-3, 2, 50)[:, None]
    qx, sc = quantize_rows(x, 64)
    assert qx.dtype == torch.float8_e4m3fn and sc.shape == (50, 2)
    assert torch.equal(torch.exp2(torch.log2(sc).round()), sc)  # power-of-two scales
    back = dequantize_rows(qx, sc, torch.float32)
    assert torch.equal(back.bfloat16().float(), back)  # exact in bf16
    assert ((back - x).abs() <= x.abs() * 2**-3 + sc.repeat_interleave(64, 1) * 2**-9).all()
    # the fp8 reference path is the bf16 path on the dequantized pool
    q, idx, sink = torch.randn(3, 4, 128, generator=g), torch.randint(-1, 50, (3, 9), dtype=torch.int32), torch.zeros(4)
    a = sparse_attn_ref(q, qx, idx, sink, 0.1, sc)
    b = sparse_attn_ref(q, back.bfloat16(), idx, sink, 0.1)
    assert torch.equal(a, b)


def test_indexer_scores_ref_matches_loops():
    g = torch.Generator().manual_seed(3)
    T, Hi, d, N, L = 6, 4, 16, 60, 20
    q, w = torch.randn(T, Hi, d, generator=g), torch.randn(T, Hi, generator=g)
    kp = torch.randn(N, d, generator=g)
    slots = torch.randint(0, N, (2, L), generator=g, dtype=torch.int32)
    seq_of = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.int32)
    vlen = torch.tensor([(t + 1) // 4 * 5 for t in range(T)], dtype=torch.int32).clamp(max=L)
    s = indexer_scores_ref(q, w, kp, slots, seq_of, vlen)
    for t in range(T):
        for l in range(L):
            if l >= vlen[t]:
                assert s[t, l] == -math.inf
                continue
            k = kp[slots[seq_of[t], l]].double()
            want = sum(w[t, h].double() * torch.relu(q[t, h].double() @ k) for h in range(Hi)) * d**-0.5
            assert abs(s[t, l].item() - want.item()) < 1e-4 * (1 + abs(want.item()))


def test_topk_indices_ref_sets_and_padding():
    g = torch.Generator().manual_seed(4)
    s = torch.randperm(100, generator=g).float().view(2, 50)
    s[1, 10:] = -math.inf  # only 10 valid entries in row 1
    ids = topk_indices_ref(s, 16)
    assert ids.dtype == torch.int32 and ids.shape == (2, 16)
    assert set(ids[0].tolist()) == set(torch.argsort(s[0], descending=True)[:16].tolist())
    assert set(ids[1, :10].tolist()) == set(range(10)) and (ids[1, 10:] == -1).all()
    assert (topk_indices_ref(s[:, :5], 8)[:, 5:] == -1).all()  # L < k pads with -1


def test_swiglu_clamp_and_moe_ref_match_per_token_math():
    h = torch.tensor([[20.0, -3.0, 30.0, -30.0]])
    assert torch.allclose(swiglu_clamp(h, 10.0), torch.tensor([[10 * torch.sigmoid(torch.tensor(10.0)) * 10,
                                                                 -3 * torch.sigmoid(torch.tensor(-3.0)) * -10]]))
    g = torch.Generator().manual_seed(5)
    T, E, k, D, I, lim = 7, 5, 2, 24, 12, 1.5
    x = torch.randn(T, D, generator=g).bfloat16()
    w13 = torch.randn(E, 2 * I, D, generator=g).bfloat16()
    w2 = (torch.randn(E, D, I, generator=g) * 0.3).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    wt = torch.rand(T, k, generator=g)
    out = fused_moe_ref(x, w13, w2, ids, wt, lim)
    want = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            gate = w13[e, :I].double() @ x[t].double()
            up = w13[e, I:].double() @ x[t].double()
            a = (torch.nn.functional.silu(gate.clamp(max=lim)) * up.clamp(-lim, lim)).bfloat16().double()
            want[t] += wt[t, j].double() * (w2[e].double() @ a)
    assert _rel(out.float(), want) < 1e-2


def test_moe_align_groups_picks_by_expert():
    g = torch.Generator().manual_seed(6)
    T, k, E, bm = 9, 3, 6, 4
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    sid, be = moe_align(ids, E, bm)
    flat = ids.view(-1)
    real = sid[sid < T * k]
    assert sorted(real.tolist()) == list(range(T * k))  # every pick exactly once
    for b, e in enumerate(be.tolist()):
        blk = sid[b * bm:(b + 1) * bm]
        picks = blk[blk < T * k]
        if e < 0:
            assert picks.numel() == 0
        else:
            assert picks.numel() > 0 and (flat[picks.long()] == e).all()


def test_wrappers_fall_back_to_refs_on_cpu_and_assert_inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 32, generator=g).bfloat16()
    pool = torch.randn(10, 32, generator=g).bfloat16()
    idx = torch.randint(-1, 10, (2, 5), generator=g, dtype=torch.int32)
    sink = torch.zeros(4)
    assert torch.equal(sparse_attn(q, pool, idx, sink, 0.2), sparse_attn_ref(q, pool, idx, sink, 0.2))
    with pytest.raises(AssertionError):
        sparse_attn(q.float(), pool, idx, sink, 0.2)
    with pytest.raises(AssertionError):
        sparse_attn(q, pool, idx.long(), sink, 0.2)
    w = torch.randn(2, 4, generator=g)
    slots = torch.randint(0, 10, (1, 6), dtype=torch.int32)
    seq_of, vlen = torch.zeros(2, dtype=torch.int32), torch.tensor([3, 6], dtype=torch.int32)
    s = indexer_scores(q, w, pool, slots, seq_of, vlen)
    assert torch.equal(s, indexer_scores_ref(q, w, pool, slots, seq_of, vlen))
    assert torch.equal(topk_indices(s, 4), topk_indices_ref(s, 4))
    x = torch.randn(3, 32, generator=g).bfloat16()
    w13, w2 = torch.randn(4, 16, 32, generator=g).bfloat16(), torch.randn(4, 32, 8, generator=g).bfloat16()
    ids, wt = torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32), torch.rand(3, 2, generator=g)
    assert torch.equal(fused_moe(x, w13, w2, ids, wt, 10.0), fused_moe_ref(x, w13, w2, ids, wt, 10.0))
