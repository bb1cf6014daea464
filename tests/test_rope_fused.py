"""Fused RoPE launches against their unfused forms: norm_rope2 (q's per-head norm + RoPE and kv's weighted norm +
RoPE in one launch) = two norm_rope calls, and sparse_attn(..., inv_rope=(cos, sin)) = rope_(sparse_attn(...),
inverse=True), through the torch references (CPU), the Triton interpreter (tiny shapes, both attention paths: one
key split, written by _attn_fwd, and several, written by _attn_combine; bf16 pools and fp8_ds_mla rows) and the
sm_80 / sm_90 compilers (shared memory of the new epilogue at the real decode tile sizes)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.ref import sparse_attn_ref
from ds4f.kernels.rope import norm_rope, norm_rope2, norm_rope_ref, rope_ref
from ds4f.kernels.sparse_attn import sparse_attn
from ds4f.model.layers import Rope


def _cs(t: int, rd: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 100_000, (t,), generator=torch.Generator().manual_seed(seed))
    return Rope(rd, 1.0 / (10000.0 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))).cos_sin(pos)


def _norm_case(t: int, h: int, hd: int, rd: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(t, h, hd, generator=g) * 3).bfloat16()
    y = torch.randn(t, hd + 40, generator=g).bfloat16()
    kv = y[:, 8: 8 + hd]  # a column slice of a wider GEMM output: row stride != hd
    w = torch.rand(hd, generator=g) + 0.5
    return q, kv, w, _cs(t, rd, seed)


def _attn_case(t: int, h: int, d: int, k: int, n: int, rd: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g).bfloat16()
    pool = torch.randn(n, d, generator=g).bfloat16()
    sink = torch.randn(h, generator=g)
    idx = torch.randint(-1, n, (t, k), generator=g, dtype=torch.int32)
    return q, pool, idx, sink, _cs(t, rd, seed)


def _e4m3_pool(x: torch.Tensor, ng: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, d] -> (e4m3 [n, d], power-of-two scales [n, ng] fp32 per d / ng columns)."""
    n, d = x.shape
    sc = torch.exp2(torch.ceil(torch.log2(x.view(n, ng, -1).abs().amax(-1).clamp(min=1e-30) / 448.0)))
    return (x.view(n, ng, -1) / sc[..., None]).to(torch.float8_e4m3fn).view(n, d), sc


def test_norm_rope2_reference_path() -> None:
    q, kv, w, cs = _norm_case(3, 4, 32, 8, 0)
    a, b = norm_rope2(q, kv, w, *cs, 1e-6)
    assert torch.equal(a, norm_rope_ref(q, None, *cs, 1e-6)) and torch.equal(b, norm_rope_ref(kv, w, *cs, 1e-6))
    a, b = norm_rope2(q, kv, None, *cs, 1e-6)
    assert torch.equal(b, norm_rope(kv, None, *cs, 1e-6))


@pytest.mark.parametrize("fp8", [False, True, "e4m3"])
def test_sparse_attn_inv_rope_reference_path(fp8: bool | str) -> None:
    q, pool, idx, sink, cs = _attn_case(3, 4, 64, 20, 30, 16, 1)
    if fp8 == "e4m3":
        e4, sc = _e4m3_pool(pool.float(), 4)
        got = sparse_attn(q, e4, idx, sink, 0.125, sc, inv_rope=cs)
        o = sparse_attn_ref(q, e4, idx, sink, 0.125, sc)
    elif fp8:
        nope, exp, rp = quantize_kv_rows(pool.float(), 16)
        got = sparse_attn(q, nope, idx, sink, 0.125, exp, kv_rope=rp, inv_rope=cs)
        o = sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rp), idx, sink, 0.125)
    else:
        got = sparse_attn(q, pool, idx, sink, 0.125, inv_rope=cs)
        o = sparse_attn_ref(q, pool, idx, sink, 0.125)
    want = rope_ref(o, *cs, True)
    assert torch.equal(got, want)
    assert torch.equal(got[..., :-16], o[..., :-16]) and not torch.equal(got, o)


