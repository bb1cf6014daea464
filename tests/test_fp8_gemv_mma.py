"""⑥ kernels, the register-fed MMA decode GEMV (ds4f/kernels/fp8_gemv_mma.py): under TRITON_INTERPRET=1 (its MMA
emulation rebuilt from the same lane registers) against fp8_gemm.fp8_linear_ref (fp32 and UE8M0 scales, T = 1..8,
K splits with re-armed counters, grouped rows, two tiles per warp, fp8_linear's dispatch when on), its config rules
on CPU, and offline sm_80 / sm_90 / sm_121 builds: the MMAs from registers, 16-byte loads, no shared memory or
barrier in the loop."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted
from test_fp8_gemv_cc import check_grouped, fp8_weights, spy  # the CUDA-core GEMV's shared checks
from test_fp8_gemv_interp import TOL, _rel  # fp32 outputs: summation order only


def check_mma() -> None:
    from ds4f.kernels import arrival, fp8_gemv_mma
    from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_ref

    g = torch.Generator().manual_seed(0)

    def weights(n: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        return fp8_weights(g, n, k, fmt)

    # (T, N, K, scale fmt, (warps, tiles, split))
    for t, n, k, fmt, cfg in [(1, 128, 256, "ue8m0", (4, 2, 1)), (3, 128, 512, "float32", (2, 1, 2)),
                              (8, 256, 384, "ue8m0", (4, 1, 3)), (5, 64, 256, "float32", (1, 2, 1)),
                              (2, 256, 512, "ue8m0", (8, 1, 4))]:
        q, s = weights(n, k, fmt)
        ws, e8m0 = _scale_arg(s)
        x = (torch.randn(t, k, generator=g) * 3).bfloat16()
        ref = fp8_linear_ref(x, q, s, torch.float32)
        for _ in range(2):  # the second call finds the split counters re-armed
            out = torch.empty(t, 1, n, dtype=torch.float32)
            fp8_gemv_mma.launch_mma(x.view(t, 1, k), q, ws, e8m0, out, 1, cfg)
            assert _rel(out[:, 0], ref) < TOL, (t, n, k, fmt, cfg, _rel(out[:, 0], ref))
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv_mma"))

    # grouped: x [T, G, K] (a strided view, as wo_a's caller passes), W [G*N, K]; group i's rows read x[:, i]
    check_grouped(g, fp8_gemv_mma.launch_mma, [(3, (2, 1, 2)), (1, (4, 2, 1))])

    # fp8_linear's decode GEMV entry takes this form with DS4F_FP8_GEMV_MMA=1 (T <= MAX_T), not when off
    from ds4f.kernels.fp8_gemm import Opts, fp8_linear

    calls = spy(fp8_gemv_mma, "launch_mma")
    fp8_gemv_mma.ENABLED = True
    q, s = weights(256, 512, "ue8m0")
    x = (torch.randn(6, 512, generator=g) * 3).bfloat16()
    got = fp8_linear(x, q, s, out_dtype=torch.float32, opts=Opts(gemv=True))
    assert calls == [1] and _rel(got, fp8_linear_ref(x, q, s, torch.float32)) < TOL
    fp8_gemv_mma.ENABLED = False
    fp8_linear(x, q, s, out_dtype=torch.float32, opts=Opts(gemv=True))
    assert calls == [1]
    print("ok")


def test_mma_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_fp8_gemv_mma", "check_mma").strip().endswith("ok")


def test_mma_config_rules() -> None:
    from ds4f.kernels import fp8_gemv_mma as m

    assert m.valid((4, 2, 1), 4096, 4096, 1) and not m.valid((4, 2, 3), 4096, 4096, 1)  # 32 blocks / 3
    assert not m.valid((4, 2, 1), 4096, 4000, 1) and not m.valid((4, 4, 1), 4096, 4096, 1)
    assert not m.valid((4, 2, 1), 4 * 64, 4096, 4) and m.valid((4, 1, 1), 4 * 64, 4096, 4)  # 64-row groups
    for nt, k, groups in [(1536, 4096, 1), (16384, 1024, 1), (4096, 4096, 4), (4096, 1024, 1), (2048, 4096, 1)]:
        c = m.generic_config(nt, k, groups, 132)
        assert m.valid(c, nt, k, groups), (nt, k, groups, c)
        assert nt // (16 * c[0] * c[1]) * c[2] <= 2 * 132 or c[2] == 1, c
    assert not m.ENABLED and m.MAX_T == 8  # opt-in until a GPU times it
    x = torch.zeros(1, 1, 4096).bfloat16()
    assert not m.takes(x, 2048, 4096, 1)
    with pytest.raises(ValueError, match="invalid"):
        m.launch_mma(torch.zeros(9, 1, 256).bfloat16(), torch.zeros(128, 256), torch.zeros(1, 2), False,
                     torch.zeros(9, 1, 128), 1, (4, 2, 1))


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_mma_builds_offline(arch: int) -> None:
    """The loop: the weights' 16-byte loads straight into the MMA operands (no shared memory but the split's
    reduction, no barrier before it), four m16n8k16 per 64 columns per tile, the integer e4m3 widening."""
    pytest.importorskip("triton")
    from ds4f.kernels import fp8_gemv_mma as m
    from tests.test_kernels_build import build

    types = dict(x_ptr="*i32", w_ptr="*i32", ws_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32")
    div = ("x_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "K", "GN", "s_xt", "s_xg", "s_wsn", "s_ot",
           "k_per", "NT")
    for nw, tiles, split in ((4, 2, False), (4, 1, True), (2, 2, True)):
        k = build(m._gemv_mma, types, dict(NW=nw, TILES=tiles, SPLIT_K=split, SCALE_E8M0=True, F32=False), arch, nw,
                  1, div16=div)
        ptx = k["ptx"]
        assert k["shared"] <= 1024 * (1 + nw * tiles), k["shared"]  # the split's row sums only
        assert ptx.count("bar.sync") <= int(split) * 2, ptx.count("bar.sync")
        assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 8 * tiles
        assert ptx.count("ld.global.v4.b32") >= 4 * tiles + 4  # two rows x two steps per tile, x's four words
        assert "0x87f087f0" in ptx.lower()
