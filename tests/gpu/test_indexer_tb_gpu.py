"""⑥ the token-blocked indexer (DS4F_INDEXER_TB; heads-major and keys-major) on CUDA at V4-Flash widths (64 heads
of 128, fp8 keys with row scales; bf16 and e4m3 queries), tokens of two sequences and a decode token in one call,
against the reference."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.kernels.fp8 import quantize_rows
from ds4f.kernels.indexer import indexer_scores, quant_heads_fp8
from ds4f.kernels.ref import indexer_scores_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

TOL = 5e-4  # the fp8 MMA's accumulation (tests/gpu/test_kernels_gpu.py INDEX_FP8_TOL)


@pytest.mark.parametrize("bt,block_l,nw,km", [(2, 64, 4, False), (2, 128, 4, False), (4, 64, 8, False),
                                               (16, 128, 4, True), (8, 64, 8, True), (32, 256, 8, True)])
@pytest.mark.parametrize("qfp8", [False, True])
def test_token_blocks_match_reference(bt: int, block_l: int, nw: int, km: bool, qfp8: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(bt * 10 + int(qfp8))
    HI, DI, L, N = 64, 128, 3000, 7000
    lens = (201, 1, 98)  # a chunk, a decode token, another chunk
    T = sum(lens)
    q = torch.randn(T, HI, DI, device="cuda", generator=g).bfloat16()
    w = torch.randn(T, HI, device="cuda", generator=g)
    k8, ks = quantize_rows(torch.randn(N, DI, device="cuda", generator=g).bfloat16(), DI)
    slots = torch.stack([torch.randperm(N, device="cuda", generator=g)[:L] for _ in lens]).int()
    seq = torch.cat([torch.full((n,), i, dtype=torch.int32, device="cuda") for i, n in enumerate(lens)])
    vl = torch.randint(0, L + 1, (T,), device="cuda", generator=g, dtype=torch.int32)
    q[5] = 0  # exact-zero scores: zero_rank's tie-break values
    vl[5] = L
    if qfp8:
        q, qs = quant_heads_fp8(q)
        w = w * qs
    out = indexer_scores(q, w, k8, slots, seq, vl, k_scale=ks.view(-1), token_block=bt, block_l=block_l,
                         num_warps=nw, num_stages=2 if km else 3, keys_major=km, zero_rank=True)
    ref = indexer_scores_ref(q, w, k8, slots, seq, vl, DI**-0.5, ks)
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(out))
    assert torch.equal(out[5], -(torch.arange(L, device="cuda", dtype=torch.float32) + 1) * 1e-30)
    fin &= ref != 0
    err = ((out[fin].double() - ref[fin].double()).norm() / ref[fin].double().norm()).item()
    assert err < TOL, err
