"""⑥ kernels, block-FP8 GEMM on CUDA: both schemes against the pure-torch references at V4-Flash widths and odd
sizes, the activation quantizer bit for bit, split-K reduces, CUDA graph replay and the opt-in Linear hook."""

from __future__ import annotations

import pytest
import torch

import ds4f.kernels.fp8_gemm as fp8_gemm
import ds4f.model.linear as linear_mod
from ds4f.kernels import HAS_TRITON
from ds4f.kernels.fp8_gemm import (
    Opts,
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_a8_ref,
    fp8_linear_ref,
    fp8_native,
    quant_act,
    quant_act_ref,
)
from ds4f.model.linear import Linear
from ds4f.model.quant import dequant_fp8_block, quant_fp8_block

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

# ‖out - ref‖ / ‖ref‖ against fp32 references on the same fp8 weights:
OUT_TOL = 5e-3  # bf16 output rounding (2^-9) and fp32 summation order only
A8_TOL = 3.5e-2  # a8w8 vs the weight-only reference: per-token per-128 e4m3 activation rounding (~2.5e-2 Gaussian)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(m: int, n: int, k: int, fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, s = quant_fp8_block(torch.randn(n, k, device="cuda", generator=g) * 0.02, fmt)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    return x, q, s


NATIVE = [True, False] if torch.cuda.is_available() and fp8_native(torch.device("cuda")) else [False]


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize(("shape", "fmt"), [((1, 1024, 4096), "ue8m0"), ((4, 512, 4096), "float32"),
                                            ((16, 4096, 8192), "ue8m0"), ((33, 200, 300), "float32"),
                                            ((64, 32768, 1024), "ue8m0")])
def test_w8_matches_reference(shape: tuple[int, int, int], fmt: str, native: bool) -> None:
    m, n, k = shape
    x, q, s = _case(m, n, k, fmt, seed=m + n)
    ref = fp8_linear_ref(x, q, s, torch.float32)
    for serial in (False, True):
        out = fp8_linear(x, q, s, opts=Opts("w8", native=native, serial=serial))
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert _rel(out, ref) < OUT_TOL, (shape, fmt, native, serial, _rel(out, ref))


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize(("shape", "fmt"), [((1, 1024, 4096), "ue8m0"), ((4, 512, 4096), "float32"),
                                            ((1, 4096, 4096), "ue8m0"), ((3, 200, 300), "float32"),
                                            ((1, 16384, 1024), "ue8m0")])
def test_gemv_matches_reference(shape: tuple[int, int, int], fmt: str, native: bool) -> None:
    # the opt-in CUDA-core GEMV (DS4F_FP8_GEMV=1), K split or not
    m, n, k = shape
    x, q, s = _case(m, n, k, fmt, seed=m + n + 1)
    ref = fp8_linear_ref(x, q, s, torch.float32)
    for split in (None, 1, 4):
        out = fp8_linear(x, q, s, opts=Opts("w8", split=split, native=native, gemv=True))
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert _rel(out, ref) < OUT_TOL, (shape, fmt, native, split, _rel(out, ref))


@pytest.mark.parametrize("split", [2, 8])
def test_split_k_reduces_are_deterministic_and_rearm(split: int) -> None:
    x, q, s = _case(4, 1024, 4096, "ue8m0", seed=3)
    ref = fp8_linear_ref(x, q, s, torch.float32)
    outs = [fp8_linear(x, q, s, opts=Opts("w8", split=split, serial=serial)) for serial in (True, True, True, False)]
    assert _rel(outs[0], ref) < OUT_TOL
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # same split order in both reduces; counters re-armed


@pytest.mark.skipif(not NATIVE[0], reason="a8w8 needs sm_89+")
@pytest.mark.parametrize(("shape", "fmt"), [((65, 1024, 4096), "ue8m0"), ((300, 200, 300), "float32"),
                                            ((1000, 4096, 8192), "float32"), ((2048, 8192, 1024), "ue8m0")])
