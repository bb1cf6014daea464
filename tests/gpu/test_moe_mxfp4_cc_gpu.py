"""⑥ kernels, the CUDA-core MXFP4 decode (moe_mxfp4_cc) on CUDA: the two launches with the PTX word routine against
cc_ref (the same bf16 roundings written out in torch) and the exact reference at the V4-Flash TP=2 width, T = 1 / 4,
with a repeated pick, the shared expert's output, re-armed counters; graph replay and the DS4F_MXFP4_CC dispatch."""

from __future__ import annotations

import pytest
import torch
from test_moe_mxfp4_gpu import _case, _rel

from bench.common import graph_out
from ds4f.kernels import HAS_TRITON, arrival
from ds4f.kernels import moe_mxfp4_cc as mcc
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4, fused_moe_mxfp4_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

SHAPES = [(16, 4096, 1024, 1, 6), (16, 4096, 1024, 4, 6)]  # (E, D, I, T, k)
# (up, down) tiles: the table's, then other row tiles, splits, warps and depths
TILES = [(*mcc.CONFIGS[(4096, 1024, 1)][0], *mcc.CONFIGS[(4096, 1024, 1)][1]),
         (16, 256, 8, 4, 1, 64, 256, 1, 4, 2), (64, 256, 2, 8, 2, 16, 256, 4, 2, 1)]


@pytest.mark.parametrize("sub", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_cc_matches_its_written_out_math(shape, sub, monkeypatch):
    # sub: the weights as value * 2^-126 against x * 2^100 (the bf16x2 FMAs must take the subnormal code 1 exactly)
    monkeypatch.setattr(mcc, "SUB", sub)
    E, D, I, T, k = shape
    x, w13q, w13s, w2q, w2s, ids, wts = _case(E, D, I, T, k, seed=D + T)
    ids[-1, 1] = ids[-1, 0]  # a repeated expert inside one token's picks
    ref = mcc.cc_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    exact = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    for tiles in TILES:
        for _ in range(2):  # the arrival counters re-armed
            out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, CC=1))
            assert _rel(out, ref) < 2e-3 and _rel(out, exact) < 1e-2, (tiles, _rel(out, ref), _rel(out, exact))
    sh = torch.randn(x.shape, device="cuda").bfloat16()
    out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=TILES[0], CC=1), shared_out=sh)
    assert _rel(out, ref.float() + sh.float()) < 5e-3
    torch.cuda.synchronize()
    assert all(int(b.abs().sum()) == 0 for n in ("mxfp4_cc_up", "mxfp4_cc_down") for b in arrival.buffers(n))


def test_cc_graph_replay_and_dispatch(monkeypatch):
    from ds4f.kernels import moe_mxfp4_decode as md

    E, D, I, T, k = SHAPES[1]
    x, w13q, w13s, w2q, w2s, ids, wts = _case(E, D, I, T, k, seed=5)
    monkeypatch.setattr(mcc, "ENABLED", True)
    forms: list[str] = []
    real = md.moe_decode
    monkeypatch.setattr(md, "moe_decode", lambda *a, **kw: forms.append(kw.get("form", "dec")) or real(*a, **kw))
    eager = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert forms == ["cc"] and _rel(eager, mcc.cc_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)) < 2e-3
    got, replay = graph_out(lambda: fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0))
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    assert torch.equal(got, eager)
