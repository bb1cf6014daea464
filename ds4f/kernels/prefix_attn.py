"""⑥ kernels, prefix attention for prefill chunks over all-entries layers (HCA): q [T, H, D] + each sequence's
compressed entries as a dense bf16 block [B, L, D] + per-token window rows of the flat pool in, o [T, H, D] out.

Every token of a sequence sees a prefix of the same entry list (entries 0 .. vis[t] - 1, vis = (pos + 1) // ratio),
so one tile of rows (token, head) shares each key tile of that list. sparse_attn instead walks per-token index lists:
at 1M context an HCA layer's 8K-token chunk gathered and dequantized ~7K fp8 rows per token and head block (62.7 ms
per layer on average in the 1M TP=2 prefill profile). Here the entries are dequantized once per step (dense_entries)
and the MMA reads them contiguously; the window (<= W rows per token, ring / scratch rows) is read per token from the
pool inside the same kernel, so window, entries and sink share one softmax (no partials, no second launch).
"""

from __future__ import annotations

import torch

from ds4f.kernels.fp8 import dequantize_kv_rows
from ds4f.kernels.ref import sparse_attn_ref
from ds4f.kernels.sparse_attn import LOG2E, use_triton

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.sparse_attn import _kv_row_tile
except ImportError:  # CPU-only installs: prefix_attn runs the reference
    triton = None


