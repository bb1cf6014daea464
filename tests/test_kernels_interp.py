"""Kernels under the Triton interpreter (CPU, tiny shapes, a subprocess each) against their torch references:
sparse_attn with a per-token live bound (the same output as without it: splits past the bound skip their loop, their
partials and the combine), the radix top-k with per-row valid lengths, and indexer_scores past each row's valid
length (programs whose columns are all hidden only write -inf)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from interp import run_interpreted

from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.ref import indexer_scores_ref, sparse_attn_ref, topk_indices_ref

pytest.importorskip("triton")


def _idx_with_live(t: int, k: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [t, k] with every entry at or past live[t] = -1 (and some -1 inside, as window rows can be)."""
    idx = torch.randint(-1, n, (t, k), generator=g, dtype=torch.int32)
    live = torch.tensor([k, 37, 0, 1, 130][:t], dtype=torch.int32)
    idx[torch.arange(k)[None, :] >= live[:, None].long()] = -1
    return idx, live


def _fp8_case(seed: int, t: int, k: int, n: int, h: int = 16, d: int = 64) -> tuple[Any, ...]:
    """(g, q [t, h, d] bf16, sink [h], indices [t, k] with live bounds, live, fp8_ds_mla rows nope / exp / rope) for
    the split-row sparse attention checks; g continues the same draws."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g).bfloat16()
    sink = torch.randn(h, generator=g)
    idx, live = _idx_with_live(t, k, n, g)
    return (g, q, sink, idx, live, *quantize_kv_rows(torch.randn(n, d, generator=g), 16))


def check_sparse_attn_live() -> None:
    sa = importlib.import_module("ds4f.kernels.sparse_attn")  # the module (ds4f.kernels.sparse_attn: the function)

    sa.POLICY = sa.OLD_POLICY  # static key splits on both paths: bit-equal outputs (the new policy: below)
    sparse_attn, use_triton = sa.sparse_attn, sa.use_triton

    g = torch.Generator().manual_seed(0)
    t, h, d, k, n = 5, 16, 64, 200, 300
    q = torch.randn(t, h, d, generator=g).bfloat16()
    pool = torch.randn(n, d, generator=g).bfloat16()
    sink = torch.randn(h, generator=g)
    idx, live = _idx_with_live(t, k, n, g)
    assert use_triton(q)
    want = sparse_attn_ref(q, pool, idx, sink, d**-0.5).float()
    for splits in (1, 3, 7):
        a = sparse_attn(q, pool, idx, sink, d**-0.5, num_splits=splits, block_k=16)
        b = sparse_attn(q, pool, idx, sink, d**-0.5, num_splits=splits, block_k=16, live=live)
        assert torch.equal(a, b), splits
        torch.testing.assert_close(b.float(), want, atol=1.5e-2, rtol=1e-2)
        print("attn bf16 pool splits", splits, "equal")
    nope, exp, rp = quantize_kv_rows(torch.randn(n, d, generator=g), 16)
    want = sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rp), idx, sink, d**-0.5).float()
    for splits in (1, 4):
        a = sparse_attn(q, nope, idx, sink, d**-0.5, exp, kv_rope=rp, num_splits=splits)
        b = sparse_attn(q, nope, idx, sink, d**-0.5, exp, kv_rope=rp, num_splits=splits, live=live)
        assert torch.equal(a, b), splits
        torch.testing.assert_close(b.float(), want, atol=1.5e-2, rtol=1e-2)
        print("attn fp8 rows splits", splits, "equal")


def check_topk_and_indexer_valid_len() -> None:
    from ds4f.kernels import indexer

    g = torch.Generator().manual_seed(1)
    t, length, k = 3, 3000, 16
    vl = torch.tensor([length, 700, 5], dtype=torch.int32)
    s = torch.randn(t, length, generator=g)
    s[torch.arange(length)[None, :] >= vl[:, None].long()] = float("-inf")
    want = topk_indices_ref(s, k)
    for v, progs in ((None, None), (vl, None), (vl, 3)):  # programs=3: chunks of several blocks per program
        got = indexer.topk_indices(s, k, block=256, backend="radix", valid_len=v, programs=progs)
        for r in range(t):
            assert set(got[r].tolist()) == set(want[r].tolist()), (v is None, progs, r)
    print("radix top-k equal sets")
    hi, di = 16, 16
    q = torch.randn(t, hi, di, generator=g).bfloat16()
    w = torch.randn(t, hi, generator=g)
    keys = torch.randn(length, di, generator=g).bfloat16()
    slots = torch.randperm(length, generator=g).int()[None]
    seq = torch.zeros(t, dtype=torch.int32)
    out = indexer.indexer_scores(q, w, keys, slots, seq, vl, block_l=64, n_inner=2)
    ref = indexer_scores_ref(q, w, keys, slots, seq, vl, di**-0.5)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out)) and (out[~fin] == float("-inf")).all()
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-3, rtol=1e-3)
    print("indexer scores match")


def test_sparse_attn_live_interpreted() -> None:
    out = run_interpreted("test_kernels_interp", "check_sparse_attn_live")
    assert out.count("equal") == 5, out


def check_sparse_attn_decode_policy() -> None:
    """The decode policies (live-sized splits, in-kernel combine, all -1 block skip, one block per split, no
    split) against the reference, and against each other: with static splits the live bound changes no bit. The
    arrival counts are back at zero after the fused calls."""
    from dataclasses import replace

    from ds4f.kernels import arrival
    sa = importlib.import_module("ds4f.kernels.sparse_attn")  # the module (ds4f.kernels.sparse_attn: the function)
    from ds4f.kernels.rope import rope_ref

    t, d = 5, 64
    g, q, sink, idx, live, nope, exp, rp = _fp8_case(2, t, 200, 300)
    idx[1, 16:32] = -1  # a whole -1 block below the live bound (SKIP)
    cos, sin = torch.randn(t, 8, generator=g), torch.randn(t, 8, generator=g)
    want = rope_ref(sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rp), idx, sink, d**-0.5), cos, sin, True)
    new = sa.DecodePolicy()
    pols = {"old": sa.OLD_POLICY, "new": new, "static": replace(new, dyn=False), "combine": replace(new, fuse_max=0),
            "noskip": replace(new, skip=False), "nosplit": replace(new, nosplit_k=1 << 20),
            "fuse16": replace(new, fuse_max=16)}  # 12 splits (num_splits None): 16 unrolled, 4 masked
    for name, pol in pols.items():
        sa.POLICY = pol
        for splits in (None, 3, 7):
            a, b = (sa.sparse_attn(q, nope, idx, sink, d**-0.5, exp, kv_rope=rp, num_splits=splits, block_k=16,
                                   live=lv, inv_rope=(cos, sin)) for lv in (None, live))
            for x in (a, b):
                torch.testing.assert_close(x.float(), want.float(), atol=2e-2, rtol=1e-2)
            assert pol.dyn or torch.equal(a, b), (name, splits)
            assert all(int(c.abs().sum()) == 0 for c in arrival.buffers("sparse_attn")), (name, splits)
        print("policy", name, "matches")


def test_sparse_attn_decode_policy_interpreted() -> None:
    out = run_interpreted("test_kernels_interp", "check_sparse_attn_decode_policy")
    assert out.count("matches") == 7, out


def check_attn_combine_shapes() -> None:
    """_attn_combine's auto shape (all splits in one round, fewer heads per tile) and forced ones (COMBINE_TILE
    shrunk to 1- and 2-head tiles; the former 16-head rounds of 1 and 4 splits) against the reference: the merge
    order is all they change."""
    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    from ds4f.kernels.rope import rope_ref

    t, d = 2, 64
    g, q, sink, idx, live, nope, exp, rp = _fp8_case(4, t, 208, 300)
    cos, sin = torch.randn(t, 8, generator=g), torch.randn(t, 8, generator=g)
    want = rope_ref(sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rp), idx, sink, d**-0.5), cos, sin, True)
    shapes = set()
    for unroll, tile in ((0, 8192), (0, 1024), (0, 512), (1, 8192), (4, 8192)):
        sa.COMBINE_UNROLL, sa.COMBINE_TILE = unroll, tile
        for splits in (13, 6):
            shapes.add(sa.combine_shape(splits, d))
            out = sa.sparse_attn(q, nope, idx, sink, d**-0.5, exp, kv_rope=rp, num_splits=splits, block_k=16,
                                 live=live, inv_rope=(cos, sin))
            torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=1e-2)
    assert {(16, 8, 64), (16, 1, 64), (8, 2, 64), (1, 16, 64), (4, 16, 64)} <= shapes, shapes
    print("combine shapes match")


def test_attn_combine_shapes_interpreted() -> None:
    out = run_interpreted("test_kernels_interp", "check_attn_combine_shapes")
    assert "combine shapes match" in out, out


def check_attn_shrinks_to_fit() -> None:
    """A tile the device cannot hold (Triton's OutOfResources before the launch runs, as on GB10's 99 KB of shared
    memory with H200-swept knobs) is retried smaller: one stage, then halved key blocks; the output is the
    reference's and the fitted tiles are kept for the shape (no second failure)."""
    from triton.runtime.errors import OutOfResources

    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    d = 64
    _, q, sink, idx, live, nope, exp, rp = _fp8_case(5, 3, 96, 200)
    want = sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rp), idx, sink, d**-0.5)
    real, tried = sa._attn_fwd, []

    class Tight:  # stands in for the kernel: tiles of more than 600 head x key x stage units do not fit
        def __getitem__(self, grid: tuple) -> object:
            def run(*a: object, **kw: int) -> object:
                tried.append((kw["BLOCK_H"], kw["BLOCK_K"], kw["num_stages"]))
                if kw["BLOCK_H"] * kw["BLOCK_K"] * kw["num_stages"] > 600:
                    raise OutOfResources(kw["BLOCK_K"] * 1000, 600 * 1000, "shared memory")
                return real[grid](*a, **kw)
            return run

    sa._attn_fwd = Tight()
    try:
        for _ in range(2):
            out = sa.sparse_attn(q, nope, idx, sink, d**-0.5, exp, kv_rope=rp, live=live, block_h=16, block_k=64,
                                 num_warps=4, num_stages=2, num_splits=2)
            torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=1e-2)
    finally:
        sa._attn_fwd = real
    assert tried == [(16, 64, 2), (16, 64, 1), (16, 32, 1), (16, 32, 1)], tried
    assert sa.shrink((16, 16, 4, 1)) is None and sa.shrink((64, 16, 8, 1)) == (32, 16, 8, 1)
    print("attn tiles shrink to fit")


