"""⑥ kernels, block-FP8 GEMM on CUDA: both schemes against the pure-torch references at V4-Flash widths and odd
sizes, the swap-AB decode GEMV (ds4f/kernels/fp8_gemv.py) at the per-rank V4-Flash shapes (T = 1 / 4 / 16, both scale
dtypes, grouped wo_a) and its dispatch switches, the activation quantizer bit for bit, split-K reduces, CUDA graph
replay and the opt-in Linear hook."""

from __future__ import annotations

import pytest
import torch

import ds4f.kernels.fp8_gemm as fp8_gemm
import ds4f.model.linear as linear_mod
from ds4f.kernels import HAS_TRITON, arrival, fp8_gemv
from ds4f.kernels.fp8_gemm import (
    Opts,
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_a8_ref,
    fp8_linear_ref,
    fp8_native,
    grouped_ref,
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
        out = fp8_linear(x, q, s, opts=Opts("w8", native=native, serial=serial, gemv=False))  # the _w8_kernel tiles
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        assert _rel(out, ref) < OUT_TOL, (shape, fmt, native, serial, _rel(out, ref))


@pytest.mark.parametrize("name", list(fp8_gemv.CONFIGS))
def test_gemv_matches_reference_at_v4_shapes(name: str) -> None:
    # the swap-AB decode GEMV (forced, whatever the table says) at the per-rank V4-Flash shapes, T = 1 / 4 / 16,
    # UE8M0 and fp32 scales; the default dispatch gives the same bits when the table picks the GEMV, and matches
    # the unquantized-x reference where it takes the CUDA-core form (fp8_gemv_cc.CONFIGS_CC at T = 1)
    from ds4f.kernels import fp8_gemv_cc

    (nt, k, groups), cfg = fp8_gemv.CONFIGS[name]
    for t, fmt in ((1, "ue8m0"), (4, "float32"), (16, "ue8m0"), (1, "float32")):
        x, q, s = _case(t * groups, nt, k, fmt, seed=nt + k + t)
        cc = fp8_gemv.USE_GEMV and fp8_gemv_cc.takes(x.view(t, groups, k), nt, k, groups)
        a8 = fp8_gemv.use_a8(nt, k, groups) and fp8_gemv.USE_GEMV and not cc
        if groups > 1:
            x = x.view(t, groups, k)
            ref = grouped_ref(x, q, s)
            out = fp8_grouped_linear(x, q, s, opts=Opts("w8", gemv=True, a8=False))
            default = fp8_grouped_linear(x, q, s)
            forced = fp8_grouped_linear(x, q, s, opts=Opts("w8", gemv=True, a8=fp8_gemv.use_a8(nt, k, groups)))
            ref_default = grouped_ref(x, q, s, fp8_linear_a8_ref if a8 else fp8_linear_ref)
        else:
            ref = fp8_linear_ref(x, q, s, torch.float32)
            out = fp8_linear(x, q, s, opts=Opts("w8", gemv=True, a8=False))
            default = fp8_linear(x, q, s)
            forced = fp8_linear(x, q, s, opts=Opts("w8", gemv=True, a8=fp8_gemv.use_a8(nt, k, groups)))
            ref_default = (fp8_linear_a8_ref if a8 else fp8_linear_ref)(x, q, s, torch.float32)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert _rel(out, ref) < OUT_TOL, (name, t, fmt, _rel(out, ref))  # the widening form
        assert _rel(default, ref_default) < OUT_TOL, (name, t, fmt, "default", a8, _rel(default, ref_default))
        if cfg is not None and fp8_gemv.USE_GEMV and not cc:
            assert torch.equal(default, forced), (name, t, fmt)
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv"))  # every split counter re-armed


@pytest.mark.skipif(not fp8_native(torch.device("cuda")) if torch.cuda.is_available() else True,
                    reason="the a8 form needs e4m3 (sm_89+)")
@pytest.mark.parametrize("name", list(fp8_gemv.CONFIGS))
def test_gemv_a8_matches_its_reference_at_v4_shapes(name: str) -> None:
    # the a8 form (x quantized per token per 128 columns, e4m3 x e4m3 dot) at the table's shapes and its a8 tiles
    # (CONFIGS_A8, else CONFIGS, else the generic rule), T = 1 / 4 / 16, both scale dtypes, eagerly and replayed in
    # a CUDA graph, against fp8_linear_a8_ref (the same quantization) group by group; the q_norm form for WQ_B
    from ds4f.kernels.fp8_gemm import _scale_arg
    from ds4f.kernels.gemv import rms_norm_ref

    (nt, k, groups), cfg = fp8_gemv.CONFIGS[name]
    cfg = fp8_gemv.CONFIGS_A8.get(name, cfg) or fp8_gemv.generic_config(nt, k, groups, 132)
    rows = nt // groups
    for t, fmt in ((1, "ue8m0"), (4, "float32"), (16, "ue8m0")):
        x, q, s = _case(t * groups, nt, k, fmt, seed=nt + k + t)
        x = x.view(t, groups, k)
        ws, e8m0 = _scale_arg(s)
        ref = grouped_ref(x, q, s, fp8_linear_a8_ref)
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        fp8_gemv.launch(x, q, ws, e8m0, out, groups, True, cfg, a8=True)
        assert _rel(out, ref) < OUT_TOL, (name, t, fmt, _rel(out, ref))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fp8_gemv.launch(x, q, ws, e8m0, out, groups, True, cfg, a8=True)
        eager = out.clone()
        out.zero_()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager), (name, t, fmt)
        if groups == 1 and name.startswith("WQ_B"):
            gw = 1 + torch.randn(k, device="cuda") / 4
            outn = torch.empty(t, 1, nt, dtype=torch.bfloat16, device="cuda")
            fp8_gemv.launch(x, q, ws, e8m0, outn, 1, True, cfg, norm=(gw, 1e-6), a8=True)
            want = fp8_linear_ref(rms_norm_ref(x[:, 0], gw, 1e-6), q, s, torch.float32)  # one quantization off
            assert _rel(outn[:, 0], want) < A8_TOL, (name, t, fmt, "norm", _rel(outn[:, 0], want))
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv"))


