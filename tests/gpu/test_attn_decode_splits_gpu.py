"""⑥ sparse attention at the 1M-context decode shape of an HCA layer on one TP=2 rank (1 token, 32 heads of 512,
fp8 rows, 128 window + 8192 entry keys, live bound): the default split count (capped at MAX_SPLITS, combine over
4 splits per iteration) and the uncapped 130 splits both match the reference; both timed (printed, not asserted).
The decode policies (DecodePolicy: live-sized splits, in-kernel combine, -1 block skip, no split) at the real
layer shapes (SWA / CSA / HCA lists at 8K and 1M capacity, short and full live counts, inverse-RoPE epilogue)
against the reference, also replayed from a CUDA graph (the arrival counts re-arm: replays agree, counts end at 0)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import time_us
from ds4f.kernels import HAS_TRITON, arrival, sparse_attn
from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.ref import sparse_attn_ref
from ds4f.kernels.rope import rope_ref

sa = importlib.import_module("ds4f.kernels.sparse_attn")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T", [1, 4])
def test_decode_splits_at_1m(T: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(T)
    H, D, N, K = 32, 512, 20000, 128 + 8192
    nope, exp, rope = quantize_kv_rows(torch.randn(N, D, device="cuda", generator=g), 64)
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    idx = torch.randint(0, N, (T, K), device="cuda", generator=g, dtype=torch.int32)
    live = torch.full((T,), K, dtype=torch.int32, device="cuda")
    sink = torch.randn(H, device="cuda", generator=g)
    want = sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rope), idx, sink, D**-0.5).float()
    times = {}
    for name, kw in (("default", {}), ("130 splits", {"num_splits": 130})):
        def run(kw=kw):
            return sparse_attn(q, nope, idx, sink, D**-0.5, exp, kv_rope=rope, live=live, **kw)

        assert _rel(run().float(), want) < 1.5e-2, name
        times[name] = time_us(run, iters=20, flush=False)  # CUDA-graph replays: no Python launch gaps
    print(f"T={T} HCA decode attention at 1M: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))


def _replays_agree(run: Callable[[], torch.Tensor], got: torch.Tensor, tag: tuple) -> None:
    """run captured in a CUDA graph: each replay writes got's bits again and leaves the arrival counts at zero (a
    count left armed would leave the finisher's o unwritten: zeroed before each replay here)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got), tag
    assert all(int(c.abs().sum()) == 0 for c in arrival.buffers("sparse_attn")), tag


# (kind, K columns, valid window rows, valid entry rows, live bound?) at depth 64 and full lists
LISTS = [("SWA", 128, 65, 0, False), ("SWA", 128, 128, 0, False), ("CSA", 640, 65, 16, False),
         ("CSA", 640, 128, 512, False), ("HCA8K", 192, 65, 0, True), ("HCA8K", 192, 128, 64, True),
         ("HCA1M", 8320, 65, 0, True), ("HCA1M", 8320, 128, 1024, True), ("HCA1M", 8320, 128, 8192, True)]


@pytest.mark.parametrize("H,T", [(32, 1), (64, 4)])
def test_decode_policies_at_layer_shapes(H: int, T: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(H + T)
    D, N = 512, 50000
    nope, exp, rope = quantize_kv_rows(torch.randn(N, D, device="cuda", generator=g), 64)
    rows = dequantize_kv_rows(nope, exp, rope)
    sink = torch.randn(H, device="cuda", generator=g)
    new = sa.DecodePolicy()
    pols = {"old": sa.OLD_POLICY, "new": new}
    if H == 32:
        pols |= {"fuse0": replace(new, fuse_max=0), "nosplit": replace(new, nosplit_k=sa.LONG_K - 1)}
    saved = sa.POLICY
    try:
        for kind, K, wv, ev, has_live in LISTS:
            q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
            idx = torch.full((T, K), -1, dtype=torch.int32, device="cuda")
            idx[:, :wv] = torch.randint(0, N, (T, wv), device="cuda", generator=g, dtype=torch.int32)
            idx[:, 128: 128 + ev] = torch.randint(0, N, (T, ev), device="cuda", generator=g, dtype=torch.int32)
            live = torch.full((T,), 128 + ev, dtype=torch.int32, device="cuda") if has_live else None
            cos, sin = (torch.randn(T, 32, device="cuda", generator=g) for _ in range(2))
            want = rope_ref(sparse_attn_ref(q, rows, idx, sink, D**-0.5), cos, sin, True).float()
            for name, pol in pols.items():
                sa.POLICY = pol
                run = partial(sparse_attn, q, nope, idx, sink, D**-0.5, exp, kv_rope=rope, live=live,
                              inv_rope=(cos, sin))
                got = run()
                assert _rel(got.float(), want) < 1.5e-2, (kind, K, wv, ev, name)
                _replays_agree(run, got, (kind, K, wv, ev, name))
    finally:
        sa.POLICY = saved