def check_norm_rope2() -> None:
    from ds4f.kernels.sparse_attn import use_triton

    for t, h, hd, rd in ((1, 4, 64, 16), (5, 3, 48, 16), (9, 16, 32, 8)):
        q, kv, w, cs = _norm_case(t, h, hd, rd, t)
        assert use_triton(q)
        for wk in (w, None):
            a, b = norm_rope2(q, kv, wk, *cs, 1e-6)
            assert torch.equal(a, norm_rope(q, None, *cs, 1e-6)), (t, h, hd)
            assert torch.equal(b, norm_rope(kv, wk, *cs, 1e-6)), (t, h, hd)
            torch.testing.assert_close(a.float(), norm_rope_ref(q, None, *cs, 1e-6).float(), atol=2e-2, rtol=1e-2)
            torch.testing.assert_close(b.float(), norm_rope_ref(kv, wk, *cs, 1e-6).float(), atol=2e-2, rtol=1e-2)
        print("norm_rope2", t, h, hd, "equal")


def check_sparse_attn_inv_rope() -> None:
    from ds4f.kernels.rope import rope_

    t, h, d, k, n, rd = 3, 16, 64, 100, 150, 16
    q, pool, idx, sink, cs = _attn_case(t, h, d, k, n, rd, 2)
    live = torch.tensor([k, 37, 1], dtype=torch.int32)
    idx[torch.arange(k)[None, :] >= live[:, None].long()] = -1
    nope, exp, rp = quantize_kv_rows(pool.float(), rd)
    e4, sc = _e4m3_pool(pool.float(), 4)
    for fp8 in (False, True, "e4m3"):
        args = ((q, e4, idx, sink, d**-0.5, sc) if fp8 == "e4m3" else (q, nope, idx, sink, d**-0.5, exp) if fp8
                else (q, pool, idx, sink, d**-0.5))
        kw = dict(kv_rope=rp) if fp8 is True else {}
        for splits in (1, 3):  # 1: _attn_fwd writes o; 3: _attn_combine does
            for lv in (None, live):
                o = sparse_attn(*args, num_splits=splits, block_k=16, live=lv, **kw)
                want = rope_(o.clone(), *cs, inverse=True)
                got = sparse_attn(*args, num_splits=splits, block_k=16, live=lv, inv_rope=cs, **kw)
                # the interpreter's numpy math does not contract to FMA: the same ops, bit for bit
                assert torch.equal(got, want), (fp8, splits, lv is None)
                # vs the torch reference: the interpreter's fp32 -> bf16 conversion may round the other way (1 ulp)
                torch.testing.assert_close(got, rope_ref(o, *cs, True), atol=1e-6, rtol=2**-7)
            print("attn inv rope", fp8, "splits", splits, "equal")
    # D not a power of two (BLOCK_D > D: padded columns), bf16 pool, both paths
    q, pool, idx, sink, cs = _attn_case(2, 16, 48, 64, 80, 16, 3)
    for splits in (1, 2):
        o = sparse_attn(q, pool, idx, sink, 0.1, num_splits=splits, block_k=16)
        got = sparse_attn(q, pool, idx, sink, 0.1, num_splits=splits, block_k=16, inv_rope=cs)
        assert torch.equal(got, rope_(o.clone(), *cs, inverse=True)), splits
    print("attn inv rope D=48 equal")