if triton is not None:

    @triton.jit
    def _softmax_step(q, kt, keep, m, l, acc, qk_scale):
        # one key tile kt [N, D] (K = V) into the online softmax of rows q [M, D]; keep [M, N] masks the logits
        s = tl.where(keep, tl.dot(q, tl.trans(kt)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        return m_new, l * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), kt)

    @triton.jit
    def _prefix_fwd(
        q_ptr, ent_ptr, seq_ptr, vis_ptr, win_ptr, kv_ptr, exp_ptr, rope_ptr, sink_ptr, o_ptr,
        T, H, W, qk_scale,
        s_qt, s_qh, s_eb, s_en, s_wt, s_kvn, s_en8, s_rn, s_ot, s_oh,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BT: tl.constexpr,
        NOPE: tl.constexpr, NATIVE_FP8: tl.constexpr,
    ):
        # program = BLOCK_M rows of the flattened (token, head) grid; its tokens t_first..t_last (<= BT of them)
        r0 = tl.program_id(0) * BLOCK_M
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < T * H
        t = rows // H
        h = rows % H
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(q_ptr + t.to(tl.int64)[:, None] * s_qt + h[:, None] * s_qh + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        seq = tl.load(seq_ptr + t, mask=rmask, other=-1)
        vis = tl.load(vis_ptr + t, mask=rmask, other=0)
        m = tl.full([BLOCK_M], -1.0e30, tl.float32)  # log2 units; a finite floor while every key so far is masked
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        t_first = r0 // H
        t_last = tl.minimum((r0 + BLOCK_M - 1) // H, T - 1)
        offs_n = tl.arange(0, BLOCK_N)
        for j in range(0, BT):
            tj = t_first + j
            if tj <= t_last:
                # window: token tj's own rows (ring / scratch), masked to tj's rows of the tile
                mine = t == tj
                for w0 in range(0, W, BLOCK_N):
                    offs_w = w0 + offs_n
                    idx = tl.load(win_ptr + tj.to(tl.int64) * s_wt + offs_w, mask=offs_w < W, other=-1)
                    valid = idx >= 0
                    kt = _kv_row_tile(kv_ptr, exp_ptr, rope_ptr, idx.to(tl.int64), valid, offs_d, dmask,
                                      s_kvn, s_en8, s_rn, BLOCK_N, BLOCK_D, NOPE, NATIVE_FP8)
                    m, l, acc = _softmax_step(q, kt, mine[:, None] & valid[None, :], m, l, acc, qk_scale)
                # entries: one pass per distinct sequence among the tile's tokens (tokens of a sequence are adjacent)
                sj = tl.load(seq_ptr + tj)
                sp = tl.load(seq_ptr + tl.maximum(tj - 1, 0))
                if (j == 0) | (sj != sp):
                    lim = tl.where(seq == sj, vis, 0)  # [BLOCK_M] entries each row sees in this pass
                    n_j = tl.max(lim, 0)
                    base = ent_ptr + sj.to(tl.int64) * s_eb
                    for k0 in range(0, n_j, BLOCK_N):
                        offs_k = k0 + offs_n
                        kt = tl.load(base + offs_k.to(tl.int64)[:, None] * s_en + offs_d[None, :],
                                     mask=(offs_k < n_j)[:, None] & dmask[None, :], other=0.0)
                        m, l, acc = _softmax_step(q, kt, offs_k[None, :] < lim[:, None], m, l, acc, qk_scale)
        # sink in the denominator only: o = acc·2^(m-M) / (l·2^(m-M) + 2^(sink-M))
        sink = tl.load(sink_ptr + h, mask=rmask, other=0.0) * 1.4426950408889634
        mm = tl.maximum(m, sink)
        a = tl.exp2(m - mm)
        den = l * a + tl.exp2(sink - mm)
        o = acc * (a / den)[:, None]
        tl.store(o_ptr + t.to(tl.int64)[:, None] * s_ot + h[:, None] * s_oh + offs_d[None, :], o.to(tl.bfloat16),
                 mask=rmask[:, None] & dmask[None, :])


Pool = torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _rows(pool: Pool, rows: torch.Tensor) -> torch.Tensor:
    """pool rows [n] int64 -> [n, D] bf16 (fp8 split rows dequantize exactly)."""
    if isinstance(pool, torch.Tensor):
        return pool[rows].to(torch.bfloat16)
    nope, exp, rope = pool
    return dequantize_kv_rows(nope[rows], exp[rows], rope[rows], torch.bfloat16)


DEQUANT_ROWS = 1 << 16  # rows dequantized at a time: ~0.4 GiB of fp32 temporaries at head_dim 512


def dense_entries(pool: Pool, table: torch.Tensor, comp_base: int, epb: int, n: int) -> torch.Tensor:
    """Entries 0..n-1 of every block-table row -> [B, n, D] bf16 (entry w of row b at pool row
    comp_base + table[b, w // epb] * epb + w % epb; entries past a sequence's blocks read the dummy block).
    Dequantized DEQUANT_ROWS at a time: a step of many sequences next to a 1M-token one holds B x n rows, and only
    the bf16 result may be that large (the warmup's activation peak has B = 1)."""
    w = torch.arange(n, device=table.device)
    rows = (comp_base + table[:, w // epb] * epb + w % epb).reshape(-1)  # [B * n]
    D = pool.shape[1] if isinstance(pool, torch.Tensor) else pool[0].shape[1] + pool[2].shape[1]
    out = torch.empty(rows.numel(), D, dtype=torch.bfloat16, device=table.device)
    for r in range(0, rows.numel(), DEQUANT_ROWS):
        out[r: r + DEQUANT_ROWS] = _rows(pool, rows[r: r + DEQUANT_ROWS])
    return out.view(table.shape[0], n, D)


def prefix_attn_ref(q: torch.Tensor, ent: torch.Tensor, seq: torch.Tensor, vis: torch.Tensor, win: torch.Tensor,
                    pool: Pool, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """The same softmax through sparse_attn_ref: window rows + token t's visible entries as one index list."""
    T = q.shape[0]
    B, L, D = ent.shape
    wrows = win.long().clamp(min=0).reshape(-1)
    kv = torch.cat([_rows(pool, wrows), ent.reshape(B * L, D)])  # [T*W + B*L, D]
    Wn = win.shape[1]
    wi = torch.where(win >= 0, torch.arange(T * Wn, device=q.device).view(T, Wn), -1)
    k = torch.arange(L, device=q.device)
    ei = torch.where(k[None, :] < vis[:, None].long(), T * Wn + seq[:, None].long() * L + k[None, :], -1)
    return sparse_attn_ref(q, kv, torch.cat([wi, ei], dim=1).to(torch.int32), sink, scale)


def prefix_attn(q: torch.Tensor, ent: torch.Tensor, seq: torch.Tensor, vis: torch.Tensor, win: torch.Tensor,
                pool: Pool, sink: torch.Tensor, scale: float, *, block_m: int | None = None, block_n: int | None = None,
                num_warps: int = 8, num_stages: int | None = None, native_fp8: bool | None = None) -> torch.Tensor:
    """o [T, H, D] bf16: per (t, h) one softmax over win[t]'s pool rows and entries ent[seq[t], :vis[t]], the sink in
    the denominator only (sparse_attn over cat(win, visible entry rows) gives the same).

    q [T, H, D] bf16 (dim -1 dense); ent [B, L, D] bf16 (dense_entries); seq [T] int32 row of ent; vis [T] int32
    <= L; win [T, W] int32 pool rows (-1 = none); pool: bf16 [N, D] or the fp8 split rows (nope [N, dn] e4m3,
    exp [N, >= ceil(dn / 64)] uint8, rope [N, D - dn] bf16) as FastCache keeps them; sink [H] fp32. No host sync."""
    T, H, D = q.shape
    assert q.dtype == torch.bfloat16 and q.stride(-1) == 1, "q must be [T, H, D] bf16, dim -1 dense"
    assert ent.dim() == 3 and ent.shape[2] == D and ent.dtype == torch.bfloat16 and ent.stride(-1) == 1
    assert seq.shape == (T,) and vis.shape == (T,) and seq.dtype == vis.dtype == torch.int32
    assert win.dim() == 2 and win.shape[0] == T and win.dtype == torch.int32 and win.stride(-1) == 1
    assert sink.shape == (H,) and sink.dtype == torch.float32
    if not use_triton(q):
        return prefix_attn_ref(q, ent, seq, vis, win, pool, sink, scale)
    o = torch.empty(T, H, D, dtype=torch.bfloat16, device=q.device)
    if T == 0:
        return o
    block_d = max(64, triton.next_power_of_2(D))
    if isinstance(pool, torch.Tensor):
        assert pool.dtype == torch.bfloat16 and pool.shape[1] == D and pool.stride(-1) == 1
        kv, exp, rope, nope, strides = pool, pool, pool, 0, (pool.stride(0), 0, 0)
        native = False
    else:
        nz, exp, rope = pool
        nope = nz.shape[1]
        assert rope.shape[1] == D - nope and exp.shape[1] * 64 >= nope
        kv = nz.view(torch.uint8)
        strides = (kv.stride(0), exp.stride(0), rope.stride(0))
        native = native_fp8 if native_fp8 is not None else (
            q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9))
    if block_m is None or block_n is None or num_stages is None:  # K tiles [BLOCK_N, BLOCK_D] per stage, q's rows
        smem = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin if q.is_cuda else 1 << 20
        # Hopper 227 KB; A100 164 KB (its bit-level fp8 decode stages more: 192 KB at 32 keys); GB10 / sm_12x 99 KB:
        # fp8 rows there need 32 query rows per program (64 x 16 keys: 160 KB; 32 x 16: 96 KB, offline sm_121 builds)
        mid = 32 if nope == 0 or native else 16
        block_n = block_n or (64 if smem >= 200 << 10 else mid if smem >= 140 << 10 else 16)
        num_stages = num_stages or (2 if smem >= 140 << 10 else 1)
        block_m = block_m or (32 if nope and smem < 140 << 10 else 64)
    bt = triton.cdiv(block_m, H) + 1
    _prefix_fwd[(triton.cdiv(T * H, block_m),)](
        q, ent, seq, vis, win, kv, exp, rope, sink, o,
        T, H, win.shape[1], scale * LOG2E,
        q.stride(0), q.stride(1), ent.stride(0), ent.stride(1), win.stride(0), *strides, o.stride(0), o.stride(1),
        D=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BT=bt, NOPE=nope, NATIVE_FP8=native,
        num_warps=num_warps, num_stages=num_stages,
    )
    return o


__all__ = ["dense_entries", "prefix_attn", "prefix_attn_ref"]
