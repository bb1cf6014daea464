"""The one-launch decode mHC step (ds4f/kernels/mhc_decode.py) on CUDA at V4-Flash width (D = 4096, hc = 4, bf16):
against hc_step_ref and against hc_step's multi-launch path, repeated calls, every (y, fn) None combination, and two
chained steps captured in a CUDA graph replayed twice (the arrival counts must re-arm themselves)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

BF16_ULP = 2**-7
ITERS, EPS = 20, 1e-6
TOL = {"x": BF16_ULP, "xn": 2 * BF16_ULP, "post": 2e-5, "comb": 2e-5}


def _case(t: int, seed: int, d: int = 4096) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(seed)
    hc, nm = 4, 24
    return (torch.randn(t, d, device="cuda", generator=g).bfloat16(),
            torch.randn(t, hc, d, device="cuda", generator=g).bfloat16(),
            2 * torch.rand(t, hc, device="cuda", generator=g),
            torch.softmax(torch.randn(t, hc, hc, device="cuda", generator=g), -1),
            torch.randn(nm, hc * d, device="cuda", generator=g) / (hc * d) ** 0.5,
            torch.rand(3, device="cuda", generator=g) + 0.5, torch.randn(nm, device="cuda", generator=g) * 0.5,
            torch.rand(d, device="cuda", generator=g) + 0.5)


def _err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    assert (a is None) == (b is None)
    if a is None:
        return 0.0
    assert a.shape == b.shape and a.dtype == b.dtype
    return ((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item()


def _step(args: tuple, decode: bool) -> tuple:
    from ds4f.kernels import mhc

    prev, mhc.DECODE_MAX_T = mhc.DECODE_MAX_T, 16 if decode else 0
    try:
        return mhc.hc_step(*args, ITERS, EPS, EPS, EPS)
    finally:
        mhc.DECODE_MAX_T = prev


@pytest.mark.parametrize("t", [1, 4, 15])
def test_decode_matches_ref_and_old_path(t: int) -> None:
    from ds4f.kernels.mhc import hc_step_ref
    from ds4f.kernels.mhc_decode import _counters

    full = _case(t, t)
    errs = {}
    for n, args in enumerate((full, (None, full[1], None, None, *full[4:]), (*full[:4], None, None, None, None))):
        got = _step(args, True)
        for rep in range(3):  # repeated calls: the same bits (no leftover counts, fixed sum order)
            again = _step(args, True)
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, again)), (n, rep)
        old = _step(args, False)
        xk = got[0]
        errs[n, "x", "ref"] = _err(xk, hc_step_ref(*args[:4], None, None, None, None, ITERS, EPS, EPS, EPS)[0])
        errs[n, "x", "old"] = _err(xk, old[0])
        if args[4] is None:
            assert got[1:] == (None, None, None)
            continue
        want = hc_step_ref(None, xk, None, None, *full[4:], ITERS, EPS, EPS, EPS)  # on the kernel's own X'
        for k, i in (("xn", 1), ("post", 2), ("comb", 3)):
            errs[n, k, "ref"] = _err(got[i], want[i])
            errs[n, k, "old"] = _err(got[i], old[i])
    torch.cuda.synchronize()
    assert not _counters(full[1].device).any()
    assert all(e <= TOL[k[1]] for k, e in errs.items()), errs


@pytest.mark.parametrize("t", [1, 4])
def test_decode_in_cuda_graph(t: int) -> None:
    """Two chained sublayer steps captured once, replayed twice on new inputs: each replay = eager calls."""
    from ds4f.kernels.mhc import hc_step

    a, b = _case(t, 1), _case(t, 2)
    y1, x, post, comb = (v.clone() for v in a[:4])
    y2 = b[0].clone()

    def two() -> tuple:
        x1, _, p1, c1 = hc_step(y1, x, post, comb, *a[4:], ITERS, EPS, EPS, EPS)
        return hc_step(y2, x1, p1, c1, *b[4:], ITERS, EPS, EPS, EPS)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        two()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = two()
    for seed in (3, 4):
        new = _case(t, seed)
        for dst, src in zip((y1, x, post, comb, y2), (*new[:4], new[0] * 0.5)):
            dst.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        want = two()
        assert all(torch.equal(o, w) for o, w in zip(out, want)), seed


@pytest.mark.parametrize("t", [1, 4])
def test_deferred_sinkhorn_on_a_side_stream(t: int) -> None:
    """sinkhorn_stream: comb's Sinkhorn launched on another stream equals the inline one once joined, eagerly and in a
    captured graph of two chained steps (as FastModel._hc runs it: join before the next step reads comb)."""
    from ds4f.kernels.mhc_decode import hc_step_decode

    full = _case(t, 100 + t)
    side = torch.cuda.Stream()
    inline = hc_step_decode(*full, ITERS, EPS, EPS, EPS)
    got = hc_step_decode(*full, ITERS, EPS, EPS, EPS, sinkhorn_stream=side)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], inline[:3]))
    assert _err(got[3], inline[3]) <= TOL["comb"]  # the same fp32 ops in another kernel (contraction may differ)

    def two_steps(deferred: bool) -> tuple:
        kw = dict(sinkhorn_stream=side) if deferred else {}
        x, xn, post, comb = hc_step_decode(*full, ITERS, EPS, EPS, EPS, **kw)
        if deferred:
            torch.cuda.current_stream().wait_stream(side)
        out = hc_step_decode(xn, x, post, comb, *full[4:], ITERS, EPS, EPS, EPS, **kw)
        if deferred:
            torch.cuda.current_stream().wait_stream(side)
        return out

    want = two_steps(False)
    two_steps(True)  # warm outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = two_steps(True)
    for _ in range(2):
        g.replay()
        torch.cuda.synchronize()
        errs = [_err(a, b) for a, b in zip(out, want)]
        assert errs[0] <= TOL["x"] and errs[1] <= TOL["xn"] and errs[2] <= TOL["post"] and errs[3] <= TOL["comb"], errs
