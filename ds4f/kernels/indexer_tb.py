"""⑥ kernels, lightning indexer scores for prefill chunks: the token-blocked form of ds4f.kernels.indexer_scores
(same arguments, same [T, L] fp32 scores).

indexer_scores' kernel runs one program per (token, key range): every token gathers every key of its sequence
again, and the MMA's M is one token's heads (64). Here a program takes BT tokens: its M operand is their heads
stacked (BT x 64 rows, q loaded once), each gathered key tile serves all BT tokens, and the per-token head sums
come from one reshape of the [BT*Hi, BLOCK_L] product. Tokens of different sequences in one block (a chunk's edge
next to a decode token) take one pass per sequence over that sequence's keys, masked to their rows.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: indexer_scores runs its reference instead
    triton = None

if triton is not None:

    @triton.jit
    def _indexer_tb_fwd(
        q_ptr, w_ptr, k_ptr, ks_ptr, slots_ptr, seq_ptr, vlen_ptr, out_ptr,
        T, HI, L, scale, s_qt, s_qh, s_wt, s_kn, s_ss, s_ot,
        DI: tl.constexpr, BLOCK_HI: tl.constexpr, BT: tl.constexpr, BLOCK_L: tl.constexpr, N_INNER: tl.constexpr,
        KSCALE: tl.constexpr, QFP8: tl.constexpr,
    ):
        t0 = tl.program_id(0).to(tl.int64) * BT
        l0 = tl.program_id(1) * (BLOCK_L * N_INNER)
        offs_b = tl.arange(0, BT)
        tok = t0 + offs_b  # [BT]
        tmask = tok < T
        vlen = tl.minimum(tl.load(vlen_ptr + tok, mask=tmask, other=0), L)  # [BT]
        seq = tl.load(seq_ptr + tok, mask=tmask, other=-1)
        offs_r = tl.arange(0, BT * BLOCK_HI)  # rows: token offs_r // BLOCK_HI, head offs_r % BLOCK_HI
        rt = t0 + offs_r // BLOCK_HI
        rh = offs_r % BLOCK_HI
        rmask = (rt < T) & (rh < HI)
        offs_d = tl.arange(0, DI)
        if l0 >= tl.max(vlen, 0):  # nothing visible to any token of the block in these columns: -inf only
            for j in range(N_INNER):
                offs_l = l0 + j * BLOCK_L + tl.arange(0, BLOCK_L)
                tl.store(out_ptr + tok[:, None] * s_ot + offs_l[None, :],
                         tl.full([BT, BLOCK_L], float("-inf"), tl.float32),
                         mask=tmask[:, None] & (offs_l < L)[None, :])
            return
        q = tl.load(q_ptr + rt[:, None] * s_qt + rh[:, None] * s_qh + offs_d[None, :], mask=rmask[:, None], other=0.0)
        w = tl.load(w_ptr + rt * s_wt + rh, mask=rmask, other=0.0) * scale
        for b in range(0, BT):
            sb = tl.sum(tl.where(offs_b == b, seq, 0), 0)
            sprev = tl.sum(tl.where(offs_b == b - 1, seq, 0), 0)
            if (t0 + b < T) & ((b == 0) | (sb != sprev)):  # a sequence's first token in the block: one pass for it
                mine = (seq == sb) & tmask  # [BT] tokens of this pass
                nmax = tl.max(tl.where(mine, vlen, 0), 0)
                for j in range(N_INNER):
                    offs_l = l0 + j * BLOCK_L + tl.arange(0, BLOCK_L)
                    kval = offs_l < nmax
                    slot = tl.load(slots_ptr + sb.to(tl.int64) * s_ss + offs_l, mask=kval, other=0).to(tl.int64)
                    keys = tl.load(k_ptr + slot[:, None] * s_kn + offs_d[None, :], mask=kval[:, None], other=0.0)
                    if QFP8:  # e4m3 q (per-head scales folded into w) x e4m3 keys: the fp8 MMA
                        s = tl.dot(q, tl.trans(keys))
                    else:
                        if KSCALE:  # e4m3 -> bf16 is exact
                            keys = keys.to(tl.float32)
                        s = tl.dot(q, tl.trans(keys.to(tl.bfloat16)))  # [BT*BLOCK_HI, BLOCK_L]
                    p = tl.maximum(s, 0.0) * w[:, None]
                    sc = tl.sum(tl.reshape(p, [BT, BLOCK_HI, BLOCK_L]), 1)  # [BT, BLOCK_L]
                    if KSCALE:  # a positive per-row scale commutes with ReLU
                        sc = sc * tl.load(ks_ptr + slot, mask=kval, other=0.0)[None, :]
                    sc = tl.where(offs_l[None, :] < vlen[:, None], sc, float("-inf"))
                    tl.store(out_ptr + tok[:, None] * s_ot + offs_l[None, :], sc,
                             mask=mine[:, None] & (offs_l < L)[None, :])


def launch_tb(q: torch.Tensor, w: torch.Tensor, k_pool: torch.Tensor, k_scale: torch.Tensor | None,
              slots: torch.Tensor, seq_of: torch.Tensor, valid_len: torch.Tensor, scale: float, out: torch.Tensor,
              bt: int, block_l: int, n_inner: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """indexer_scores' checked arguments -> out [T, L] filled (bt tokens per program)."""
    T, HI, DI = q.shape
    L = slots.shape[1]
    assert bt >= 1 and bt & (bt - 1) == 0, f"token_block={bt} must be a power of two"
    grid = (triton.cdiv(T, bt), triton.cdiv(L, block_l * n_inner))
    _indexer_tb_fwd[grid](
        q, w, k_pool, k_scale if k_scale is not None else w, slots, seq_of, valid_len, out,
        T, HI, L, scale, q.stride(0), q.stride(1), w.stride(0), k_pool.stride(0), slots.stride(0), out.stride(0),
        DI=DI, BLOCK_HI=max(16, triton.next_power_of_2(HI)), BT=bt, BLOCK_L=block_l, N_INNER=n_inner,
        KSCALE=k_scale is not None, QFP8=q.dtype == torch.float8_e4m3fn, num_warps=num_warps, num_stages=num_stages,
    )
    return out
