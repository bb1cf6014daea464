"""⑥ kernels, the CUDA-core FP8 decode GEMV (ds4f/kernels/fp8_gemv_cc.py): under TRITON_INTERPRET=1 against
fp8_gemm.fp8_linear_ref (fp32 and UE8M0 scales, T = 1..4, K splits with re-armed counters, grouped rows, the ACC16
form's bf16 roundings, fp8_linear's dispatch), its config rules on CPU, and offline sm_80 / sm_90 / sm_121 builds:
no shared-memory staging or cp.async, barriers only after the loop, 8-byte weight and 16-byte x loads, the integer
widening."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from interp import run_interpreted
from test_fp8_gemv_interp import TOL, _rel  # fp32 outputs: summation order only


def fp8_weights(g: torch.Generator, n: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantized e4m3 weights [n, k] whose 128-row blocks differ in scale by orders of magnitude."""
    from ds4f.model.quant import quant_fp8_block

    w = torch.randn(n, k, generator=g) * 0.05 * torch.logspace(-2, 2, n)[:, None]
    return quant_fp8_block(w, fmt)


def check_grouped(g: torch.Generator, launch: Callable[..., None], cfgs: list[tuple[int, tuple[int, ...]]],
                  tol: float = TOL) -> None:
    """launch(x, w, ws, e8m0, out, groups, cfg) on x [T, 3, K] (a strided view, as wo_a's caller passes) and W [3 *
    128, K]: group i's rows read x[:, i] (fp8_linear_ref per group, fp32 outputs)."""
    from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_ref

    for t, cfg in cfgs:
        q, s = fp8_weights(g, 3 * 128, 256, "ue8m0")
        ws, e8m0 = _scale_arg(s)
        xs = torch.randn(t, 3, 2 * 256, generator=g).bfloat16()[:, :, 128:384]
        want = torch.stack([fp8_linear_ref(xs[:, i], q[128 * i:128 * (i + 1)], s[i:i + 1], torch.float32)
                            for i in range(3)], 1)
        out = torch.empty(t, 3, 128, dtype=torch.float32)
        launch(xs, q, ws, e8m0, out, 3, cfg)
        assert _rel(out, want) < tol, (t, cfg, _rel(out, want))


