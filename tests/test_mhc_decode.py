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


def check_ar_interpreted() -> None:
    """Two ranks as forked processes over one shared mapping (the "NVLink"): each passes its own partial y (bf16, or
    fp32 with a bf16 term: the ADD form) to the launch with an in-launch all-reduce (ar), over calls of changing
    token counts; every output equals, bit for bit on both ranks, the plain launch on push_all_reduce_ref's sum of
    the ranks' terms, and each program's epoch counts the calls it was in."""
    import random
    import time

    from forked import run_ranks

    from ds4f.kernels import mhc_decode
    from ds4f.kernels import push_allreduce as pa

    world, d, bd = 2, 64, 16
    cap = 4 * d

    def body(rank: int, addrs: list[int]) -> None:
        ar = pa.PushAllReduce(addrs, rank, world, cap, torch.device("cpu"), block=bd, warps=1, spin_iters=1 << 22)
        rng = random.Random(rank)
        counts = torch.zeros(cap // bd, dtype=torch.int32)
        for i, (t, add) in enumerate(((1, False), (3, True), (1, True), (4, False), (2, False))):
            y, x, post, comb, *rest = _case(t, d, torch.bfloat16, 100 + i)  # the same on both ranks
            g = torch.Generator().manual_seed(1000 * i)
            parts = [torch.randn(t, d, generator=g) * (q + 1) for q in range(world)]
            extras = [torch.randn(t, d, generator=g).bfloat16() for _ in range(world)]
            terms = [(p + e.float()).bfloat16() for p, e in zip(parts, extras)] if add else [p.bfloat16()
                                                                                            for p in parts]
            time.sleep(rng.random() * 0.05)  # skew: the ranks enter each call at different times
            got = mhc_decode.hc_step_decode(parts[rank] if add else terms[rank], x, post, comb, *rest, ITERS, EPS,
                                            EPS, EPS, split_sinkhorn=True, ar=ar,
                                            extra=extras[rank] if add else None)
            want = mhc_decode.hc_step_decode(pa.push_all_reduce_ref(terms), x, post, comb, *rest, ITERS, EPS, EPS,
                                             EPS, block_d=bd, split_sinkhorn=True)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (rank, i, [_err(a, b) for a, b in
                                                                                  zip(got, want)])
            counts[: t * d // bd] += 1
        assert torch.equal(ar.epoch, counts), (ar.epoch, counts)
        assert ar.error() == 0

    run_ranks(world, pa.region_numel(world, cap, bd), body)
    print("ar interpreted ok")


def test_ar_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    out = run_interpreted("test_mhc_decode", "check_ar_interpreted")
    assert "ar interpreted ok" in out, out


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_ar_kernel_builds(arch: int) -> None:
    """The in-launch all-reduce form (plain and ADD) builds with one system-scope release flag per peer, the
    system-scope acquire spin, the %globaltimer bound and the trap."""
    pytest.importorskip("triton")
    from ds4f.kernels import mhc_decode
    from tests.test_kernels_build import build

    types = dict(y_ptr="*bf16", x_ptr="*bf16", post_ptr="*fp32", comb_ptr="*fp32", fn_ptr="*fp32", scale_ptr="*fp32",
                 base_ptr="*fp32", w_ptr="*fp32", xo_ptr="*bf16", pd_ptr="*fp32", cnt_ptr="*i32", xn_ptr="*bf16",
                 post2_ptr="*fp32", comb2_ptr="*fp32", eps="fp32", norm_eps="fp32", rms_eps="fp32",
                 addr_ptr="*i64", epoch_ptr="*i32", err_ptr="*i32", extra_ptr="*bf16", rank="i32", timeout="i64")
    for add in (False, True):
        k = build(mhc_decode._hc_decode, dict(types, y_ptr="*fp32") if add else types,
                  dict(ITERS=20, NM=24, NMP=32, BLOCK_D=32, BLOCK_S=128, BLOCK_F=4096, HAS_Y=True, HAS_FN=True,
                       SINK=False, AR=True, W=2, CAP=262144, MAXB=8192, TIMER=True, TRAP=True, SW_ROUND=False,
                       ADD=add), arch, 4)
        ptx = k["ptx"]
        assert ptx.count("atom.global.sys.release.exch.b32") == 1 and "sys.acquire" in ptx
        assert "%globaltimer" in ptx and "trap;" in ptx
