"""Fused fast-path kernels on CUDA (RoPE, mHC step, router) vs their torch references at V4-Flash widths."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.kernels.mhc import hc_step, hc_step_ref
from ds4f.kernels.rope import norm_rope, norm_rope_ref, rope_, rope_ref
from ds4f.kernels.router import route, route_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

BF16_ULP = 2**-7  # relative spacing of bf16 at 1: hardware rsqrt / sum order may flip a rounding


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return ((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = _err(a, b)
    assert err <= tol, err


def _cs(t: int, half: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    ang = torch.rand(t, half, device="cuda", generator=g) * 100
    return ang.cos(), ang.sin()


@pytest.mark.parametrize("t", [1, 7, 300])
def test_rope_kernels(t: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(t)
    cos, sin = _cs(t, 32, t)
    x = torch.randn(t, 64, 512, device="cuda", generator=g).bfloat16()
    for inverse in (False, True):
        y = x.clone()
        rope_(y, cos, sin, inverse=inverse)
        _close(y, rope_ref(x, cos, sin, inverse), BF16_ULP)  # FMA contraction may flip a rounding
        assert torch.equal(y[..., :448], x[..., :448])  # the nope channels are not touched
    _close(norm_rope(x, None, cos, sin, 1e-6), norm_rope_ref(x, None, cos, sin, 1e-6), BF16_ULP)
    stacked = torch.randn(t, 2048, device="cuda", generator=g).bfloat16()
    w = torch.rand(512, device="cuda", generator=g) + 0.5
    kvr = stacked[:, 1024:1536]
    _close(norm_rope(kvr, w, cos, sin, 1e-6), norm_rope_ref(kvr, w, cos, sin, 1e-6), BF16_ULP)


@pytest.mark.parametrize("t", [1, 5, 40, 300])
def test_hc_step(t: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(t)
    hc, d = 4, 4096
    nm = (2 + hc) * hc
    y = torch.randn(t, d, device="cuda", generator=g).bfloat16()
    x = torch.randn(t, hc, d, device="cuda", generator=g).bfloat16()
    post = 2 * torch.rand(t, hc, device="cuda", generator=g)
    comb = torch.softmax(torch.randn(t, hc, hc, device="cuda", generator=g), -1)
    fn = torch.randn(nm, hc * d, device="cuda", generator=g) / (hc * d) ** 0.5
    scale = torch.rand(3, device="cuda", generator=g) + 0.5
    base = torch.randn(nm, device="cuda", generator=g) * 0.5
    w = torch.rand(d, device="cuda", generator=g) + 0.5
    full = (y, x, post, comb, fn, scale, base, w)
    errs = {}
    for n, args in enumerate((full, (None, x, None, None, *full[4:]), (*full[:4], None, None, None, None))):
        xk, xn, p2, c2 = hc_step(*args, 20, 1e-6, 1e-6, 1e-6)
        errs[n, "x"] = _err(xk, hc_step_ref(*args[:4], None, None, None, None, 20, 1e-6, 1e-6, 1e-6)[0])
        if args[4] is None:
            assert xn is None and p2 is None and c2 is None
            continue
        # the weights from the kernel's own X' (a sum-order flip of one bf16 X' element moves them by ~1e-6)
        _, xn_w, p_w, c_w = hc_step_ref(None, xk, None, None, *full[4:], 20, 1e-6, 1e-6, 1e-6)
        errs[n, "xn"], errs[n, "post"], errs[n, "comb"] = _err(xn, xn_w), _err(p2, p_w), _err(c2, c_w)
    tol = {"x": BF16_ULP, "xn": 2 * BF16_ULP, "post": 2e-5, "comb": 2e-5}
    assert all(e <= tol[k[1]] for k, e in errs.items()), errs


@pytest.mark.parametrize("t", [1, 16])
def test_route(t: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(t)
    d, e, k = 4096, 256, 6
    x = torch.randn(t, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(e, d, device="cuda", generator=g) / d**0.5).bfloat16()
    bias = torch.randn(e, device="cuda", generator=g) * 0.1
    tid = torch.rand(1000, e, device="cuda", generator=g).argsort(dim=1)[:, :k]
    ids = torch.randint(0, 1000, (t,), device="cuda", generator=g)
    for b, h in ((bias, None), (None, tid)):
        for sh in (-1, e):
            gi, gw = route(x, w, b, h, ids, k, True, 2.5, sh)
            wi, ww = route_ref(x, w, b, h, ids, k, True, 2.5, sh)
            oi, oj = gi.long().sort(dim=1), wi.long().sort(dim=1)
            assert torch.equal(oi.values, oj.values)
            _close(gw.gather(1, oi.indices), ww.gather(1, oj.indices), 1e-5)
