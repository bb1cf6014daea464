"""⑥ sparse attention at the 1M-context decode shape of an HCA layer on one TP=2 rank (1 token, 32 heads of 512,
fp8 rows, 128 window + 8192 entry keys, live bound): the default split count (capped at MAX_SPLITS, combine over
4 splits per iteration) and the uncapped 130 splits both match the reference; both timed (printed, not asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import time_us
from ds4f.kernels import HAS_TRITON, sparse_attn
from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.ref import sparse_attn_ref

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
