"""⑥ kernels, the f16x2 FP8 decode GEMV (ds4f/kernels/fp8_gemv_h2.py) on CUDA: against fp8_linear_ref at the
per-rank V4-Flash TP=2 shapes (grouped wo_a included), T = 1-4, K splits with re-armed counters, against its own
roundings written out (the interpreter's branch on the GPU), activations across f16's range, CUDA-graph replay and
fp8_linear's dispatch by DS4F_FP8_GEMV_H2's buckets."""

from __future__ import annotations

import pytest
import torch
from test_fp8_gemv_cc_gpu import SHAPES, _rel, _weights, check_tiles  # TP=2 shapes, error norm, weights, tiles

from bench.common import graph_out
from ds4f.kernels import HAS_TRITON, arrival, fp8_gemv_h2
from ds4f.kernels.fp8_gemm import Opts, _scale_arg, fp8_linear, fp8_linear_ref, grouped_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

OUT_TOL = 6e-3  # bf16 outputs (2^-9) and the f16 products / chains (2^-11 per rounding)


@pytest.mark.parametrize("shape", SHAPES)
def test_h2_matches_the_reference(shape):
    nt, k, groups = shape
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    for t in (1, 2, 3, 4):
        x = torch.randn(t, groups, k, device="cuda").bfloat16()
        want = grouped_ref(x, w, s)
        check_tiles(fp8_gemv_h2.launch_h2, x, w, ws, e8m0, want,
                    fp8_gemv_h2.config(nt, k, groups, t) or ((64, 4, 4), 1), OUT_TOL)
    torch.cuda.synchronize()
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv_h2"))


@pytest.mark.parametrize("t", [1, 4])
def test_h2_matches_its_emulation(t):
    """The f16x2 asm (cvt, mul, fma, add) against the same roundings written out; activations from f16 subnormals
    to |x| ~ 2000 (the decode's 2^-8 keeps every chain finite)."""
    nt, k = 4096, 4096
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    span = torch.logspace(-6, 3.3, k // 128, device="cuda").repeat_interleave(128)
    for x in (torch.randn(t, 1, k, device="cuda").bfloat16(), (torch.randn(t, 1, k, device="cuda") * span).bfloat16()):
        outs = []
        for emulate in (False, True):
            out = torch.empty(t, 1, nt, dtype=torch.float32, device="cuda")
            fp8_gemv_h2.launch_h2(x, w, ws, e8m0, out, 1, (64, 4, 4), emulate=emulate)
            outs.append(out)
        assert outs[0].isfinite().all()
        assert _rel(outs[0], outs[1]) < 1e-4  # fused vs rounded-from-fp32 fmas: rare last-bit differences only
        assert _rel(outs[0][:, 0], fp8_linear_ref(x[:, 0], w, s, torch.float32)) < 4e-3


def test_h2_graph_replay_and_dispatch(monkeypatch):
    nt, k = 4096, 4096  # WO_B_TP2: a table shape
    w, s = _weights(nt, k)
    calls: list[int] = []
    real = fp8_gemv_h2.launch_h2
    monkeypatch.setattr(fp8_gemv_h2, "launch_h2", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(fp8_gemv_h2, "BUCKETS", frozenset({4}))
    monkeypatch.setattr(fp8_gemv_h2, "CONFIGS_H2", {"WO_B_TP2": {4: (64, 4, 4, 1)}})
    x1 = torch.randn(1, k, device="cuda").bfloat16()
    fp8_linear(x1, w, s, opts=Opts(gemv=True))
    assert calls == []  # one token: not in the buckets
    x = torch.randn(4, k, device="cuda").bfloat16()
    eager = fp8_linear(x, w, s, opts=Opts(gemv=True))
    assert calls == [1] and _rel(eager, fp8_linear_ref(x, w, s, torch.float32)) < OUT_TOL
    got, replay = graph_out(lambda: fp8_linear(x, w, s))
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    assert torch.equal(got, eager)
