"""⑥ kernels, kv_store.norm_rope_store_kv (a decode step's K=V row normed, rotated and quantized into the fp8 pool's
scratch and window rows in one launch) under TRITON_INTERPRET=1 against two oracles, bit for bit: the three
launches it replaces (norm_rope, store_kv_rows twice) and torch's quantize_kv_rows of norm_rope's row. V4's
row (448 e4m3 + 64 bf16 rope channels), rows of very different magnitude, a strided x, untouched rows left as they
were; without the second row list only the first is written; plus its build for sm_80 / sm_90."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted


def check_kv_store() -> None:
    from ds4f.kernels.fp8 import FP8, kv_exp_bytes, quantize_kv_rows, store_kv_rows
    from ds4f.kernels.kv_store import fits, norm_rope_store_kv
    from ds4f.kernels.rope import norm_rope, norm_rope_ref

    g = torch.Generator().manual_seed(0)
    n_rows = 40

    def pool(nope_d: int, rd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 256, (n_rows, nope_d), generator=g, dtype=torch.uint8).view(FP8),
                torch.randint(0, 256, (n_rows, kv_exp_bytes(nope_d)), generator=g, dtype=torch.uint8),
                torch.randn(n_rows, rd, generator=g).bfloat16())

    for t, hd, rd in ((1, 512, 64), (3, 512, 64), (11, 512, 64), (4, 64, 16)):  # V4's row; the tiny model's
        nope_d = hd - rd
        raw = (torch.randn(t, hd + 32, generator=g) * torch.logspace(-2, 3, t)[:, None]).bfloat16()[:, 16:16 + hd]
        w = 1 + torch.randn(hd, generator=g) / 3
        ang = torch.rand(t, rd // 2, generator=g) * 6
        cos, sin = ang.cos(), ang.sin()
        perm = torch.randperm(n_rows, generator=g)
        rows, rows2 = perm[:t].clone(), perm[t:2 * t].clone()
        assert fits(raw)
        for second in (rows2, None):
            got = pool(nope_d, rd)
            want = tuple(p.clone() for p in got)
            three = tuple(p.clone() for p in got)
            norm_rope_store_kv(raw, w, cos, sin, 1e-6, *got, rows, second)
            kv3 = norm_rope(raw, w, cos, sin, 1e-6)  # the row (the interpreter rounds fp32 -> bf16 by truncation,
            # so this is norm_rope's kernel row, within one bf16 step of norm_rope_ref's)
            assert (kv3.float() - norm_rope_ref(raw, w, cos, sin, 1e-6).float()).abs().max() <= kv3.abs().max() / 64
            q, e, r = quantize_kv_rows(kv3, rd)  # torch: its quantization into each list
            for rr in (rows, second):
                if rr is not None:
                    want[0].view(torch.uint8)[rr] = q.view(torch.uint8)
                    want[1][rr], want[2][rr] = e, r
            for rr in (rows, second):  # the launches it replaces
                if rr is not None:
                    store_kv_rows(*three, rr, kv3, fused=True)
            for a, b, c in zip(got, want, three):
                assert torch.equal(a.view(torch.uint8), c.view(torch.uint8)), (t, second is None)
                # pad exponent bytes: the kernels leave them, the torch path writes 127
                if a.dtype == torch.uint8:
                    a, b = a[:, : -(-nope_d // 64)], b[:, : -(-nope_d // 64)]
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (t, second is None)
    print("ok")


def test_kv_store_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_kv_store", "check_kv_store").strip().endswith("ok")


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_kv_store_builds(arch: int) -> None:
    pytest.importorskip("triton")
    from test_kernels_build import build

    from ds4f.kernels import kv_store as ks

    for two in (False, True):
        k = build(ks._norm_rope_store_kv, dict(x_ptr="*bf16", w_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32",
                                               rows_ptr="*i64", rows2_ptr="*i64", nope_ptr="*u8", exp_ptr="*u8",
                                               rope_ptr="*bf16", eps="fp32"),
                  dict(HD=512, HALF=32, BLOCK_R=8, NOPE=448, TWO=two), arch)
        assert k["shared"] <= 160 * 1024
    # the kernels whose per-row code it shares, after that code moved into helpers
    from ds4f.kernels import fp8, rope

    for norm in (False, True):
        build(rope._rope_kernel, dict(x_ptr="*bf16", o_ptr="*bf16", w_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32",
                                      eps="fp32", sign="fp32"),
              dict(HD=512, HALF=32, BLOCK_P=256 if norm else 32, BLOCK_R=8, NORM=norm, HAS_W=norm), arch)
    build(fp8._store_kv_rows, dict(x_ptr="*bf16", rows_ptr="*i64", nope_ptr="*u8", exp_ptr="*u8", rope_ptr="*bf16"),
          dict(D=512, NOPE=448, BLOCK_D=512, BLOCK_R=16), arch)