def test_attn_shrinks_to_fit_interpreted() -> None:
    out = run_interpreted("test_kernels_interp", "check_attn_shrinks_to_fit")
    assert "attn tiles shrink to fit" in out, out


def test_topk_and_indexer_valid_len_interpreted() -> None:
    out = run_interpreted("test_kernels_interp", "check_topk_and_indexer_valid_len")
    assert "radix top-k equal sets" in out and "indexer scores match" in out, out


def check_indexer_fp8_q() -> None:
    from ds4f.kernels import indexer
    from ds4f.kernels.fp8 import quantize_rows

    g = torch.Generator().manual_seed(4)
    t, hi, di, n = 4, 16, 32, 500
    q = torch.randn(t, hi, di, generator=g).bfloat16()
    w = torch.randn(t, hi, generator=g)
    k8, ks = quantize_rows(torch.randn(n, di, generator=g).bfloat16(), di)
    slots = torch.randperm(n, generator=g).int()[None]
    seq = torch.zeros(t, dtype=torch.int32)
    vl = torch.tensor([n, 300, 7, 64], dtype=torch.int32)
    q8, qs = indexer.quant_heads_fp8(q)
    out = indexer.indexer_scores(q8, w * qs, k8, slots, seq, vl, k_scale=ks.view(-1), block_l=64, n_inner=2)
    ref = indexer_scores_ref(q8, w * qs, k8, slots, seq, vl, di**-0.5, ks)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    torch.testing.assert_close(out[fin], ref[fin], atol=1e-3, rtol=1e-3)
    print("indexer fp8 q matches")


def test_indexer_fp8_q_interpreted() -> None:
    out = run_interpreted("test_kernels_interp", "check_indexer_fp8_q")
    assert "indexer fp8 q matches" in out, out
