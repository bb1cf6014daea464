"""⑥ kernels, block-FP8 GEMM on CPU: the references (ds4f/kernels/fp8_gemm.py) against per-block float64 math and
ds4f/model/quant.py, the Linear hook's CPU behaviour, and the Triton kernels under TRITON_INTERPRET=1 (tiny shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ds4f.model.linear as linear_mod
from ds4f.kernels.fp8_gemm import (
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_a8_ref,
    fp8_linear_ref,
    grouped_ref,
    quant_act_ref,
)
from ds4f.model.linear import Linear
from ds4f.model.quant import FP8_DTYPE, dequant_fp8_block, quant_fp8_block, scale_to_float

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _weights(n: int, k: int, fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    q, s = quant_fp8_block(w, fmt)
    return w, q, s


@pytest.mark.parametrize("fmt", ["ue8m0", "float32"])
@pytest.mark.parametrize("shape", [(3, 256, 384), (5, 200, 300)])
def test_linear_ref_is_sum_of_scaled_block_products(fmt: str, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    w, q, s = _weights(n, k, fmt, seed=n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    sf = scale_to_float(s).double()
    want = torch.zeros(m, n, dtype=torch.float64)
    for bi in range(s.shape[0]):
        for bj in range(s.shape[1]):
            rows, cols = slice(128 * bi, 128 * (bi + 1)), slice(128 * bj, 128 * (bj + 1))
            want[:, rows] += (x[:, cols].double() @ q[rows, cols].double().t()) * sf[bi, bj]
    got = fp8_linear_ref(x, q, s, torch.float32)
    assert _rel(got, want) < 1e-6
    # the fp8 weight stands for the float one within e4m3 rounding (3 mantissa bits)
    assert _rel(got, x.double() @ w.double().t()) < 4e-2


@pytest.mark.parametrize("shape", [(4, 256), (7, 300), (1, 128)])
def test_quant_act_ref_pow2_scales_are_the_tightest_powers_of_two(shape: tuple[int, int]) -> None:
    m, k = shape
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * torch.logspace(-3, 3, m)[:, None]).bfloat16()
    x[0, :5] = 448.0 * 2.0**-3  # amax / 448 exactly a power of two in block 0 of row 0
    q, s = quant_act_ref(x, pow2=True)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and s.shape == (m, -(-k // 128))
    frac, _ = torch.frexp(s)
    assert bool((frac == 0.5).all())
    xp = torch.zeros(m, s.shape[1] * 128)
    xp[:, :k] = x.float()
    amax = xp.view(m, -1, 128).abs().amax(-1)
    assert bool((amax / s <= 448).all()) and bool((amax / s > 224).all())
    assert s[0, 0].item() == 2.0**-3
    # round to nearest: error at most half an e4m3 step (2^-4 relative, 2^-10 * s absolute for subnormals)
    full = s.repeat_interleave(128, 1)[:, :k]
    err = (q.float() * full - x.float()).abs()
    assert bool((err <= torch.maximum(x.float().abs() * 2.0**-4, full * 2.0**-10) + 1e-30).all())


def test_quant_act_ref_amax_scale_and_zero_rows() -> None:
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    x[1] = 0.0
    q, s = quant_act_ref(x, pow2=False)
    amax = x.float().view(3, 2, 128).abs().amax(-1)
    assert torch.equal(s[0], amax[0] / 448.0)
    assert q[0].float().abs().amax().item() == 448.0
    assert bool((q[1].float() == 0).all()) and bool(torch.isfinite(s).all()) and bool((s > 0).all())


def test_a8_ref_error_is_what_per_128_activation_quant_implies() -> None:
    _, q, s = _weights(256, 1024, "ue8m0", seed=5)
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(6)).bfloat16()
    base = fp8_linear_ref(x, q, s, torch.float32)
    for pow2 in (True, False):
        err = _rel(fp8_linear_a8_ref(x, q, s, torch.float32, pow2=pow2), base)
        assert 5e-3 < err < 3.5e-2, (pow2, err)


def test_grouped_ref_is_each_groups_slice_of_the_whole_product() -> None:
    # x [T, G, K] against G row groups of W: group i's output = x[:, i] @ all of W, sliced to group i's rows
    _, q, s = _weights(4 * 256, 512, "ue8m0", 3)
    x = torch.randn(3, 4, 512, generator=torch.Generator().manual_seed(4))
    for ref in (fp8_linear_ref, fp8_linear_a8_ref):
        got = grouped_ref(x, q, s, ref)
        want = torch.stack([ref(x[:, i], q, s, torch.float32)[:, 256 * i:256 * (i + 1)] for i in range(4)], 1)
        assert got.shape == (3, 4, 256) and torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_cpu_path_is_the_reference() -> None:
    _, q, s = _weights(256, 384, "ue8m0", seed=7)
    x = torch.randn(2, 3, 384, generator=torch.Generator().manual_seed(8)).bfloat16()
    got = fp8_linear(x, q, s)
    assert got.shape == (2, 3, 256) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, fp8_linear_ref(x, q, s), rtol=1e-2, atol=1e-3)
    # grouped: group g of the output uses weight rows g*128..g*128+127 and their scale row g
    xg = torch.randn(4, 2, 384, generator=torch.Generator().manual_seed(9)).bfloat16()
    out = fp8_grouped_linear(xg, q, s, torch.float32)
    for gi in range(2):
        want = fp8_linear_ref(xg[:, gi], q[128 * gi:128 * (gi + 1)], s[gi:gi + 1], torch.float32)
        torch.testing.assert_close(out[:, gi], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("switch", [False, True])
def test_linear_hook_leaves_cpu_forward_unchanged(switch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    w, q, s = _weights(256, 384, "ue8m0", seed=10)
    lin = Linear(384, 256, "fp8", torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(dequant_fp8_block(q, s, torch.bfloat16))
    lin.packed_weight, lin.packed_scale = q, s
    x = torch.randn(5, 384, generator=torch.Generator().manual_seed(11)).bfloat16()
    monkeypatch.setattr(linear_mod, "USE_FP8_GEMM", switch)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))


_INTERP_SCRIPT = textwrap.dedent("""
    import torch
    from ds4f.kernels.fp8_gemm import (Cfg, Opts, fp8_grouped_linear, fp8_linear, fp8_linear_a8_ref, fp8_linear_ref,
                                       quant_act, quant_act_ref)
    from ds4f.model.quant import quant_fp8_block

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    g = torch.Generator().manual_seed(0)
    small = Cfg(16, 64, 128, 4, 2)
    for m, n, k, fmt in [(3, 160, 256, "ue8m0"), (5, 128, 200, "float32")]:
        q, s = quant_fp8_block(torch.randn(n, k, generator=g) * 0.05, fmt)
        x = (torch.randn(m, k, generator=g) * 3).bfloat16()
        x[1] = 0.0
        ref = fp8_linear_ref(x, q, s, torch.float32)
        for native, split, serial in [(True, 1, False), (False, 1, False), (True, 2, False), (False, 2, True)]:
            o = fp8_linear(x, q, s, torch.float32, Opts("w8", small, split, native, serial=serial))
            assert rel(o, ref) < 1e-5, (m, n, k, native, split, serial, rel(o, ref))
        for native, split in [(True, 1), (False, 1), (True, 2)]:  # the CUDA-core GEMV (M <= 4)
            o = fp8_linear(x[:3], q, s, torch.float32, Opts("w8", split=split, native=native, gemv=True))
            assert rel(o, ref[:3]) < 1e-5, (m, n, k, native, split, "gemv", rel(o, ref[:3]))
        for pow2 in (True, False):
            qa, sa = quant_act(x, pow2)
            qr, sr = quant_act_ref(x, pow2)
            assert torch.equal(qa.float(), qr.float()) and torch.allclose(sa, sr, rtol=1e-6, atol=0), pow2
            o = fp8_linear(x, q, s, torch.float32, Opts("a8w8", small, pow2=pow2))
            assert rel(o, fp8_linear_a8_ref(x, q, s, torch.float32, pow2)) < 1e-5, (m, n, k, pow2)
    q, s = quant_fp8_block(torch.randn(2 * 128, 256, generator=g) * 0.05, "ue8m0")
    x = torch.randn(4, 2, 256, generator=g).bfloat16()
    for scheme, fn in (("w8", fp8_linear_ref), ("a8w8", fp8_linear_a8_ref)):
        o = fp8_grouped_linear(x, q, s, torch.float32, Opts(scheme, small, split=2))
        want = torch.stack([fn(x[:, i], q[128 * i:128 * (i + 1)], s[i:i + 1], torch.float32) for i in range(2)], 1)
        assert rel(o, want) < 1e-5, (scheme, rel(o, want))
    o = fp8_grouped_linear(x, q, s, torch.float32, Opts("w8", gemv=True))
    want = torch.stack([fp8_linear_ref(x[:, i], q[128 * i:128 * (i + 1)], s[i:i + 1], torch.float32)
                        for i in range(2)], 1)
    assert rel(o, want) < 1e-5, ("gemv grouped", rel(o, want))
    print("ok")
""")


def test_triton_kernels_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
