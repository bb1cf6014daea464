"""⑥ kernels, the CUDA-core FP8 decode GEMV (ds4f/kernels/fp8_gemv_cc.py) on CUDA: against fp8_linear_ref at the
per-rank V4-Flash TP=2 shapes (grouped wo_a included), T = 1-4, K splits with re-armed counters, CUDA-graph replay,
and fp8_linear's dispatch to it when enabled."""

from __future__ import annotations

import pytest
import torch

from bench.common import graph_out
from ds4f.kernels import HAS_TRITON, arrival, fp8_gemv_cc
from ds4f.kernels.fp8_gemm import Opts, _scale_arg, fp8_linear, fp8_linear_a8_ref, fp8_linear_ref, grouped_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

OUT_TOL = 5e-3  # bf16 output rounding (2^-9) and fp32 summation order only
# (G*N, K, G) per rank at TP=2: IN_PROJ, IDX_WQ_B, WQ_B, WO_A (4 groups), WO_B, W13, W2
SHAPES = [(1536, 4096, 1), (8192, 1024, 1), (16384, 1024, 1), (4096, 4096, 4), (4096, 4096, 1), (2048, 4096, 1),
          (4096, 1024, 1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _weights(nt: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(nt, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.randint(118, 124, (nt // 128, k // 128), device="cuda", dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w, s


def check_tiles(launch, x, w, ws, e8m0, want, first, tol) -> None:
    """launch(x [T, G, K], w, ws, e8m0, out, G, cfg, depth=...) at `first` (tiles, depth) and four fixed ones where
    valid, twice each (the split counters re-armed), within tol of want [T, G, N]."""
    t, groups, _ = x.shape
    nt, k = w.shape
    for cfg, depth in {first, ((8, 1, 4), 1), ((32, 2, 8), 1), ((32, 4, 4), 2), ((64, 1, 4), 2)}:
        if not fp8_gemv_cc.valid(cfg, nt, k, groups):
            continue
        for _ in range(2):
            out = torch.empty(t, groups, nt // groups, dtype=torch.bfloat16, device="cuda")
            launch(x, w, ws, e8m0, out, groups, cfg, depth=depth)
            assert _rel(out, want) < tol, ((nt, k, groups), t, cfg, depth, _rel(out, want))


@pytest.mark.parametrize("shape", SHAPES)
def test_cc_matches_the_reference(shape):
    nt, k, groups = shape
    rows = nt // groups
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    for t in (1, 2, 3, 4):
        x = torch.randn(t, groups, k, device="cuda").bfloat16()
        want = grouped_ref(x, w, s)
        check_tiles(fp8_gemv_cc.launch_cc, x, w, ws, e8m0, want, (fp8_gemv_cc.generic_config(nt, k, groups, 132), 1),
                    OUT_TOL)
        # A8 (x quantized per 128 columns in the kernel, the block max by a warp butterfly): the a8 reference's math,
        # fp32 products (summation order only) and bf16x2 ones (exact e4m3 products, the pairs' sums rounded)
        want8 = grouped_ref(x, w, s, fp8_linear_a8_ref)
        for cfg, depth, acc16 in (((64, 1, 4), 2, False), ((32, 2, 8), 1, True), ((8, 1, 4), 1, False)):
            if fp8_gemv_cc.valid(cfg, nt, k, groups):
                out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
                fp8_gemv_cc.launch_cc(x, w, ws, e8m0, out, groups, cfg, depth=depth, acc16=acc16, a8=True)
                assert _rel(out, want8) < OUT_TOL, (shape, t, cfg, "a8", acc16, _rel(out, want8))
    torch.cuda.synchronize()
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv_cc"))


@pytest.mark.parametrize("t", [1, 4])
def test_acc16_matches_its_emulation(t):
    """ACC16's bf16x2 FMAs against the same roundings written out (the interpreter's branch run on the GPU), and
    within bf16 steps of the fp32 reference."""
    nt, k = 4096, 4096
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    x = torch.randn(t, 1, k, device="cuda").bfloat16()
    outs = []
    for emulate in (False, True):
        out = torch.empty(t, 1, nt, dtype=torch.float32, device="cuda")
        fp8_gemv_cc.launch_cc(x, w, ws, e8m0, out, 1, (64, 4, 4), acc16=True, emulate=emulate)
        outs.append(out)
    assert _rel(outs[0], outs[1]) < 1e-4  # fused vs fp32-then-rounded sums: rare last-bit differences only
    assert _rel(outs[0][:, 0], fp8_linear_ref(x[:, 0], w, s, torch.float32)) < 1e-2


def test_cc_graph_replay_and_dispatch(monkeypatch):
    nt, k = 4096, 4096
    w, s = _weights(nt, k)
    x = torch.randn(4, k, device="cuda").bfloat16()
    monkeypatch.setattr(fp8_gemv_cc, "ENABLED", True)
    monkeypatch.setattr(fp8_gemv_cc, "MAX_T", 4)
    calls: list[int] = []
    real = fp8_gemv_cc.launch_cc
    monkeypatch.setattr(fp8_gemv_cc, "launch_cc", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    eager = fp8_linear(x, w, s, opts=Opts(gemv=True))
    assert calls == [1] and _rel(eager, fp8_linear_ref(x, w, s, torch.float32)) < OUT_TOL
    got, replay = graph_out(lambda: fp8_linear(x, w, s))
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    assert torch.equal(got, eager)


@pytest.mark.parametrize("shape", [(8192, 1024, 1), (16384, 1024, 1)])
def test_cc_norm_matches_the_reference(shape, monkeypatch):
    # NORM (the decode q_norm inside wq_b's / the indexer wq_b's GEMV): RMSNorm_g(x) rounded to bf16, then the GEMV
    # (model.layers.RMSNorm + fp8_linear_ref), at T = 1..4, the table's tiles and others, eagerly and from a graph;
    # fp8_gemv.linear_norm takes this form at T = 1
    from ds4f.kernels import fp8_gemv
    from ds4f.model.layers import rms_normalize

    nt, k, _ = shape
    w, s = _weights(nt, k)
    ws, e8m0 = _scale_arg(s)
    g = torch.rand(k, device="cuda") * 2
    for t in (1, 2, 4):
        x = (torch.randn(t, k, device="cuda") * 4).bfloat16()
        want = fp8_linear_ref((g * rms_normalize(x.float(), 1e-6)).bfloat16(), w, s, torch.float32)
        for cfg, depth in (fp8_gemv_cc.config(nt, k, 1, 132), ((32, 2, 8), 1), ((64, 1, 4), 2)):
            for acc16 in (False, True):
                out = torch.empty(t, 1, nt, dtype=torch.bfloat16, device="cuda")
                fp8_gemv_cc.launch_cc(x.view(t, 1, k), w, ws, e8m0, out, 1, cfg, depth=depth, acc16=acc16,
                                      norm=(g, 1e-6))
                assert _rel(out[:, 0], want) < OUT_TOL, (shape, t, cfg, depth, acc16, _rel(out[:, 0], want))
    x = (torch.randn(1, k, device="cuda") * 4).bfloat16()
    want = fp8_linear_ref((g * rms_normalize(x.float(), 1e-6)).bfloat16(), w, s, torch.float32)
    monkeypatch.setattr(fp8_gemv_cc, "NORM", True)  # DS4F_FP8_GEMV_CC_NORM=1 (off by default)
    assert fp8_gemv_cc.norm_takes(x, nt, k)
    got = fp8_gemv.linear_norm(x, g, 1e-6, w, ws, e8m0, True)
    assert _rel(got, want) < OUT_TOL
    got_g, replay = graph_out(lambda: fp8_gemv.linear_norm(x, g, 1e-6, w, ws, e8m0, True))
    replay()
    torch.cuda.synchronize()
    assert torch.equal(got_g, got)
