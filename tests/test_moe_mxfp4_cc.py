"""⑥ kernels, the CUDA-core MXFP4 decode (moe_mxfp4_cc) on CPU: its written-out arithmetic (cc_ref) against the
exact reference, the Triton kernels under TRITON_INTERPRET=1 against cc_ref (K splits with arrival sums, one or two
blocks in flight, 8-64-row tiles, the shared expert's output, a repeated expert), the dispatch, and offline builds
for sm_80 / sm_90 / sm_121 (no shared-memory staging in the loop, the PTX word routine). The PTX routine itself is
checked on the GPU (tests/gpu/test_moe_mxfp4_cc_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted
from test_moe_mxfp4_a8 import _case, _rel

from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4_ref
from ds4f.kernels.moe_mxfp4_cc import cc_ref


def test_cc_ref_rounds_the_products_only():
    """bf16 products and pairwise sums: within a few bf16 steps of the exact reference, and not equal to it."""
    x, w13q, w13s, w2q, w2s, ids, wts = _case(5, 512, 256, 3, 2, seed=7)
    got = cc_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    want = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert 1e-4 < _rel(got, want) < 1e-2, _rel(got, want)


def check_interpreted() -> None:
    from ds4f.kernels import arrival
    from ds4f.kernels import moe_mxfp4 as mm
    from ds4f.kernels import moe_mxfp4_cc as mcc

    # (D, I, up tiles + down tiles): BLOCK_N, BLOCK_K (256), SPLIT, warps, DEPTH
    for D, I, tiles in [(512, 256, (32, 256, 2, 4, 1, 16, 256, 1, 4, 2)),
                        (256, 256, (16, 256, 1, 4, 2, 64, 256, 1, 4, 1)),
                        (512, 512, (64, 256, 1, 4, 2, 32, 256, 2, 4, 2))]:
        x, w13q, w13s, w2q, w2s, ids, wts = _case(5, D, I, 3, 2, seed=D + I)
        ids[-1, 1] = ids[-1, 0]  # a repeated expert inside one token's picks
        ref = cc_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
        exact = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
        for _ in range(2):  # the second call finds the arrival counters re-armed
            out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, CC=1))
            # the roundings of cc_ref (other fp32 summation orders: a flipped bf16 rounding of an activation at most)
            assert _rel(out, ref) < 2e-3 and _rel(out, ref) < 0.5 * _rel(out, exact), (tiles, _rel(out, ref),
                                                                                       _rel(out, exact))
        sh = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
        out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, CC=1),
                                 shared_out=sh)
        assert _rel(out, ref.float() + sh.float()) < 5e-3, tiles
    assert all(int(b.abs().sum()) == 0 for n in ("mxfp4_cc_up", "mxfp4_cc_down") for b in arrival.buffers(n))
    assert not mcc.fits(((32, 128, 1, 4, 1), (32, 256, 1, 4, 1)), 512, 256)  # 256-column steps only
    print("ok")


def test_cc_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_moe_mxfp4_cc", "check_interpreted").strip().endswith("ok")


def test_cc_dispatch_rules(monkeypatch) -> None:
    from ds4f.kernels import moe_mxfp4_cc as mcc

    assert not mcc.ENABLED  # opt-in (DS4F_MXFP4_CC=1) until a GPU sweep times it
    cuda = torch.device("cuda")
    assert not mcc.cc_default(cuda, 4096, 1024, 1)
    monkeypatch.setattr(mcc, "ENABLED", True)
    assert mcc.cc_default(cuda, 4096, 1024, 1) and mcc.cc_default(cuda, 4096, 1024, 4)
    assert not mcc.cc_default(torch.device("cpu"), 4096, 1024, 1) and not mcc.cc_default(cuda, 4096, 512, 1)
    for (D, I, _), cfgs in mcc.CONFIGS.items():
        assert mcc.fits(cfgs, D, I), cfgs
    assert not mcc.fits(((48, 256, 1, 4, 1), (32, 256, 1, 4, 1)), 4096, 1024)  # BLOCK_N a power of two
    assert not mcc.fits(((32, 256, 3, 4, 1), (32, 256, 1, 4, 1)), 4096, 1024)  # 16 blocks / 3
    assert not mcc.fits(((32, 256, 1, 4, 3), (32, 256, 1, 4, 1)), 4096, 1024)  # DEPTH 1 or 2


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_cc_builds_offline(arch) -> None:
    """The loop streams words into registers: shared memory only for the final row sums, no cp.async, the word
    routine's bf16x2 FMAs and scale loads, 16-byte x loads."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_mxfp4_cc as mcc
    from tests.test_kernels_build import build

    types = dict(x_ptr="*bf16", q_ptr="*i16", s_ptr="*u8", ids_ptr="*i32", a_ptr="*bf16", part_ptr="*fp32",
                 lock_ptr="*i32", limit="fp32", tw_ptr="*fp32", sh_ptr="*bf16", out_ptr="*bf16")
    div = ("x_ptr", "q_ptr", "s_ptr", "a_ptr", "part_ptr", "s_xt", "s_qe", "s_qn", "s_se", "s_sn", "s_at", "out_ptr",
           "sh_ptr", "s_sht", "s_ot")
    for fn, consts in ((mcc._cc_up, dict(I=1024, DM=4096, TOPK=6, BLOCK_N=32, BLOCK_K=256, SPLIT=4, F32=False,
                                         DEPTH=2)),
                       (mcc._cc_down, dict(DM=4096, I=1024, TOPK=6, BLOCK_N=32, BLOCK_K=256, SPLIT=2, HAS_SH=True,
                                           F32=False, DEPTH=1, SUB=False))):
        k = build(fn, types, consts, arch, 4, 1, div16=tuple(d for d in div if d in fn.arg_names))
        ptx = k["ptx"]
        assert k["shared"] <= 1024, k["shared"]
        assert "cp.async" not in ptx and "fma.rn.bf16x2" in ptx and "ld.global.nc.u8" in ptx, fn
        assert "ld.global.v2.b64" in ptx, fn  # two of x's int64 words per thread and row
        # SUB: x times 2^100 (bf16 0x7180), no decode multiply by 2^126; else the multiply and x as it is
        sub = consts.get("SUB", True)
        assert ("0x71807180" in ptx.lower() or "1904242048" in ptx) == sub, (fn, sub)