@pytest.mark.parametrize("name", ["W2_TP2", "W2_TP1"])
def test_linear_act_matches_the_gemv_on_the_activation(name: str) -> None:
    # the shared expert's SwiGLU inside its w2 GEMV (packed.SHARED_ACT_FUSED) against the same GEMV on
    # glue.swiglu_act(h): equal but for the activation's bf16 rounding where silu's fp32 forms differ in the last
    # bit; in a CUDA graph too
    from ds4f.kernels.fp8_gemm import _scale_arg
    from ds4f.runner.gpu.glue import swiglu_act

    (nt, k, _), _ = fp8_gemv.CONFIGS[name]
    native = fp8_native(torch.device("cuda"))
    for t in (1, 4, 16):
        h, q, s = _case(t, nt, 2 * k, "ue8m0", seed=nt + k + t)
        h = h * 6  # some gates and ups past the clamp
        q = q[:, :k].contiguous()
        s = s[:, : -(-k // 128)].contiguous()
        ws, e8m0 = _scale_arg(s)
        got = fp8_gemv.linear_act(h, 10.0, q, ws, e8m0, native)
        # the same GEMV form (a8 where the table has it; not the CUDA-core form T = 1 takes by default)
        want = fp8_linear(swiglu_act(h, 10.0), q, s, opts=Opts(gemv=True, a8=fp8_gemv.use_a8(nt, k, 1)))
        assert _rel(got, want) < 2e-3 and (got == want).float().mean() > 0.9, (name, t, _rel(got, want))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fp8_gemv.linear_act(h, 10.0, q, ws, e8m0, native)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got), (name, t)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("bits", [True, False])
def test_gemv_widens_every_e4m3_byte_exactly(native: bool, bits: bool) -> None:
    # W[r, c] = byte (r + c) % 256 (NaN bytes zeroed), unit scales, token t one-hot at column c_t: out[t, r] is that
    # byte's value exactly (subnormals, signed zeros, every position of the packed widening)
    r, c = torch.arange(256, device="cuda")[:, None], torch.arange(256, device="cuda")[None, :]
    b = ((r + c) % 256).to(torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0
    q = b.view(torch.float8_e4m3fn)
    cols = (torch.arange(16, device="cuda") * 37) % 256
    x = torch.zeros(16, 1, 256, device="cuda", dtype=torch.bfloat16)
    x[torch.arange(16, device="cuda"), 0, cols] = 1.0
    want = q.float()[:, cols].t()
    for s, cfg in ((torch.ones(2, 2, device="cuda"), (32, 128, 2, 4, 3)),
                   (torch.full((2, 2), 127, dtype=torch.uint8, device="cuda"), (64, 256, 1, 4, 3))):
        ws, e8m0 = fp8_gemm._scale_arg(s)
        out = torch.empty(16, 1, 256, dtype=torch.float32, device="cuda")
        fp8_gemv.launch(x, q if native else q.view(torch.uint8), ws, e8m0, out, 1, native, cfg, bits=bits)
        assert torch.equal(out[:, 0], want), (native, bits, cfg, (out[:, 0] != want).sum().item())


@pytest.mark.parametrize(("shape", "fmt", "native", "split"), [
    ((1, 4096, 4096, 1), "ue8m0", False, None), ((16, 4096, 1024, 4), "float32", False, 2),  # below-sm_89 widening
    ((3, 200, 300, 1), "float32", None, None), ((5, 1000, 4160, 1), "ue8m0", None, 3),  # N, K off the tile grid
    ((4, 1024, 4096, 4), "ue8m0", None, 16), ((2, 16384, 1024, 1), "ue8m0", None, 4),
])
def test_gemv_odd_cases(shape: tuple[int, int, int, int], fmt: str, native: bool | None, split: int | None) -> None:
    t, nt, k, groups = shape
    x, q, s = _case(t * groups, nt, k, fmt, seed=nt + 7 * k + t)
    opts = Opts("w8", split=split, native=native, gemv=True, a8=False)  # the widening form
    if groups > 1:
        x = x.view(t, groups, k)
        ref, outs = grouped_ref(x, q, s), [fp8_grouped_linear(x, q, s, opts=opts) for _ in range(3)]
    else:
        ref, outs = fp8_linear_ref(x, q, s, torch.float32), [fp8_linear(x, q, s, opts=opts) for _ in range(3)]
    assert _rel(outs[0], ref) < OUT_TOL, (shape, fmt, native, split, _rel(outs[0], ref))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # split-order sums; counters re-armed between calls
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv"))


def test_gemv_switch_and_table_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # DS4F_FP8_GEMV=0 (USE_GEMV False) and a table entry of None both leave M <= 16 on the _w8_kernel tiles
    x, q, s = _case(4, 4096, 4096, "ue8m0", seed=11)
    launched: list[int] = []
    real = fp8_gemv.launch
    monkeypatch.setattr(fp8_gemv, "launch", lambda *a, **kw: launched.append(1) or real(*a, **kw))
    monkeypatch.setattr(fp8_gemv, "A8", "0")  # the widening form: against the exact reference
    ref = fp8_linear_ref(x, q, s, torch.float32)
    monkeypatch.setattr(fp8_gemv, "USE_GEMV", True)
    monkeypatch.setitem(fp8_gemv.CONFIGS, "WO_B_TP2", ((4096, 4096, 1), (64, 256, 4, 4, 4)))
    assert _rel(fp8_linear(x, q, s), ref) < OUT_TOL and len(launched) == 1
    monkeypatch.setattr(fp8_gemv, "USE_GEMV", False)
    assert _rel(fp8_linear(x, q, s), ref) < OUT_TOL and len(launched) == 1
    monkeypatch.setattr(fp8_gemv, "USE_GEMV", True)
    monkeypatch.setitem(fp8_gemv.CONFIGS, "WO_B_TP2", ((4096, 4096, 1), None))
    assert _rel(fp8_linear(x, q, s), ref) < OUT_TOL and len(launched) == 1
    assert _rel(fp8_linear(x, q, s, opts=Opts(gemv=True)), ref) < OUT_TOL and len(launched) == 2


def test_gemv_two_streams_two_shapes() -> None:
    # decode runs the indexer's wq_b on a side stream beside wq_b: per-shape counters keep their K splits apart
    (n1, k1, _), _ = fp8_gemv.CONFIGS["WQ_B_TP2"]
    (n2, k2, _), _ = fp8_gemv.CONFIGS["IDX_WQ_B"]
    x1, q1, s1 = _case(1, n1, k1, "ue8m0", seed=14)
    x2, q2, s2 = _case(1, n2, k2, "ue8m0", seed=15)
    opts = Opts(gemv=True, split=4, a8=False)
    r1, r2 = fp8_linear_ref(x1, q1, s1, torch.float32), fp8_linear_ref(x2, q2, s2, torch.float32)
    side = torch.cuda.Stream()
    outs = []
    for _ in range(20):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            o2 = fp8_linear(x2, q2, s2, opts=opts)
        o1 = fp8_linear(x1, q1, s1, opts=opts)
        torch.cuda.current_stream().wait_stream(side)
        outs.append((o1, o2))
    torch.cuda.synchronize()
    assert all(_rel(o1, r1) < OUT_TOL and _rel(o2, r2) < OUT_TOL for o1, o2 in outs)
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv"))


@pytest.mark.parametrize("grouped", [False, True])
def test_gemv_cuda_graph_replay(grouped: bool) -> None:
    # the default decode dispatch (the GEMV with its K split) captured once, replayed twice on new inputs
    if grouped:
        x, q, s = _case(4, 4096, 4096, "ue8m0", seed=12)
        x = x.view(1, 4, 4096)
        fn = fp8_grouped_linear
    else:
        x, q, s = _case(1, 1536, 4096, "ue8m0", seed=13)
        fn = fp8_linear
    eager = fn(x, q, s)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x, q, s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x, q, s)
    x.copy_(x * 2)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(x, q, s)) and _rel(out, 2 * eager.float()) < OUT_TOL


