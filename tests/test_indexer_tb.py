"""⑥ the token-blocked indexer (ds4f/kernels/indexer_tb.py, DS4F_INDEXER_TB) under the Triton interpreter against
indexer_scores_ref: blocks that straddle sequences (one pass per sequence), tokens with nothing visible, T not a
multiple of the block, bf16 keys, e4m3 keys with row scales, and e4m3 queries; both the heads-major (token blocks
as M) and the keys-major (key tile as M, tokens walked over it) kernels; the keys-major kernel's one-sequence
fast path (blocks of seq 2 and seq 1 at bt 2 and 4, the ragged last block) and its general loop (mixed blocks)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.ref import indexer_scores_ref


def check_indexer_token_blocks() -> None:
    from ds4f.kernels import indexer
    from ds4f.kernels.fp8 import quantize_rows

    g = torch.Generator().manual_seed(5)
    t, hi, di, n, length = 7, 12, 32, 400, 150
    q = torch.randn(t, hi, di, generator=g).bfloat16()
    w = torch.randn(t, hi, generator=g)
    keys = torch.randn(n, di, generator=g).bfloat16()
    k8, ks = quantize_rows(keys, di)
    slots = torch.stack([torch.randperm(n, generator=g)[:length] for _ in range(3)]).int()
    seq = torch.tensor([2, 2, 2, 0, 1, 1, 1], dtype=torch.int32)
    vl = torch.tensor([150, 149, 3, 0, 64, 65, 200], dtype=torch.int32)
    q[4] = 0  # every score of token 4 is an exact zero: zero_rank's tie-break values, exactly
    q8, qs = indexer.quant_heads_fp8(q)
    cases = [("bf16", q, w, keys, None), ("fp8 keys", q, w, k8, ks), ("fp8 q", q8, w * qs, k8, ks)]
    for name, qq, ww, kp, sc in cases:
        ref = indexer_scores_ref(qq, ww, kp, slots, seq, vl, di**-0.5, None if sc is None else sc)
        fin = torch.isfinite(ref)
        ranks = -(torch.arange(length, dtype=torch.float32) + 1) * 1e-30
        for bt, km in ((1, False), (2, False), (4, False), (2, True), (4, True), (8, True)):
            out = indexer.indexer_scores(qq, ww, kp, slots, seq, vl, k_scale=None if sc is None else sc.view(-1),
                                         block_l=32, n_inner=2, token_block=bt, keys_major=km, zero_rank=True)
            assert torch.equal(fin, torch.isfinite(out)), (name, bt, km)
            assert torch.equal(out[4, :64], ranks[:64]) and torch.isinf(out[4, 64:]).all()  # vl[4] = 64
            nz = fin & (ref != 0)
            torch.testing.assert_close(out[nz], ref[nz], atol=1e-3, rtol=1e-3)
            print("token block", bt, "keys-major" if km else "", name, "matches")


def test_indexer_token_blocks_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    out = run_interpreted("test_indexer_tb", "check_indexer_token_blocks")
    assert out.count("matches") == 18, out


@pytest.mark.parametrize(("env", "module", "name"), [
    ({"DS4F_INDEXER_TB": "2,128"}, "ds4f.kernels.indexer", "DS4F_INDEXER_TB"),
    ({"DS4F_INDEXER_TB": "k,x"}, "ds4f.kernels.indexer", "DS4F_INDEXER_TB"),
    ({"DS4F_ATTN_COMBINE_UNROLL": "3"}, "ds4f.kernels.sparse_attn", "DS4F_ATTN_COMBINE_UNROLL"),
    ({"DS4F_ATTN_PREFILL": "64,8"}, "ds4f.kernels.sparse_attn", "DS4F_ATTN_PREFILL"),
    ({"DS4F_ATTN_DECODE": "32,64,4"}, "ds4f.kernels.sparse_attn", "DS4F_ATTN_DECODE"),
    ({"DS4F_INDEXER_DECODE": "128,4,4"}, "ds4f.kernels.indexer", "DS4F_INDEXER_DECODE"),
    ({"DS4F_INDEXER_DECODE": "64,8,2,4"}, "ds4f.kernels.indexer", "DS4F_INDEXER_DECODE"),  # 2 warps: wrong scores
    ({"DS4F_TOPK_DECODE": "a,b"}, "ds4f.kernels.indexer", "DS4F_TOPK_DECODE"),
])
def test_bad_kernel_env_names_the_variable(env: dict[str, str], module: str, name: str) -> None:
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", f"import {module}"], env=dict(os.environ, **env), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and f"ValueError: {name}=" in r.stderr, r.stderr[-500:]
