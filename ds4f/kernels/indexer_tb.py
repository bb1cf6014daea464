"""⑥ kernels, lightning indexer scores for prefill chunks: the token-blocked form of ds4f.kernels.indexer_scores
(same arguments, same [T, L] fp32 scores).

indexer_scores' kernel runs one program per (token, key range): every token gathers every key of its sequence
again, and the MMA's M is one token's heads (64). Here a program takes BT tokens: its M operand is their heads
stacked (BT x 64 rows, q loaded once), each gathered key tile serves all BT tokens, and the per-token head sums
come from one reshape of the [BT*Hi, BLOCK_L] product. Tokens of different sequences in one block (a chunk's edge
next to a decode token) take one pass per sequence over that sequence's keys, masked to their rows.

The keys-major form (_indexer_kt_fwd, DS4F_INDEXER_TB="k,bt,block_l,num_warps") swaps the MMA's operands: a tile of
BLOCK_L keys is M, one token's heads are N, and the program walks BT tokens over the same tile. Opt-in until timed.
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
        KSCALE: tl.constexpr, QFP8: tl.constexpr, ZERO_RANK: tl.constexpr,
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
                    if ZERO_RANK:  # as indexer_scores(zero_rank=True)
                        sc = tl.where(sc == 0.0, -(offs_l[None, :] + 1).to(tl.float32) * 1e-30, sc)
                    sc = tl.where(offs_l[None, :] < vlen[:, None], sc, float("-inf"))
                    tl.store(out_ptr + tok[:, None] * s_ot + offs_l[None, :], sc,
                             mask=mine[:, None] & (offs_l < L)[None, :])


    @triton.jit
    def _indexer_kt_fwd(
        q_ptr, w_ptr, k_ptr, ks_ptr, slots_ptr, seq_ptr, vlen_ptr, out_ptr,
        T, HI, L, scale, s_qt, s_qh, s_wt, s_kn, s_ss, s_ot,
        DI: tl.constexpr, BLOCK_HI: tl.constexpr, BT: tl.constexpr, BLOCK_L: tl.constexpr,
        KSCALE: tl.constexpr, QFP8: tl.constexpr, ZERO_RANK: tl.constexpr, STAGES: tl.constexpr,
    ):
        # keys-major: program = (BLOCK_L keys, BT tokens). The key tile is the MMA's M operand, a token's heads its N,
        # so the head sum runs along N (within a thread's columns and a few lanes) instead of across warps; the tile
        # is gathered once per sequence change and reused by the following tokens.
        l0 = tl.program_id(0) * BLOCK_L
        t0 = tl.program_id(1).to(tl.int64) * BT
        offs_l = l0 + tl.arange(0, BLOCK_L)
        offs_h = tl.arange(0, BLOCK_HI)
        offs_d = tl.arange(0, DI)
        hmask = offs_h < HI
        lmask = offs_l < L
        t_last = tl.minimum(t0 + BT, T) - 1
        s_first = tl.load(seq_ptr + t0)
        if s_first == tl.load(seq_ptr + t_last):
            # one sequence (a prefill chunk's body): one gather, then a branch-free token loop whose q loads the
            # pipeliner can issue ahead of the MMA
            offs_b = tl.arange(0, BT)
            vl = tl.minimum(tl.load(vlen_ptr + t0 + offs_b, mask=t0 + offs_b < T, other=0), L)
            if l0 >= tl.max(vl, 0):  # no token of the block sees these keys
                tl.store(out_ptr + (t0 + offs_b)[:, None] * s_ot + offs_l[None, :],
                         tl.full([BT, BLOCK_L], float("-inf"), tl.float32),
                         mask=(t0 + offs_b < T)[:, None] & lmask[None, :])
                return
            slot = tl.load(slots_ptr + s_first.to(tl.int64) * s_ss + offs_l, mask=lmask, other=0).to(tl.int64)
            keys = tl.load(k_ptr + slot[:, None] * s_kn + offs_d[None, :], mask=lmask[:, None], other=0.0)
            if KSCALE:
                kscale = tl.load(ks_ptr + slot, mask=lmask, other=0.0)
            if not QFP8:
                keys = keys.to(tl.float32).to(tl.bfloat16) if KSCALE else keys
            for b in tl.range(0, BT, num_stages=STAGES):
                t = t0 + b
                tv = t < T
                vlen = tl.minimum(tl.load(vlen_ptr + t, mask=tv, other=0), L)
                q = tl.load(q_ptr + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None] & tv,
                            other=0.0)
                w = tl.load(w_ptr + t * s_wt + offs_h, mask=hmask & tv, other=0.0) * scale
                s = tl.dot(keys, tl.trans(q))  # [BLOCK_L, BLOCK_HI]
                sc = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
                if KSCALE:
                    sc = sc * kscale
                if ZERO_RANK:
                    sc = tl.where(sc == 0.0, -(offs_l + 1).to(tl.float32) * 1e-30, sc)
                sc = tl.where(offs_l < vlen, sc, float("-inf"))
                tl.store(out_ptr + t * s_ot + offs_l, sc, mask=lmask & tv)
            return
        cur = s_first * 0 - 1  # sequence whose keys the tile holds (-1: none yet)
        keys = tl.zeros([BLOCK_L, DI], dtype=k_ptr.dtype.element_ty)
        kscale = tl.zeros([BLOCK_L], dtype=tl.float32)
        for b in range(0, BT):
            t = t0 + b
            if t < T:
                vlen = tl.minimum(tl.load(vlen_ptr + t), L)
                if l0 < vlen:
                    sq = tl.load(seq_ptr + t)
                    if sq != cur:  # (re)gather this sequence's keys of the tile, up to the widest row that reads it
                        slot = tl.load(slots_ptr + sq.to(tl.int64) * s_ss + offs_l, mask=lmask, other=0).to(tl.int64)
                        keys = tl.load(k_ptr + slot[:, None] * s_kn + offs_d[None, :], mask=lmask[:, None], other=0.0)
                        if KSCALE:
                            kscale = tl.load(ks_ptr + slot, mask=lmask, other=0.0)
                        cur = sq
                    q = tl.load(q_ptr + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None],
                                other=0.0)
                    w = tl.load(w_ptr + t * s_wt + offs_h, mask=hmask, other=0.0) * scale
                    if QFP8:  # e4m3 keys x e4m3 q (per-head scales folded into w): the fp8 MMA
                        s = tl.dot(keys, tl.trans(q))
                    else:
                        kb = keys.to(tl.float32).to(tl.bfloat16) if KSCALE else keys
                        s = tl.dot(kb, tl.trans(q))  # [BLOCK_L, BLOCK_HI]
                    sc = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
                    if KSCALE:  # a positive per-row scale commutes with ReLU
                        sc = sc * kscale
                    if ZERO_RANK:  # as indexer_scores(zero_rank=True)
                        sc = tl.where(sc == 0.0, -(offs_l + 1).to(tl.float32) * 1e-30, sc)
                    sc = tl.where(offs_l < vlen, sc, float("-inf"))
                else:
                    sc = tl.full([BLOCK_L], float("-inf"), tl.float32)
                tl.store(out_ptr + t * s_ot + offs_l, sc, mask=lmask)


def launch(q: torch.Tensor, w: torch.Tensor, k_pool: torch.Tensor, k_scale: torch.Tensor | None,
           slots: torch.Tensor, seq_of: torch.Tensor, valid_len: torch.Tensor, scale: float, out: torch.Tensor,
           bt: int, keys_major: bool, block_l: int, n_inner: int, num_warps: int, num_stages: int,
           zero_rank: bool) -> torch.Tensor:
    """indexer_scores' checked arguments -> out [T, L] filled, bt tokens per program (a power of two): the
    heads-major kernel (n_inner key blocks per program) or the keys-major one (one key block per program)."""
    T, HI, DI = q.shape
    L = slots.shape[1]
    assert bt >= 1 and bt & (bt - 1) == 0, f"token_block={bt} must be a power of two"
    args = (q, w, k_pool, k_scale if k_scale is not None else w, slots, seq_of, valid_len, out,
            T, HI, L, scale, q.stride(0), q.stride(1), w.stride(0), k_pool.stride(0), slots.stride(0), out.stride(0))
    consts = dict(DI=DI, BLOCK_HI=max(16, triton.next_power_of_2(HI)), BT=bt, BLOCK_L=block_l,
                  KSCALE=k_scale is not None, QFP8=q.dtype == torch.float8_e4m3fn, ZERO_RANK=zero_rank,
                  num_warps=num_warps, num_stages=num_stages)
    if keys_major:
        _indexer_kt_fwd[(triton.cdiv(L, block_l), triton.cdiv(T, bt))](*args, STAGES=max(1, num_stages), **consts)
    else:
        grid = (triton.cdiv(T, bt), triton.cdiv(L, block_l * n_inner))
        _indexer_tb_fwd[grid](*args, N_INNER=n_inner, **consts)
    return out
