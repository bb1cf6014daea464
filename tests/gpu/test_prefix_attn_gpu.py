"""⑥ prefix attention on CUDA: V4-Flash widths (head_dim 512, fp8 split rows, window 128), several sequences,
against sparse_attn_ref over the same window + entry lists; and the 1M-prefill chunk shape timed against
sparse_attn over per-token lists (printed, not asserted)."""

from __future__ import annotations

import time

import pytest
import torch

from ds4f.kernels import HAS_TRITON, sparse_attn
from ds4f.kernels.fp8 import quantize_kv_rows
from ds4f.kernels.prefix_attn import dense_entries, prefix_attn, prefix_attn_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

ATTN_TOL = 1.5e-2  # softmax weights are rounded to bf16 before the PV product (as sparse_attn)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(lens: tuple[int, ...], H: int, L: int, fp8: bool, seed: int, ratio: int = 128, W: int = 128):
    """Sequences of `lens` tokens ending at position L * ratio (a chunk's tail), table rows in reverse order."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    D, epb, B = 512, 2, len(lens)
    T = sum(lens)
    n_pool = 64 * W + T + (B * L // epb + 1) * epb
    comp_base = n_pool - (B * L // epb + 1) * epb
    x = torch.randn(n_pool, D, device="cuda", generator=g)
    pool = quantize_kv_rows(x, 64) if fp8 else x.bfloat16()
    table = torch.arange(B * L // epb, device="cuda").view(B, L // epb).flip(0).contiguous()
    seq = torch.cat([torch.full((n,), b, dtype=torch.int32, device="cuda") for b, n in enumerate(lens)])
    pos = torch.cat([torch.arange(L * ratio - n, L * ratio, device="cuda") for n in lens])
    vis = ((pos + 1) // ratio).clamp(max=L).to(torch.int32)
    win = torch.randint(0, comp_base, (T, W), device="cuda", generator=g, dtype=torch.int32)
    win[:, -3:] = -1
    q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
    sink = torch.randn(H, device="cuda", generator=g)
    return q, dense_entries(pool, table, comp_base, epb, L), seq, vis, win, pool, sink, table, comp_base, epb


@pytest.mark.parametrize("lens,H,L,fp8", [((300,), 32, 700, True), ((5, 257, 1, 90), 32, 300, True),
                                          ((130, 70), 64, 256, True), ((77, 3), 32, 128, False), ((40,), 24, 64, True)])
def test_prefix_attn_matches_reference(lens, H, L, fp8) -> None:
    q, ent, seq, vis, win, pool, sink, *_ = _case(lens, H, L, fp8, seed=len(lens) + H)
    got = prefix_attn(q, ent, seq, vis, win, pool, sink, 512**-0.5)
    want = prefix_attn_ref(q, ent, seq, vis, win, pool, sink, 512**-0.5)
    assert torch.isfinite(got).all()
    assert _rel(got.float(), want.float()) < ATTN_TOL


def test_prefix_attn_speed_at_1m_chunk() -> None:
    # the last 8K-token chunk of a 1M prompt on one TP=2 rank: 32 heads, 8192 entries, fp8 split rows
    T, H, L = 8192, 32, 8192
    q, ent, seq, vis, win, pool, sink, table, comp_base, epb = _case((T,), H, L, True, seed=7)
    k = torch.arange(L, device="cuda")
    erow = comp_base + table[seq.long()][:, k // epb] * epb + k % epb
    idx = torch.cat([win, torch.where(k[None, :] < vis[:, None].long(), erow, -1).int()], dim=1)
    nope, exp, rope = pool

    def sparse():
        return sparse_attn(q, nope, idx, sink, 512**-0.5, exp, kv_rope=rope)

    def prefix():
        return prefix_attn(q, dense_entries(pool, table, comp_base, epb, L), seq, vis, win, pool, sink, 512**-0.5)

    a, b = sparse(), prefix()
    assert _rel(b.float(), a.float()) < ATTN_TOL
    for name, fn in (("sparse_attn", sparse), ("prefix_attn", prefix)):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 3 * 1e3
        tflops = 4 * T * H * 512 * (L + 128) / ms / 1e9
        print(f"{name} T={T} H={H} entries={L}: {ms:.2f} ms ({tflops:.0f} TFLOP/s)")
