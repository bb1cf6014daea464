"""bench/probe_mma_regs.py on CPU: its kernel's data movement (each lane's 16-byte words of weight rows g / g + 8 and
of x's row g, the two m16n8k32 MMAs' operands rebuilt by the PTX ISA's fragment layout, the block scales) emulated in
torch against the dequantize-then-matmul reference, and the kernel built offline for sm_89 / sm_90 / sm_121: the
MMAs from registers, 16-byte loads, no shared memory, no barrier; both forms (e4m3 x with its scales; bf16 x, the
weights widened in registers)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the probe module builds its kernel at import

from bench.probe_mma_regs import emulate, reference


def test_fragment_data_movement_gives_the_product() -> None:
    g = torch.Generator().manual_seed(0)
    for n, k, t in ((32, 256, 1), (144, 128, 5), (16, 384, 8)):
        w = (torch.randn(n, k, generator=g) * 8).clamp(-448, 448).to(torch.float8_e4m3fn)
        x = (torch.randn(t, k, generator=g) * 8).clamp(-448, 448).to(torch.float8_e4m3fn)
        ws = torch.exp2(torch.randint(-8, -2, (-(-n // 128), k // 128), generator=g).float())
        xs = torch.exp2(torch.randint(-8, -2, (t, k // 128), generator=g).float())
        want = reference(w, ws, x, xs)
        got = emulate(w, ws, x, xs)
        assert got.shape == (t, n)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), (n, k, t)
        xb = torch.randn(t, k, generator=g).bfloat16()  # the BF16 form: x as is, four m16n8k16 per 64 columns
        want = reference(w, ws, xb, None)
        assert torch.allclose(emulate(w, ws, xb, None), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("arch", [89, 90, 121])
def test_register_fed_mma_builds(arch: int) -> None:
    pytest.importorskip("triton")
    from bench.probe_mma_regs import _gemv_mma_regs
    from tests.test_kernels_build import build

    types = dict(w_ptr="*i32", ws_ptr="*fp32", x_ptr="*i32", xs_ptr="*fp32", o_ptr="*fp32")
    for nw, tiles, bf16 in ((4, 1, False), (4, 2, False), (4, 1, True), (4, 2, True)):
        k = build(_gemv_mma_regs, types, dict(NW=nw, TILES=tiles, BF16=bf16), arch, nw, 1,
                  div16=("w_ptr", "ws_ptr", "x_ptr", "xs_ptr", "o_ptr", "K"))
        ptx = k["ptx"]
        assert k["shared"] == 0 and "bar.sync" not in ptx, (k["shared"], arch)
        if bf16:  # 2 steps x 4 MMAs per tile; x's 32 bytes and rows g, g + 8 per step
            assert ptx.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 8 * tiles
            assert ptx.count("ld.global.v4.b32") >= 2 * (2 + 2 * tiles)
        else:  # 2 steps x 2 MMAs per tile; x's words, rows g and g + 8 per step
            assert ptx.count("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32") == 4 * tiles
            assert ptx.count("ld.global.v4.b32") >= 2 * (1 + 2 * tiles)