def spy(module: object, name: str) -> list[int]:
    """Wrap module.name so each call appends 1 to the returned list (and still runs)."""
    calls: list[int] = []
    real = getattr(module, name)
    setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def check_cc() -> None:
    from ds4f.kernels import arrival, fp8_gemv_cc
    from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_a8_ref, fp8_linear_ref

    g = torch.Generator().manual_seed(0)

    def weights(n: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_weights(g, n, k, fmt)

    # (T, N, K, scale fmt, (BLOCK_N, SPLIT, warps), DEPTH: blocks in flight; 2 with 1- and 2-block K slices too)
    for t, n, k, fmt, cfg, depth in [(1, 256, 256, "ue8m0", (64, 1, 4), 1), (3, 128, 512, "float32", (32, 2, 4), 1),
                                     (4, 256, 384, "ue8m0", (16, 3, 2), 1), (2, 192, 512, "float32", (64, 4, 4), 1),
                                     (1, 128, 640, "ue8m0", (32, 1, 4), 2), (2, 128, 512, "float32", (32, 2, 4), 2),
                                     (1, 128, 512, "ue8m0", (64, 4, 4), 2)]:
        q, s = weights(n, k, fmt)
        ws, e8m0 = _scale_arg(s)
        x = (torch.randn(t, k, generator=g) * 3).bfloat16()
        ref = fp8_linear_ref(x, q, s, torch.float32)
        for _ in range(2):  # the second call finds the split counters re-armed
            out = torch.empty(t, 1, n, dtype=torch.float32)
            fp8_gemv_cc.launch_cc(x.view(t, 1, k), q, ws, e8m0, out, 1, cfg, acc16=False, depth=depth)
            assert _rel(out[:, 0], ref) < TOL, (t, n, k, fmt, cfg, depth, _rel(out[:, 0], ref))
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv_cc"))

    # ACC16: the products and pairwise sums rounded to bf16 (the interpreter runs the roundings written out): within
    # a few bf16 steps of the fp32 reference, and not equal to the fp32 form (the roundings are there)
    for t, n, k, cfg in [(1, 256, 256, (64, 1, 4)), (4, 128, 512, (32, 2, 4))]:
        q, s = weights(n, k, "ue8m0")
        ws, e8m0 = _scale_arg(s)
        x = (torch.randn(t, k, generator=g) * 3).bfloat16()
        ref = fp8_linear_ref(x, q, s, torch.float32)
        out16, out32 = (torch.empty(t, 1, n, dtype=torch.float32) for _ in range(2))
        fp8_gemv_cc.launch_cc(x.view(t, 1, k), q, ws, e8m0, out16, 1, cfg, acc16=True)
        fp8_gemv_cc.launch_cc(x.view(t, 1, k), q, ws, e8m0, out32, 1, cfg, acc16=False)
        assert 1e-5 < _rel(out16[:, 0], ref) < 1e-2, (t, cfg, _rel(out16[:, 0], ref))
        assert _rel(out32[:, 0], ref) < TOL

    # A8: x quantized per 128 columns as the reference does: fp8_linear_a8_ref's math (fp32 products: up to the
    # summation order; ACC16: the e4m3 products are exact in bf16, the pairs' sums round), and not the w8 form's;
    # blocks of very different magnitude, a K split, and a row past T
    for t, n, k, cfg, depth in [(1, 256, 512, (64, 2, 4), 2), (3, 128, 384, (32, 1, 4), 1)]:
        q, s = weights(n, k, "ue8m0")
        ws, e8m0 = _scale_arg(s)
        x = (torch.randn(t, k, generator=g) * torch.logspace(-3, 3, k // 128).repeat_interleave(128)).bfloat16()
        want = fp8_linear_a8_ref(x, q, s, torch.float32)
        out, out16 = (torch.empty(t, 1, n, dtype=torch.float32) for _ in range(2))
        fp8_gemv_cc.launch_cc(x.view(t, 1, k), q, ws, e8m0, out, 1, cfg, acc16=False, depth=depth, a8=True)
        fp8_gemv_cc.launch_cc(x.view(t, 1, k), q, ws, e8m0, out16, 1, cfg, acc16=True, depth=depth, a8=True)
        assert _rel(out[:, 0], want) < TOL, (t, cfg, _rel(out[:, 0], want))
        assert _rel(out16[:, 0], want) < 1e-2, (t, cfg, _rel(out16[:, 0], want))
        assert _rel(out[:, 0], fp8_linear_ref(x, q, s, torch.float32)) > 10 * TOL  # the quantization is there

    # NORM: RMSNorm_g(x) inside the kernel (1 / rms of the whole row in every program, K splits kept), x rounded to
    # bf16 after the norm as the separate launch (model.layers.RMSNorm) does; rows past T in the 4-token form
    from ds4f.model.layers import rms_normalize

    for t, n, k, cfg, depth, acc16 in [(1, 256, 512, (64, 2, 4), 2, False), (3, 128, 384, (32, 3, 4), 1, False),
                                       (1, 128, 512, (32, 4, 4), 1, True)]:
        q, s = weights(n, k, "ue8m0")
        ws, e8m0 = _scale_arg(s)
        x = (torch.randn(t, k, generator=g) * 3).bfloat16()
        gw = torch.rand(k, generator=g) * 2
        xn = (gw * rms_normalize(x.float(), 1e-6)).bfloat16()
        want = fp8_linear_ref(xn, q, s, torch.float32)
        out = torch.empty(t, 1, n, dtype=torch.float32)
        fp8_gemv_cc.launch_cc(x.view(t, 1, k), q, ws, e8m0, out, 1, cfg, acc16=acc16, depth=depth, norm=(gw, 1e-6))
        assert _rel(out[:, 0], want) < (1e-2 if acc16 else 1e-4), (t, cfg, _rel(out[:, 0], want))
        assert _rel(out[:, 0], fp8_linear_ref(x, q, s, torch.float32)) > 1e-2  # the norm is there
    with pytest.raises(ValueError, match="one group"):
        fp8_gemv_cc.launch_cc(x.view(1, 1, k), q, ws, e8m0, out, 1, (32, 1, 4), norm=(gw[:128], 1e-6))

    # grouped: x [T, G, K] (a strided view, as wo_a's caller passes), W [G*N, K]; group i's rows read x[:, i]
    check_grouped(g, lambda *a: fp8_gemv_cc.launch_cc(*a, acc16=False), [(3, (32, 2, 4)), (1, (64, 1, 4))])

    # fp8_linear's decode GEMV entry takes this form for every shape with DS4F_FP8_GEMV_CC=1 (generic tiles, T up
    # to DS4F_FP8_GEMV_CC_MAX_T), and not when off
    from ds4f.kernels.fp8_gemm import Opts, fp8_linear

    calls = spy(fp8_gemv_cc, "launch_cc")
    fp8_gemv_cc.ENABLED, fp8_gemv_cc.ALL_SHAPES, fp8_gemv_cc.MAX_T, fp8_gemv_cc.ACC16 = True, True, 4, False
    q, s = weights(256, 512, "ue8m0")
    x = (torch.randn(3, 512, generator=g) * 3).bfloat16()
    got = fp8_linear(x, q, s, out_dtype=torch.float32, opts=Opts(gemv=True))
    assert calls == [1] and _rel(got, fp8_linear_ref(x, q, s, torch.float32)) < TOL
    # fp8_gemv.linear_norm (the decode q_norm + wq_b) takes this form with its norm where it takes the shape
    from ds4f.kernels import fp8_gemv

    fp8_gemv_cc.NORM = True  # DS4F_FP8_GEMV_CC_NORM=1 (off by default: measured slower)
    gw = torch.rand(512, generator=g) * 2
    ws, e8m0 = _scale_arg(s)
    x1 = x[:1].contiguous()
    got = fp8_gemv.linear_norm(x1, gw, 1e-6, q, ws, e8m0, False)
    assert calls == [1, 1] and got.dtype == torch.bfloat16
    want = fp8_linear_ref((gw * rms_normalize(x1.float(), 1e-6)).bfloat16(), q, s, torch.float32)
    assert _rel(got.float(), want) < 1e-2, _rel(got.float(), want)
    fp8_gemv_cc.ENABLED = False
    fp8_linear(x, q, s, out_dtype=torch.float32, opts=Opts(gemv=True))
    assert calls == [1, 1]
    print("ok")


def test_cc_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_fp8_gemv_cc", "check_cc").strip().endswith("ok")


def test_cc_config_rules() -> None:
    from ds4f.kernels import fp8_gemv_cc as cc

    assert cc.valid((64, 2, 4), 4096, 4096, 1) and not cc.valid((64, 3, 4), 4096, 4096, 1)  # 32 blocks / 3
    assert not cc.valid((64, 1, 4), 4096, 4000, 1) and not cc.valid((256, 1, 4), 4096, 4096, 1)
    assert not cc.valid((64, 1, 4), 4 * 48, 4096, 4)  # 48-row groups: 64-row tiles would straddle them
    for nt, k, groups in [(1536, 4096, 1), (16384, 1024, 1), (4096, 4096, 4), (4096, 1024, 1), (2048, 4096, 1)]:
        c = cc.generic_config(nt, k, groups, 132)
        assert cc.valid(c, nt, k, groups), (nt, k, groups, c)
        assert nt // c[0] * c[1] <= 4 * 132 or c[1] == 1, c
    # the default ("table"): CONFIGS_CC's shapes at T = 1 (their tiles and depth), others on the MMA kernel
    from ds4f.kernels.fp8_gemv import CONFIGS

    assert cc.ENABLED and not cc.ALL_SHAPES and cc.MAX_T == 1 and cc.ACC16
    x1, x2 = torch.zeros(1, 1, 4096).bfloat16(), torch.zeros(2, 1, 4096).bfloat16()
    for name, (shape, _) in CONFIGS.items():
        nt, k, groups = shape
        x = torch.zeros(1, groups, k).bfloat16()
        assert cc.takes(x, nt, k, groups) == (name in cc.CONFIGS_CC), name
        if name in cc.CONFIGS_CC:
            assert cc.config(nt, k, groups, 132) == (cc.CONFIGS_CC[name][:3], cc.CONFIGS_CC[name][3])
            assert cc.valid(cc.CONFIGS_CC[name][:3], nt, k, groups), name
    assert cc.takes(x1, 2048, 4096, 1) and not cc.takes(x2, 2048, 4096, 1)  # W13_TP2 at T = 1, not 2
    assert not cc.takes(x1, 1024, 4096, 1)  # a shape the table lacks
    with pytest.raises(ValueError, match="invalid"):
        cc.launch_cc(torch.zeros(5, 1, 256).bfloat16(), torch.zeros(64, 256), torch.zeros(1, 2), False,
                     torch.zeros(5, 1, 64), 1, (64, 1, 4))


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_cc_builds_offline(arch) -> None:
    """The loop keeps the weights in registers: no shared-memory staging (only a few bytes for the split's
    reduction, if any), no CTA barrier before the arrival, 16-byte global loads, the integer e4m3 widening."""
    pytest.importorskip("triton")
    from ds4f.kernels import fp8_gemv_cc as cc
    from tests.test_kernels_build import build

    types = dict(x_ptr="*i64", w_ptr="*i32", ws_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32")
    div = ("x_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "K", "GN", "s_xt", "s_xg", "s_wsn", "s_ot",
           "k_per", "NT")
    types.update(g_ptr="*i64", eps="fp32")
    for tp, split, depth, a8, norm in ((1, False, 1, False, False), (4, True, 1, False, False),
                                       (1, True, 2, True, False), (4, False, 1, True, False),
                                       (1, True, 2, False, True)):
        k = build(cc._gemv_cc, types, dict(BLOCK_N=64, TP=tp, SPLIT_K=split, SCALE_E8M0=True, F32=False,
                                           ACC16=tp > 1 or norm, DEPTH=depth, A8=a8, NORM=norm), arch, 4, 1,
                  div16=div)
        ptx = k["ptx"]
        assert k["shared"] <= 1024, k["shared"]  # the output rows' layout change only
        # two CTA barriers per output row's layout change (after the loop), one before the split's arrival
        assert ptx.count("bar.sync") <= 2 * tp + int(split) and "cp.async" not in ptx, ptx.count("bar.sync")
        assert "ld.global.v2.b32" in ptx and "ld.global.v2.b64" in ptx  # 8 weight bytes, 8 x values per load
        assert "fma.rn.bf16x2" in ptx and "0x87f087f0" in ptx.lower(), arch
