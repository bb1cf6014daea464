"""Fused RoPE launches at the real decode shapes (T = 1, 4, 16 tokens; 64 heads = one GPU, 32 = one TP=2 rank;
head_dim 512, rope_dim 64): norm_rope2 = the two norm_rope calls bit for bit, and sparse_attn(..., inv_rope=) =
rope_(sparse_attn(...), inverse=True) over bf16, e4m3 group-scaled and fp8_ds_mla pools on both attention paths
(one key split: _attn_fwd writes o; several: _attn_combine does). Old vs new per-call µs printed (CUDA graph of
20 calls, replayed: the launch gaps count), not asserted. Run with `pytest -s` to see the times."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON, sparse_attn
from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.ref import sparse_attn_ref
from ds4f.kernels.rope import norm_rope, norm_rope2, norm_rope_ref, rope_, rope_ref
from ds4f.model.layers import Rope

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

HD, RD = 512, 64


def _cs(t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 1 << 20, (t,), generator=torch.Generator().manual_seed(seed)).cuda()
    inv = 1.0 / (160000.0 ** (torch.arange(0, RD, 2, dtype=torch.float32) / RD))
    return Rope(RD, inv).cos_sin(pos)


def _graph_us(fn, reps: int = 20, iters: int = 20) -> float:
    """µs per call of fn, from a CUDA graph of `reps` back-to-back calls (launch gaps included), median of iters."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(ts)[len(ts) // 2]


def _ulp_close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Asserts |got - want| <= 1 bf16 ulp of want everywhere (FMA contraction may differ between two kernels' fp32
    rotations by one rounding); returns the fraction of bit-identical values."""
    torch.testing.assert_close(got.float(), want.float(), atol=1e-30, rtol=2**-7)
    return (got == want).float().mean().item()


@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_norm_rope2(T: int, H: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(T * H)
    q = (torch.randn(T, H, HD, device="cuda", generator=g) * 2).bfloat16()
    y = torch.randn(T, 3 * HD, device="cuda", generator=g).bfloat16()
    kv = y[:, HD: 2 * HD]  # a column slice of the fused input GEMM's output (row stride 3 * HD)
    w = torch.rand(HD, device="cuda", generator=g) + 0.5
    cos, sin = _cs(T, T)
    a, b = norm_rope2(q, kv, w, cos, sin, 1e-6)
    assert torch.equal(a, norm_rope(q, None, cos, sin, 1e-6)) and torch.equal(b, norm_rope(kv, w, cos, sin, 1e-6))
    torch.testing.assert_close(a.float(), norm_rope_ref(q, None, cos, sin, 1e-6).float(), atol=3e-2, rtol=1e-2)
    torch.testing.assert_close(b.float(), norm_rope_ref(kv, w, cos, sin, 1e-6).float(), atol=3e-2, rtol=1e-2)
    old = _graph_us(lambda: (norm_rope(q, None, cos, sin, 1e-6), norm_rope(kv, w, cos, sin, 1e-6)))
    new = _graph_us(lambda: norm_rope2(q, kv, w, cos, sin, 1e-6))
    print(f"norm_rope x2 vs norm_rope2 T={T} H={H}: {old:.2f} -> {new:.2f} us")


def _pool(kind: str, n: int, g: torch.Generator) -> tuple[tuple, dict, torch.Tensor]:
    """(positional pool args after q, keyword args, the dequantized [n, HD] bf16 rows for the reference)."""
    x = torch.randn(n, HD, device="cuda", generator=g)
    if kind == "bf16":
        p = x.bfloat16()
        return (p,), {}, p
    if kind == "e4m3":  # 8 power-of-two group scales per row
        xs = x.view(n, 8, HD // 8)
        sc = torch.exp2(torch.ceil(torch.log2(xs.abs().amax(-1) / 448.0)))
        p = (xs / sc[..., None]).to(torch.float8_e4m3fn).view(n, HD)
        rows = (p.float().view(n, 8, -1) * sc[..., None]).view(n, HD).bfloat16()
        return (p,), {"kv_scale": sc.contiguous()}, rows
    nope, exp, rope = quantize_kv_rows(x, RD)
    return (nope,), {"kv_scale": exp, "kv_rope": rope}, dequantize_kv_rows(nope, exp, rope)


@pytest.mark.parametrize("kind", ["bf16", "e4m3", "split_rows"])
@pytest.mark.parametrize("H", [64, 32])
@pytest.mark.parametrize("T", [1, 4, 16])
def test_sparse_attn_inv_rope(T: int, H: int, kind: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(7 * T + H)
    n = 8192
    (pool,), kw, rows = _pool(kind, n, g)
    q = torch.randn(T, H, HD, device="cuda", generator=g).bfloat16()
    sink = torch.randn(H, device="cuda", generator=g)
    cos, sin = _cs(T, H)
    for K, splits in ((128, None), (128, 1), (2176, None), (2176, 1)):  # SWA window; CSA/HCA window + entries
        idx = torch.randint(0, n, (T, K), device="cuda", generator=g, dtype=torch.int32)
        idx[:, -7:] = -1
        live = torch.full((T,), K - 7, dtype=torch.int32, device="cuda") if K > 128 else None
        kw2 = dict(kw, num_splits=splits, live=live)
        o = sparse_attn(q, pool, idx, sink, HD**-0.5, **kw2)
        got = sparse_attn(q, pool, idx, sink, HD**-0.5, inv_rope=(cos, sin), **kw2)
        want = rope_(o.clone(), cos, sin, inverse=True)
        assert torch.equal(got[..., :-RD], o[..., :-RD]), (K, splits)
        exact = _ulp_close(got, want)
        ref = rope_ref(sparse_attn_ref(q, rows, idx, sink, HD**-0.5), cos, sin, True)
        rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < 1.5e-2, (K, splits, rel)

        def old(kw2=kw2, idx=idx):
            rope_(sparse_attn(q, pool, idx, sink, HD**-0.5, **kw2), cos, sin, inverse=True)

        def new(kw2=kw2, idx=idx):
            sparse_attn(q, pool, idx, sink, HD**-0.5, inv_rope=(cos, sin), **kw2)

        print(f"attn+rope_ vs fused {kind} T={T} H={H} K={K} splits={splits}: {_graph_us(old):.2f} -> "
              f"{_graph_us(new):.2f} us; bit-exact vs rope_ {exact:.4f}, rel vs ref {rel:.2e}")
