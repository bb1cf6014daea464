"""⑥ kernels, lightning indexer scores for decode calls, keys-major: indexer_scores' one-token-per-program kernel
with the MMA's operands swapped (same arguments, same [T, L] fp32 scores up to the fp32 summation order).

indexer.py's _indexer_fwd multiplies q[t] [Hi, d] (M = the 64 heads) by a key tile's transpose, so its head sum
runs along M: across the warps' accumulator rows, through shared memory, once per key tile. Here the key tile
[BLOCK_L, d] is M and q[t]^T [d, Hi] is N: the head sum runs along N, within a thread's accumulator columns and the
few lanes sharing a row. Everything else is as _indexer_fwd: a program takes N_INNER key blocks of one token
(STRIDED: a grid apart), per-row key scales after the dot, zero_rank ties, -inf past the valid length, PDL, and the
optional first-digit histogram of the top-k (HIST). Selected by DS4F_INDEXER_DECODE_KM (ds4f.kernels.indexer)."""

from __future__ import annotations

import torch

from ds4f.kernels import pdl

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.topk_small import _sort_key
except ImportError:  # CPU-only installs: indexer_scores runs its reference instead
    triton = None

if triton is not None:

    @triton.jit
    def _indexer_dk_fwd(
        q_ptr, w_ptr, k_ptr, ks_ptr, slots_ptr, seq_ptr, vlen_ptr, out_ptr, hist_ptr,
        HI, L, scale, s_qt, s_qh, s_wt, s_kn, s_ss, s_ot,
        DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_L: tl.constexpr, N_INNER: tl.constexpr,
        KSCALE: tl.constexpr, QFP8: tl.constexpr, ZERO_RANK: tl.constexpr, STRIDED: tl.constexpr,
        PDL: tl.constexpr, HIST: tl.constexpr,
    ):
        # program = (token t, N_INNER blocks of BLOCK_L keys); int64 offsets as _indexer_fwd's
        pdl_enter(PDL)
        t = tl.program_id(0).to(tl.int64)
        l0 = tl.program_id(1) * (BLOCK_L if STRIDED else BLOCK_L * N_INNER)
        step = tl.num_programs(1) * BLOCK_L if STRIDED else BLOCK_L
        vlen = tl.minimum(tl.load(vlen_ptr + t), L)
        seq = tl.load(seq_ptr + t).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_HI)
        offs_d = tl.arange(0, DI)
        hmask = offs_h < HI
        if l0 >= vlen:  # nothing visible in this program's columns: -inf only
            for j in range(N_INNER):
                offs_l = l0 + j * step + tl.arange(0, BLOCK_L)
                tl.store(out_ptr + t * s_ot + offs_l, tl.full([BLOCK_L], float("-inf"), tl.float32),
                         mask=offs_l < L)
            return
        # q[t] [Hi, d]; its transpose is the N operand of every key tile
        q = tl.load(q_ptr + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
        w = tl.load(w_ptr + t * s_wt + offs_h, mask=hmask, other=0.0) * scale
        acc = tl.zeros([256], tl.int32)
        for j in range(N_INNER):
            offs_l = l0 + j * step + tl.arange(0, BLOCK_L)
            valid = offs_l < vlen
            slot = tl.load(slots_ptr + seq * s_ss + offs_l, mask=valid, other=0).to(tl.int64)
            keys = tl.load(k_ptr + slot[:, None] * s_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            if QFP8:  # e4m3 keys x e4m3 q (its per-head scales folded into w): the fp8 MMA
                s = tl.dot(keys, tl.trans(q))
            else:
                if KSCALE:  # e4m3 -> bf16 is exact, through fp32 as _index_sum
                    keys = keys.to(tl.float32)
                s = tl.dot(keys.to(tl.bfloat16), tl.trans(q))  # [BLOCK_L, Hi]
            sc = tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
            if KSCALE:  # a positive per-row scale commutes with ReLU
                sc = sc * tl.load(ks_ptr + slot, mask=valid, other=0.0)
            if ZERO_RANK:
                sc = tl.where(sc == 0.0, -(offs_l + 1).to(tl.float32) * 1e-30, sc)
            sc = tl.where(valid, sc, float("-inf"))
            tl.store(out_ptr + t * s_ot + offs_l, sc, mask=offs_l < L)
            if HIST:
                u = _sort_key(sc)
                acc += tl.histogram((u >> 24).to(tl.int32), 256, mask=u != 0)
        if HIST:
            tl.atomic_add(hist_ptr + t * 256 + tl.arange(0, 256), acc, mask=acc != 0, sem="relaxed")


def launch(q: torch.Tensor, w: torch.Tensor, k_pool: torch.Tensor, k_scale: torch.Tensor | None,
           slots: torch.Tensor, seq_of: torch.Tensor, valid_len: torch.Tensor, scale: float, out: torch.Tensor,
           block_l: int, n_inner: int, num_warps: int, num_stages: int, zero_rank: bool, strided: bool,
           hist: torch.Tensor | None) -> torch.Tensor:
    """indexer_scores' checked arguments (one token per program) -> out [T, L] filled by the keys-major kernel."""
    T, HI, DI = q.shape
    L = slots.shape[1]
    grid = (T, triton.cdiv(L, block_l * n_inner))
    _indexer_dk_fwd[grid](
        q, w, k_pool, k_scale if k_scale is not None else w, slots, seq_of, valid_len, out,
        hist if hist is not None else out, HI, L, scale, q.stride(0), q.stride(1), w.stride(0), k_pool.stride(0),
        slots.stride(0), out.stride(0),
        DI=DI, BLOCK_HI=max(16, triton.next_power_of_2(HI)), BLOCK_L=block_l, N_INNER=n_inner,
        KSCALE=k_scale is not None, QFP8=q.dtype == torch.float8_e4m3fn, ZERO_RANK=zero_rank, STRIDED=strided,
        HIST=hist is not None, num_warps=num_warps, num_stages=num_stages, **pdl.launch(q.device),
    )
    return out
