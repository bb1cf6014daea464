"""⑦ the decode mHC launch with the sublayer's all-reduce inside it (ds4f/kernels/mhc_decode.py `ar`, DS4F_HC_AR) on
2 GPUs, through SymmAllReduce.hc_reducer's instance per token bucket (both buckets on here): for T = 1 / 4 and the
plain and ADD forms (fp32 partial + bf16 term) its four outputs equal, bit for bit, the push all-reduce's own launch
followed by the plain mHC launch at the same channels per program, eagerly and from a CUDA graph of 8 chained steps
replayed on new data while the ranks take turns to lag; prints the microseconds per step of both forms in a graph,
and of the separate launches at the mHC kernel's own default tile (what decode runs without DS4F_HC_AR)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from two_ranks import run_two_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

WORKER = r"""
from ds4f.kernels.mhc_decode import hc_step_decode
a = SymmAllReduce(store, rank, 2, dev, backend=pg, push=True, push_timeout_s=20)
assert sorted(a.hc_push) == [1, 4], a.hc_push
D, K, M, ITERS, EPS = 4096, 8, 32, 20, 1e-6

def weights(seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=dev)
    return (r(24, 4 * D) / (4 * D) ** 0.5, torch.rand(3, generator=g, device=dev) + 0.5, r(24) * 0.5,
            torch.rand(D, generator=g, device=dev) + 0.5)

def state(t, seed):  # streams, post, comb: the same on both ranks
    g = torch.Generator(device=dev).manual_seed(seed)
    return (torch.randn(t, 4, D, generator=g, device=dev).bfloat16(), 2 * torch.rand(t, 4, generator=g, device=dev),
            torch.softmax(torch.randn(t, 4, 4, generator=g, device=dev), -1))

def partial(t, seed, add):  # this rank's term: bf16, or fp32 + a bf16 extra
    g = torch.Generator(device=dev).manual_seed(seed * 7 + rank)
    y = torch.randn(t, D, generator=g, device=dev) * (rank + 1)
    return (y, torch.randn(t, D, generator=g, device=dev).bfloat16()) if add else (y.bfloat16(), None)

def fused(y, e, x, post, comb, w):
    ar = a.hc_reducer(y.shape[0], y.numel())
    return hc_step_decode(y, x, post, comb, *w, ITERS, EPS, EPS, EPS, split_sinkhorn=True, ar=ar, extra=e)

def plain(y, e, x, post, comb, w, own_tile=False):  # own_tile: the mHC kernel's default channels per program
    s = a.push(y) if e is None else a.push(y, e)
    bd = None if own_tile else a.hc_reducer(y.shape[0], y.numel()).block
    return hc_step_decode(s, x, post, comb, *w, ITERS, EPS, EPS, EPS, block_d=bd, split_sinkhorn=True)

def default(y, e, x, post, comb, w):
    return plain(y, e, x, post, comb, w, own_tile=True)

def chain(f, ys, x, post, comb, w):  # K sublayer boundaries: each step's streams / post / comb feed the next
    outs = []
    for y, e in ys:
        x, xn, post, comb = f(y, e, x, post, comb, w)
        outs += [x, xn, post, comb]
    return outs

w = weights(1)
for t in (1, 4):
    for add in (False, True):
        x, post, comb = state(t, 2)
        ys = [partial(t, 10 + k, add) for k in range(K)]
        want = chain(plain, ys, x, post, comb, w)
        got = chain(fused, ys, x, post, comb, w)
        torch.cuda.synchronize()
        assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want)), (t, add, "eager")
        # a graph of the K fused steps on static inputs, replayed on new data, one rank lagging now and then
        graph, outs = capture(lambda: chain(fused, ys, x, post, comb, w))
        for rep in range(6):
            new = [partial(t, 100 * rep + k, add) for k in range(K)]
            for (y, e), (ny, ne) in zip(ys, new):
                y.copy_(ny)
                if e is not None:
                    e.copy_(ne)
            if rep % 2 == rank:
                torch.cuda._sleep(50000)
            graph.replay()
            want = chain(plain, ys, x, post, comb, w)
            torch.cuda.synchronize()
            assert all(torch.equal(o, w_) for o, w_ in zip(outs, want)), (t, add, "graph", rep)
        for name, f in (("fused", fused), ("push + mHC", plain), ("push + mHC at its own tile", default)):
            us = graph_us(lambda: [chain(f, ys, x, post, comb, w) for _ in range(M // K)], M)
            lines.append(f"rank {rank} T={t} add={int(add)} {name}: {us:.2f} us per sublayer boundary in a CUDA graph")
assert all(h.error() == 0 for h in a.hc_push.values()) and a.push.error() == 0
"""


def test_hc_ar_equals_push_then_mhc(tmp_path: Path) -> None:
    for text in run_two_ranks(WORKER, tmp_path, env={"DS4F_HC_AR": "1,4"}):
        print(text)