def check_sparse_attn_q_norm() -> None:
    """q_norm: the attention kernel's prologue RMS-norms and rotates the raw q, bit for bit what norm_rope(q) then
    the kernel give (pool formats, one / several key splits, live counts, masked heads)."""
    import importlib

    from ds4f.kernels.rope import norm_rope

    sa = importlib.import_module("ds4f.kernels.sparse_attn")  # the module (the package re-exports the function)
    t, h, d, k, n, rd = 3, 12, 64, 100, 150, 16  # 12 heads in 16-head blocks: masked rows in the prologue
    q, pool, idx, sink, cs = _attn_case(t, h, d, k, n, rd, 5)
    q = q * 3.0  # a raw projection (not unit RMS)
    live = torch.tensor([k, 37, 1], dtype=torch.int32)
    idx[torch.arange(k)[None, :] >= live[:, None].long()] = -1
    nope, exp, rp = quantize_kv_rows(pool.float(), rd)
    qn = norm_rope(q, None, *cs, 1e-6)
    for fp8 in (False, True):
        args = (nope, idx, sink, d**-0.5, exp) if fp8 else (pool, idx, sink, d**-0.5)
        kw = dict(kv_rope=rp) if fp8 else {}
        for splits in (1, 3):
            for lv in (None, live):
                want = sparse_attn(qn, *args, num_splits=splits, block_k=16, live=lv, inv_rope=cs, **kw)
                got = sparse_attn(q, *args, num_splits=splits, block_k=16, live=lv, inv_rope=cs, q_norm=1e-6, **kw)
                assert torch.equal(got, want), (fp8, splits, lv is None)
                if fp8:  # DS4F_ATTN_ROPE_SPLIT: q's rope columns taken from the normed, rotated prologue tile
                    sa.ROPE_SPLIT = True
                    try:
                        want_rs = sparse_attn(qn, *args, num_splits=splits, block_k=16, live=lv, inv_rope=cs, **kw)
                        got_rs = sparse_attn(q, *args, num_splits=splits, block_k=16, live=lv, inv_rope=cs,
                                             q_norm=1e-6, **kw)
                    finally:
                        sa.ROPE_SPLIT = False
                    assert torch.equal(got_rs, want_rs), (splits, lv is None)
                    torch.testing.assert_close(got_rs.float(), want.float(), atol=4e-3, rtol=4e-3)
    print("attn q norm equal")


@pytest.mark.parametrize("check", ["check_norm_rope2", "check_sparse_attn_inv_rope", "check_sparse_attn_q_norm"])
def test_interpreted(check: str) -> None:
    pytest.importorskip("triton")
    from interp import run_interpreted

    print(run_interpreted("test_rope_fused", check))


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_fused_kernels_build(arch: int) -> None:
    pytest.importorskip("triton")
    import importlib

    from test_kernels_build import build

    from ds4f.kernels import rope

    sa = importlib.import_module("ds4f.kernels.sparse_attn")  # the package re-exports the function under its name

    types = dict(q_ptr="*bf16", kv_ptr="*u8", kvs_ptr="*u8", rope_ptr="*bf16", idx_ptr="*i32", sink_ptr="*fp32",
                 o_ptr="*bf16", po_ptr="*fp32", pm_ptr="*fp32", live_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
                 cnt_ptr="*i32", qk_scale="fp32")
    for split in (False, True):
        # a decode tile, a 64-head prefill chunk's (GB10: a TP=2 rank's 32 heads; 64 shrink at launch, see
        # test_kernels_build.test_attn_tiles_shrink_to_fit_gb10)
        for bh, bk, nw, ns in ((16, 32, 4, 2), (64 if arch < 120 else 32, 32, 4, 1)):
            sh = [build(sa._attn_fwd, types, dict(D=512, BLOCK_D=512, BLOCK_H=bh, BLOCK_K=bk, NG=0, SPLIT=split,
                                                  SCALE_BCAST=True, NOPE=448, NATIVE_FP8=arch >= 89, LIVE=True,
                                                  HALF=half, DYN=split, FUSE=0, SKIP=False), arch, nw, ns)["shared"]
                  for half in (0, 32)]
            assert sh[1] == sh[0], (split, bh, sh)  # the epilogue's shuffle reuses the loop's shared memory
    build(sa._attn_combine, dict(po_ptr="*fp32", pm_ptr="*fp32", sink_ptr="*fp32", o_ptr="*bf16", live_ptr="*i32",
                                 cos_ptr="*fp32", sin_ptr="*fp32"),
          dict(D=512, PD=512, BLOCK_DC=64, BLOCK_H=16, LIVE=True, UNROLL=4, HALF=32, DYN=True, BLOCK_K=32), arch)
    build(rope._norm_rope2_kernel, dict(q_ptr="*bf16", qo_ptr="*bf16", kv_ptr="*bf16", kvo_ptr="*bf16",
                                        w_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", eps="fp32"),
          dict(HDQ=512, HDK=512, HALF=32, BPQ=256, BPK=256, BRQ=8, BRK=8, HAS_W=True), arch)
