"""⑥ the keys-major decode indexer (indexer._indexer_fwd KEYS_MAJOR, DS4F_INDEXER_DECODE_KM) under the Triton
interpreter against indexer_scores_ref and against the heads-major form it replaces (a second code path): bf16 keys,
e4m3 keys and queries, strided and adjacent blocks, valid lengths 0 / short / past a program's blocks / == L,
zero_rank's exact-zero ties, and the first-digit histogram (DS4F_INDEXER_HIST) equal to the one counted from its
scores; the kernel compiles for sm_80 / sm_90 / sm_121 without a GPU."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted
from test_topk_small import _indexer_cases, sort_keys

from ds4f.kernels.ref import indexer_scores_ref


def check_indexer_dk() -> None:
    from ds4f.kernels import indexer

    slots, seq, vl, cases = _indexer_cases(29, [1100, 130, 0, 700, 513, 1])
    t, n = len(vl), slots.shape[1]
    ranks = -(torch.arange(n, dtype=torch.float32) + 1) * 1e-30
    for kw in cases:
        kw["q"] = kw["q"].clone()
        kw["q"][5] = 0  # token 5 (one visible key): an exact zero, the tie-break value
        ks = kw.get("k_scale")
        ref = indexer_scores_ref(kw["q"], kw["w"], kw["k_pool"], slots, seq, vl, kw["q"].shape[2] ** -0.5,
                                 None if ks is None else ks[:, None])
        fin = torch.isfinite(ref)
        for block_l, n_inner, strided in ((32, 3, True), (32, 4, False), (64, 1, True)):
            kwi = dict(slots=slots, seq_of=seq, valid_len=vl, zero_rank=True, strided=strided, **kw)
            buf = torch.zeros(4 * t * 256 + 2 * t, dtype=torch.int32)
            out = indexer.indexer_scores(hist=buf, decode_km=(block_l, n_inner, 4, 2), **kwi)
            assert torch.equal(fin, torch.isfinite(out)), (kw["q"].dtype, block_l, strided)
            assert out[5, 0] == ranks[0] and torch.isinf(out[5, 1:]).all()
            nz = fin & (ref != 0)
            torch.testing.assert_close(out[nz], ref[nz], atol=1e-3, rtol=1e-3)
            hm = indexer.indexer_scores(block_l=block_l, n_inner=n_inner, **kwi)  # the heads-major kernel
            torch.testing.assert_close(out, hm, atol=1e-5, rtol=1e-5)
            key = sort_keys(out)
            want = torch.stack([torch.bincount(key[r][torch.isfinite(out[r])] >> 24, minlength=256)
                                for r in range(t)])
            assert torch.equal(buf[: t * 256].view(t, 256).long(), want)
            assert not buf[t * 256:].any()
            print("keys-major decode", kw["q"].dtype, block_l, n_inner, strided, "matches")


def check_hist_chain_via_index_q() -> None:
    """FastModel's decode chain with DS4F_INDEXER_HIST: a dirty histogram buffer zeroed by index_q's launch, counted
    by the indexer, consumed by the radix top-k (small lanes cut to 16 so the rows take it) -> the same picks as
    index_q + indexer + top-k without the buffer."""
    from ds4f.kernels import indexer
    from ds4f.kernels.fp8 import quantize_rows
    from ds4f.kernels.index_q import index_q

    g = torch.Generator().manual_seed(31)
    t, hi, di, n, k = 3, 16, 32, 300, 24
    q = torch.randn(t, hi, di, generator=g).bfloat16()
    w = torch.randn(t, hi, generator=g).bfloat16()
    ang = torch.rand(t, 8, generator=g) * 6.3
    k8, ks = quantize_rows(torch.randn(n, di, generator=g).bfloat16(), di)
    slots = torch.randperm(n, generator=g).int()[None]
    seq = torch.zeros(t, dtype=torch.int32)
    vl = torch.tensor([300, 10, 150], dtype=torch.int32)
    indexer.SMALL_KNOBS, indexer.INDEXER_HIST = (16, 8), t
    buf = indexer.decode_hist_buffer(q, n, k, zeroed=False)
    assert buf is not None
    buf.fill_(7)
    picks = []
    for hist in (buf, None):
        iq, iw = index_q(q.clone(), w, ang.cos(), ang.sin(), hi**-0.5, True, zero=hist)
        if hist is not None:
            assert not hist.any()
        sc = indexer.indexer_scores(iq, iw, k8, slots, seq, vl, k_scale=ks.view(-1), zero_rank=True, hist=hist)
        picks.append(indexer.topk_indices(sc, k, valid_len=vl, hist_buf=hist))
    for a, b in zip(*picks, strict=True):
        assert set(a.tolist()) == set(b.tolist())
    print("hist chain via index_q equal")


def test_hist_chain_via_index_q_interpreted() -> None:
    pytest.importorskip("triton")
    assert "hist chain via index_q equal" in run_interpreted("test_indexer_dk", "check_hist_chain_via_index_q")


def test_indexer_dk_interpreted() -> None:
    pytest.importorskip("triton")
    out = run_interpreted("test_indexer_dk", "check_indexer_dk")
    assert out.count("matches") == 6, out


@pytest.mark.parametrize("arch", [80, 90, 121])
def test_indexer_dk_builds(arch: int) -> None:
    pytest.importorskip("triton")
    from test_kernels_build import build

    from ds4f.kernels import indexer

    fp8 = arch >= 89
    for qfp8 in (False, True) if fp8 else (False,):  # e4m3 queries: the fp8 MMA (sm_89+)
        t = dict(q_ptr="*fp8e4nv" if qfp8 else "*bf16", w_ptr="*fp32", k_ptr="*fp8e4nv" if fp8 else "*bf16",
                 ks_ptr="*fp32", slots_ptr="*i32", seq_ptr="*i32", vlen_ptr="*i32", out_ptr="*fp32",
                 hist_ptr="*i32", scale="fp32")
        for hist in (False, True):
            c = dict(DI=128, BLOCK_HI=64, BLOCK_L=128, N_INNER=4, KSCALE=fp8, QFP8=qfp8, ZERO_RANK=True,
                     STRIDED=True, HIST=hist, KEYS_MAJOR=True)
            build(indexer._indexer_fwd, t, c, arch, 4, 3)


def test_bad_km_knob_names_the_variable() -> None:
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import ds4f.kernels.indexer"], capture_output=True, text=True,
                       env=dict(os.environ, DS4F_INDEXER_DECODE_KM="128,4"), timeout=120)
    assert r.returncode != 0 and "ValueError: DS4F_INDEXER_DECODE_KM=" in r.stderr, r.stderr[-500:]
