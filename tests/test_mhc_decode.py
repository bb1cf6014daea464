"""⑥ the one-launch decode mHC step (ds4f/kernels/mhc_decode.py) on CPU: under the Triton interpreter against
hc_step_ref and against hc_step's multi-launch path (all y / fn None combinations, T = 1 and 3, splits with a ragged
last chunk, several calls in a row on one arrival-count buffer that must come back zeroed), and compiled for sm_80 /
sm_90 offline (the last-arriving program's acq_rel atomic in the PTX)."""

from __future__ import annotations

import pytest
import torch

ITERS, EPS = 20, 1e-6


def _case(t: int, d: int, dtype: torch.dtype, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    hc, nm = 4, 24
    return (torch.randn(t, d, generator=g).to(dtype), torch.randn(t, hc, d, generator=g).to(dtype),
            2 * torch.rand(t, hc, generator=g), torch.softmax(torch.randn(t, hc, hc, generator=g), -1),
            torch.randn(nm, hc * d, generator=g) / (hc * d) ** 0.5, torch.rand(3, generator=g) + 0.5,
            torch.randn(nm, generator=g) * 0.5, torch.rand(d, generator=g) + 0.5)


def _err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    assert (a is None) == (b is None)
    if a is None:
        return 0.0
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return ((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item()


def check_decode_interpreted() -> None:
    from ds4f.kernels import mhc, mhc_decode
    from ds4f.kernels.mhc import hc_step, hc_step_ref

    assert mhc._INTERPRET, "run with TRITON_INTERPRET=1"
    cnt = mhc_decode._counters(torch.device("cpu"))
    calls = 0
    # fp32 streams: the kernel's rounding is fp32's (the weights' sum order and exp differ from torch's)
    for t, d, bd, iters in ((1, 40, None, ITERS), (3, 40, None, ITERS), (3, 40, 16, ITERS), (1, 64, 16, 1)):
        full = _case(t, d, torch.float32, t + d)
        for args in (full, (None, full[1], None, None, *full[4:]), (*full[:4], None, None, None, None)):
            want = hc_step_ref(*args, iters, EPS, EPS, EPS)
            for split in (False, True):  # split: comb's Sinkhorn as its own launch (the deferred form)
                got = mhc_decode.hc_step_decode(*args, iters, EPS, EPS, EPS, block_d=bd, split_sinkhorn=split)
                errs = [_err(g_, w_) for g_, w_ in zip(got, want)]
                assert max(errs) <= 2e-5, (t, d, bd, split, errs)
                assert not cnt.any(), cnt  # re-armed by each token's last program
                calls += 1
    # bf16 streams through hc_step: X' is the old path's to the bit; the weights / xn from the kernel's own X'
    for t in (1, 3):
        full = _case(t, 48, torch.bfloat16, 7 + t)
        first = None
        for _ in range(2):  # the second call reuses the counts the first left: the same bits again
            mhc.DECODE_MAX_T = 16
            xk, xn, post, comb = got = hc_step(*full, ITERS, EPS, EPS, EPS)
            assert not cnt.any(), cnt
            first = first or got
            assert all(torch.equal(a, b) for a, b in zip(got, first))
            mhc.DECODE_MAX_T = 0
            old = hc_step(*full, ITERS, EPS, EPS, EPS)
            mhc.DECODE_MAX_T = 16
            assert torch.equal(xk, old[0])
            # the interpreter rounds fp32 -> bf16 by truncation (hardware: to nearest), hence the bf16 ulps
            assert _err(xk, hc_step_ref(*full[:4], None, None, None, None, ITERS, EPS, EPS, EPS)[0]) <= 3 * 2**-7
            _, xn_w, post_w, comb_w = hc_step_ref(None, xk, None, None, *full[4:], ITERS, EPS, EPS, EPS)
            assert _err(post, post_w) <= 2e-5 and _err(comb, comb_w) <= 2e-5, (_err(post, post_w), _err(comb, comb_w))
            assert _err(xn, xn_w) <= 3 * 2**-7
            assert _err(post, old[2]) <= 2e-5 and _err(comb, old[3]) <= 2e-5 and _err(xn, old[1]) <= 3 * 2**-7
            calls += 1
    print("decode interpreted ok", calls)


def test_decode_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    out = run_interpreted("test_mhc_decode", "check_decode_interpreted")
    assert "decode interpreted ok 28" in out, out


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_decode_kernel_builds(arch: int) -> None:
    pytest.importorskip("triton")
    from ds4f.kernels import mhc_decode
    from tests.test_kernels_build import build

    types = dict(y_ptr="*bf16", x_ptr="*bf16", post_ptr="*fp32", comb_ptr="*fp32", fn_ptr="*fp32", scale_ptr="*fp32",
                 base_ptr="*fp32", w_ptr="*fp32", xo_ptr="*bf16", pd_ptr="*fp32", cnt_ptr="*i32", xn_ptr="*bf16",
                 post2_ptr="*fp32", comb2_ptr="*fp32", eps="fp32", norm_eps="fp32", rms_eps="fp32")
    for has_y in (False, True):
        k = build(mhc_decode._hc_decode, types, dict(ITERS=20, NM=24, NMP=32, BLOCK_D=32, BLOCK_S=128, BLOCK_F=4096,
                                                     HAS_Y=has_y, HAS_FN=True), arch, 8)
        assert "atom.global.gpu.acq_rel.add" in k["ptx"] or "atom.acq_rel.gpu.global.add" in k["ptx"], \
            [ln for ln in k["ptx"].splitlines() if "atom" in ln]