@pytest.mark.parametrize("split", [2, 8])
def test_split_k_reduces_are_deterministic_and_rearm(split: int) -> None:
    x, q, s = _case(4, 1024, 4096, "ue8m0", seed=3)
    ref = fp8_linear_ref(x, q, s, torch.float32)
    outs = [fp8_linear(x, q, s, opts=Opts("w8", split=split, serial=serial, gemv=False))
            for serial in (True, True, True, False)]
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
    opts = Opts(serial=serial, gemv=False)
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


def test_gemv_linear_norm_at_the_wq_b_shapes() -> None:
    """fp8_gemv.linear_norm (the decode q_norm inside the FP8 wq_b GEMVs) at the per-rank TP=2 wq_b and indexer wq_b
    shapes and TP=1's, T = 1 / 4 / 16, UE8M0 scales, a column view of x as the stacked input projection gives it:
    against the reference norm's bf16 rows through fp8_linear_ref, also after CUDA-graph replays."""
    from ds4f.kernels.gemv import rms_norm_ref

    g = torch.Generator(device="cuda").manual_seed(5)
    for n in (16384, 4096, 32768):
        q, s = quant_fp8_block(torch.randn(n, 1024, device="cuda", generator=g) / 32, "ue8m0")
        ws, e8m0 = fp8_gemm._scale_arg(s)
        gw = 1 + torch.randn(1024, device="cuda", generator=g) / 4
        for t in (1, 4, 16):
            x = (4 * torch.randn(t, 3072, device="cuda", generator=g)).bfloat16()[:, 1024:2048]
            want = fp8_linear_ref(rms_norm_ref(x, gw, 1e-6), q, s, torch.float32)
            got = fp8_gemv.linear_norm(x, gw, 1e-6, q, ws, e8m0, fp8_native(x.device))
            # the a8 form where the table gives it this shape: x's e4m3 rounding on top
            tol = A8_TOL if fp8_gemv.use_a8(n, 1024, 1) and fp8_native(x.device) else OUT_TOL + 4e-3
            assert _rel(got, want) < tol, (n, t, _rel(got, want))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemv.linear_norm(x, gw, 1e-6, q, ws, e8m0, fp8_native(x.device))
    for _ in range(3):
        x.normal_()
        graph.replay()
        torch.cuda.synchronize()
        want = fp8_linear_ref(rms_norm_ref(x, gw, 1e-6), q, s, torch.float32)
        assert _rel(out, want) < tol