def test_a8w8_matches_its_reference(shape: tuple[int, int, int], fmt: str) -> None:
    m, n, k = shape
    x, q, s = _case(m, n, k, fmt, seed=m + k)
    out = fp8_linear(x, q, s)  # auto picks a8w8 above W8_MAX_M on sm_89+
    assert _rel(out, fp8_linear_a8_ref(x, q, s, torch.float32)) < OUT_TOL
    assert _rel(out, fp8_linear_ref(x, q, s, torch.float32)) < A8_TOL


def test_w8_large_m_fallback_matches_reference() -> None:
    x, q, s = _case(1000, 1024, 4096, "ue8m0", seed=4)
    out = fp8_linear(x, q, s, opts=Opts("w8", native=False))  # what sm_80/86 run for prefill
    assert _rel(out, fp8_linear_ref(x, q, s, torch.float32)) < OUT_TOL


@pytest.mark.skipif(not NATIVE[0], reason="e4m3 quantization in Triton needs sm_89+")
@pytest.mark.parametrize("pow2", [True, False])
def test_quant_act_matches_reference(pow2: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(77, 4096 + 64, device="cuda", generator=g) * torch.logspace(-4, 4, 77, device="cuda")[:, None])
    x = x.bfloat16()
    x[3] = 0.0
    x[5, :7] = 448.0 * 2.0**-5
    q, s = quant_act(x, pow2)
    qr, sr = quant_act_ref(x, pow2)
    if pow2:
        assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    else:  # x / s may differ from torch in the last bit of s: allow one e4m3 step on a few elements
        torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
        diff = (q.float() - qr.float()).abs()
        assert (diff > 0).float().mean().item() < 1e-3
        assert bool((diff <= qr.float().abs() * 2.0**-3 + 2.0**-9).all())


@pytest.mark.parametrize("m", [4, 512])
def test_grouped_wo_a(m: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(m)
    q, s = quant_fp8_block(torch.randn(8 * 1024, 4096, device="cuda", generator=g) * 0.02, "ue8m0")
    x = torch.randn(m, 8, 4096, device="cuda", generator=g).bfloat16()
    out = fp8_grouped_linear(x, q, s)
    a8 = m > 64 and NATIVE[0]
    fn = fp8_linear_a8_ref if a8 else fp8_linear_ref
    want = torch.stack([fn(x[:, i], q[1024 * i:1024 * (i + 1)], s[8 * i:8 * (i + 1)], torch.float32)
                        for i in range(8)], 1)
    assert out.shape == (m, 8, 1024) and _rel(out, want) < OUT_TOL


@pytest.mark.parametrize("serial", [False, True])
def test_cuda_graph_replay_matches_eager(serial: bool) -> None:
    x, q, s = _case(1, 1024, 4096, "ue8m0", seed=6)
    opts = Opts(serial=serial)
    eager = fp8_linear(x, q, s, opts=opts)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_linear(x, q, s, opts=opts)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, q, s, opts=opts)
    x.copy_(x * 2)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_linear(x, q, s, opts=opts)) and _rel(out, 2 * eager.float()) < OUT_TOL


@pytest.mark.parametrize("m", [3, 200])
def test_linear_hook(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x, q, s = _case(m, 1024, 4096, "ue8m0", seed=7)
    lin = Linear(4096, 1024, "fp8", torch.bfloat16).cuda()
    with torch.no_grad():
        lin.weight.copy_(dequant_fp8_block(q, s, torch.bfloat16))
    lin.packed_weight, lin.packed_scale = q, s
    dense = lin(x)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fp8_linear(*args, **kwargs)

    monkeypatch.setattr(fp8_gemm, "fp8_linear", counted)
    assert torch.equal(lin(x), dense) and not calls  # switch off: F.linear on the dequantized weight
    monkeypatch.setattr(linear_mod, "USE_FP8_GEMM", True)
    fast = lin(x)
    assert fast.shape == dense.shape and len(calls) == 1
    tol = A8_TOL if m > 64 and NATIVE[0] else OUT_TOL
    assert _rel(fast, fp8_linear_ref(x, q, s, torch.float32)) < tol
    assert torch.equal(lin(x.float()), torch.nn.functional.linear(x.float().bfloat16(), lin.weight))
