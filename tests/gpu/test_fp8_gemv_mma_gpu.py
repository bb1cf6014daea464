"""⑥ kernels, the register-fed MMA decode GEMV (ds4f/kernels/fp8_gemv_mma.py) on CUDA: the inline-PTX MMAs against
fp8_linear_ref (x in bf16) at the per-rank V4-Flash TP=2 shapes (grouped wo_a included), T = 1-8, tiles and K splits
with re-armed counters, the emulated MMAs on the same registers (tl.dot over rebuilt tiles) against the PTX ones,
CUDA-graph replay, and fp8_linear's dispatch to it when on."""

from __future__ import annotations

import pytest
import torch

# the CUDA-core GEMV's GPU test: the same TP=2 shapes, weights and bound (bf16 outputs, fp32 sums)
from test_fp8_gemv_cc_gpu import OUT_TOL, SHAPES, _rel, _weights

from bench.common import graph_out
from ds4f.kernels import HAS_TRITON, arrival, fp8_gemv_mma
from ds4f.kernels.fp8_gemm import Opts, _scale_arg, fp8_linear, fp8_linear_ref, grouped_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_mma_matches_the_reference(shape):
    nt, k, groups = shape
    rows = nt // groups
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    for t in (1, 2, 4, 5, 8):
        x = torch.randn(t, groups, k, device="cuda").bfloat16()
        want = grouped_ref(x, w, s)
        for cfg in {fp8_gemv_mma.generic_config(nt, k, groups, 132), (4, 2, 1), (2, 1, 4), (8, 1, 2), (1, 2, 1)}:
            if not fp8_gemv_mma.valid(cfg, nt, k, groups):
                continue
            for _ in range(2):  # the split counters re-armed
                out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
                fp8_gemv_mma.launch_mma(x, w, ws, e8m0, out, groups, cfg)
                assert _rel(out, want) < OUT_TOL, (shape, t, cfg, _rel(out, want))
        # the PTX MMAs against their emulation from the same registers (fp32 outputs: summation order only)
        cfg = fp8_gemv_mma.generic_config(nt, k, groups, 132)
        o_ptx, o_emu = (torch.empty(t, groups, rows, dtype=torch.float32, device="cuda") for _ in range(2))
        fp8_gemv_mma.launch_mma(x, w, ws, e8m0, o_ptx, groups, cfg)
        fp8_gemv_mma.launch_mma(x, w, ws, e8m0, o_emu, groups, cfg, emulate=True)
        assert _rel(o_ptx, o_emu) < 1e-5, (shape, t, _rel(o_ptx, o_emu))
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv_mma"))


def test_mma_graph_and_dispatch(monkeypatch):
    nt, k = 4096, 4096
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    x = torch.randn(4, 1, k, device="cuda").bfloat16()
    cfg = (4, 2, 4)
    eager = torch.empty(4, 1, nt, dtype=torch.bfloat16, device="cuda")
    fp8_gemv_mma.launch_mma(x, w, ws, e8m0, eager, 1, cfg)

    def call() -> torch.Tensor:
        out = torch.empty(4, 1, nt, dtype=torch.bfloat16, device="cuda")
        fp8_gemv_mma.launch_mma(x, w, ws, e8m0, out, 1, cfg)
        return out

    got, replay = graph_out(call)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    assert torch.equal(got, eager)
    monkeypatch.setattr(fp8_gemv_mma, "ENABLED", True)
    calls: list[int] = []
    real = fp8_gemv_mma.launch_mma
    monkeypatch.setattr(fp8_gemv_mma, "launch_mma", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x2 = torch.randn(6, k, device="cuda").bfloat16()
    out = fp8_linear(x2, w, s, out_dtype=torch.bfloat16, opts=Opts(gemv=True))
    assert calls == [1] and _rel(out, fp8_linear_ref(x2, w, s, torch.float32)) < OUT_TOL
