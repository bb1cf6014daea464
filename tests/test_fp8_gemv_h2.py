"""⑥ kernels, the f16x2 FP8 decode GEMV (ds4f/kernels/fp8_gemv_h2.py): under TRITON_INTERPRET=1 against
fp8_gemm.fp8_linear_ref (fp32 and UE8M0 scales, T = 1..4, K splits with re-armed counters, grouped rows, activations
across f16's range), w8_gemv's dispatch by DS4F_FP8_GEMV_H2's buckets, its config rules, and offline sm_90 / sm_121
builds (the f16x2 conversions and fmas, no shared-memory staging)."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted
from test_fp8_gemv_cc import check_grouped, fp8_weights, spy
from test_fp8_gemv_interp import _rel

TOL16 = 4e-3  # products and 4-term chains in f16 (2^-11 per rounding) against the fp32 reference


def check_h2() -> None:
    from ds4f.kernels import arrival, fp8_gemv_h2
    from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_ref

    g = torch.Generator().manual_seed(0)
    # (T, N, K, scale fmt, (BLOCK_N, SPLIT, warps), DEPTH)
    for t, n, k, fmt, cfg, depth in [(1, 256, 256, "ue8m0", (64, 1, 4), 1), (3, 128, 512, "float32", (32, 2, 4), 1),
                                     (4, 256, 384, "ue8m0", (16, 3, 2), 2), (2, 128, 512, "float32", (64, 4, 4), 2)]:
        q, s = fp8_weights(g, n, k, fmt)
        ws, e8m0 = _scale_arg(s)
        x = (torch.randn(t, k, generator=g) * 3).bfloat16()
        ref = fp8_linear_ref(x, q, s, torch.float32)
        for _ in range(2):  # the second call finds the split counters re-armed
            out = torch.empty(t, 1, n, dtype=torch.float32)
            fp8_gemv_h2.launch_h2(x.view(t, 1, k), q, ws, e8m0, out, 1, cfg, depth=depth)
            err = _rel(out[:, 0], ref)
            assert 1e-6 < err < TOL16, (t, n, k, fmt, cfg, depth, err)  # the f16 roundings are there, and small
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv_h2"))

    # activations across f16's range: tiny (f16 subnormals) and large (|x| up to 2000: the 2^-8 keeps the chains
    # finite) 128-column blocks
    q, s = fp8_weights(g, 128, 1024, "ue8m0")
    ws, e8m0 = _scale_arg(s)
    x = (torch.randn(2, 1024, generator=g) * torch.logspace(-6, 3.3, 8).repeat_interleave(128)).bfloat16()
    out = torch.empty(2, 1, 128, dtype=torch.float32)
    fp8_gemv_h2.launch_h2(x.view(2, 1, 1024), q, ws, e8m0, out, 1, (32, 2, 4))
    assert out.isfinite().all() and _rel(out[:, 0], fp8_linear_ref(x, q, s, torch.float32)) < TOL16

    # grouped: x [T, G, K] (a strided view, as wo_a's caller passes), W [G*N, K]; group i's rows read x[:, i]
    check_grouped(g, lambda *a: _grouped(fp8_gemv_h2, *a), [(3, (32, 2, 4)), (1, (64, 1, 4))], TOL16)

    # fp8_linear's decode GEMV entry takes this form for the table's shapes in DS4F_FP8_GEMV_H2's buckets only
    from ds4f.kernels import fp8_gemv, fp8_gemv_cc
    from ds4f.kernels.fp8_gemm import Opts, fp8_linear

    calls, cc_calls = spy(fp8_gemv_h2, "launch_h2"), spy(fp8_gemv_cc, "launch_cc")
    nt, k = 256, 512  # a table shape of this process (the real ones take minutes in the interpreter)
    fp8_gemv.CONFIGS["TINY"] = ((nt, k, 1), fp8_gemv.CONFIGS["W2_TP2"][1])
    fp8_gemv_cc.CONFIGS_CC["TINY"] = (32, 2, 4, 1)
    fp8_gemv_h2.CONFIGS_H2["TINY"] = {1: (32, 2, 4, 1), 4: (64, 4, 4, 2)}
    q, s = fp8_weights(g, nt, k, "ue8m0")
    # (T, buckets, (f16x2 launches, CUDA-core launches)): T = 1 outside the buckets takes the CUDA-core form as before,
    # T = 4 outside them the MMA kernel
    for t, buckets, want in [(1, {4}, (0, 1)), (3, {4}, (1, 0)), (1, {1}, (1, 0)), (4, set(), (0, 0))]:
        fp8_gemv_h2.BUCKETS = frozenset(buckets)
        x = torch.randn(t, k, generator=g).bfloat16()
        n0, c0 = len(calls), len(cc_calls)
        got = fp8_linear(x, q, s, out_dtype=torch.float32, opts=Opts(gemv=True))
        assert (len(calls) - n0, len(cc_calls) - c0) == want, (t, buckets)
        assert _rel(got, fp8_linear_ref(x, q, s, torch.float32)) < 3e-2, (t, buckets)
    print("ok")


def _grouped(mod, x, q, ws, e8m0, out, groups, cfg) -> None:
    mod.launch_h2(x, q, ws, e8m0, out, groups, cfg)


def test_h2_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_fp8_gemv_h2", "check_h2").strip().endswith("ok")


def test_h2_config_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from ds4f.kernels import fp8_gemv_cc as cc
    from ds4f.kernels import fp8_gemv_h2 as h2
    from ds4f.kernels.fp8_gemv import CONFIGS

    assert frozenset({1}) == h2.BUCKETS  # the default: one token, CONFIGS_H2's shapes
    x1 = torch.zeros(1, 1, 4096).bfloat16()
    assert not h2.takes(x1, 1536, 4096, 1)  # a CPU tensor: not sm_89+
    for name, (shape, _) in CONFIGS.items():  # CONFIGS_H2's (valid) entries, nothing for the other shapes
        nt, k, groups = shape
        for t in (1, 4):
            e = h2.CONFIGS_H2.get(name, {}).get(1 if t == 1 else 4)
            assert h2.config(nt, k, groups, t) == (None if e is None else (e[:3], e[3])), (name, t)
            assert e is None or cc.valid(e[:3], nt, k, groups), (name, t)
    monkeypatch.setattr(h2, "BUCKETS", frozenset({1}))
    monkeypatch.setattr(h2, "supported", lambda device: True)  # sm_89+ (here: a CPU tensor)
    assert h2.takes(x1, 1536, 4096, 1) and not h2.takes(x1, 4096, 4096, 1)  # IN_PROJ listed, WO_B_TP2 not
    assert not h2.takes(torch.zeros(4, 1, 4096).bfloat16(), 1536, 4096, 1)  # four tokens: not in the buckets
    monkeypatch.setattr(h2, "_TILES", (16, 1, 4, 2))  # DS4F_FP8_GEMV_H2_TILES: every table shape, not others
    assert h2.config(4096, 4096, 1, 1) == ((16, 1, 4), 2) and h2.config(4096, 1000, 1, 1) is None
    monkeypatch.setenv("DS4F_FP8_GEMV_H2", "1,x")
    with pytest.raises(ValueError, match="DS4F_FP8_GEMV_H2"):
        from ds4f.kernels.knobs import env_buckets

        env_buckets("DS4F_FP8_GEMV_H2", "")
    with pytest.raises(ValueError, match="invalid"):
        h2.launch_h2(torch.zeros(5, 1, 256).bfloat16(), torch.zeros(64, 256), torch.zeros(1, 2), False,
                     torch.zeros(5, 1, 64), 1, (64, 1, 4))


@pytest.mark.parametrize("arch", [90, 121])
def test_h2_builds_offline(arch: int) -> None:
    """The loop keeps the weights in registers (no shared-memory staging beyond the split's reduction), widens them
    by cvt.rn.f16x2.e4m3x2 and dots by fma.rn.f16x2, at one and four tokens, with and without a K split."""
    pytest.importorskip("triton")
    from ds4f.kernels import fp8_gemv_h2 as h2
    from tests.test_kernels_build import build

    types = dict(x_ptr="*i64", w_ptr="*i32", ws_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32")
    div = ("x_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "K", "GN", "s_xt", "s_xg", "s_wsn", "s_ot",
           "k_per", "NT")
    for tp, split, depth in ((1, False, 1), (4, True, 2), (2, True, 1), (4, False, 1)):
        k = build(h2._gemv_h2, types, dict(BLOCK_N=64, TP=tp, SPLIT_K=split, SCALE_E8M0=True, F32=False,
                                           DEPTH=depth), arch, 4, 1, div16=div)
        ptx = k["ptx"]
        assert "cvt.rn.f16x2.e4m3x2" in ptx and "fma.rn.f16x2" in ptx and "cp.async" not in ptx, (tp, split)
        assert k["shared"] <= 4096, (tp, split, k["shared"])
