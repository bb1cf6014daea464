"""⑥ kernels, KV compressor step (one Triton launch): a chunk's [wkv | wgate] rows + the fp32 carry ring + candidate
tokens in; the chunk's state rows, the entries the candidates complete and their pool rows out.

Same inputs and outputs as ds4f.runner.gpu.glue.compress_ref (the torch reference, = model.compressor.Compressor
.project + compress): kvz [T, 2*cd] (unit channel stride, any row stride), ape [m, cd] fp32, ring [S1*R, 2*cd] fp32
(contiguous; rows of positions before each token's chunk, at slot * R + pos % R), norm_w [hd] fp32, et [E] candidate
token ids (-1 = none), p / chunk_start / tok_slot [T] int, bt_tok [T, max_blocks] int, cos_t / sin_t [max_pos, rd/2]
fp32 -> rows [T, 2*cd] fp32 (= kvz + ape[p % m] on the Z half), entries [E, hd] in kvz's dtype (gated pool over the
entry's ns = m (HCA) or 2m (CSA: Ca of window w-1, Cb of window w) slots, RMSNorm, RoPE at w*m) and dest [E] int64.
A candidate that completes nothing gets an all-zero entry (the reference's value there is unspecified) and the
dummy block's first row.

One program per candidate (online softmax over the ns slots, BLOCK_S at a time, per channel), then programs that
write BLOCK_T x BLOCK_C tiles of the state rows. Decode steps may have the kernel store the state rows into the carry
ring and the entries into the pool themselves (ring_rows / pool), fp8 pools included (fp8_pool: the entry quantized
in the candidate's program as ds4f.kernels.fp8's row stores do), so nothing on the attention's or the indexer's
chain waits for a store launch after this one.
"""

from __future__ import annotations

import torch

from ds4f.kernels import pdl

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.fp8 import _kv_tile_store, _pow2_exp, _to_e4m3
    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: glue.compress runs the torch reference
    triton = None

if triton is not None:

    @triton.jit
    def _compress_kernel(kvz_ptr, ape_ptr, ring_ptr, w_ptr, et_ptr, p_ptr, cs_ptr, slot_ptr, bt_ptr, cos_ptr,
                         sin_ptr, rows_ptr, ent_ptr, dst_ptr, rrow_ptr, E, T, s_kvz, s_bt, s_cs, eps, dest_base,
                         dummy_block, epb, ring_len, CD: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr,
                         HALF: tl.constexpr, M: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, RING_OUT: tl.constexpr,
                         POOL_OUT: tl.constexpr, f0_ptr=None, f1_ptr=None, f2_ptr=None, fs0=0, fs1=0, fs2=0,
                         FP8_OUT: tl.constexpr = 0, NOPE: tl.constexpr = 0, PDL: tl.constexpr = False):
        # RING_OUT: state rows go to ring rows rrow[t] (rows_ptr = the ring); POOL_OUT: entries go to pool row dst
        # (ent_ptr = the pool [N, HD]) instead of row pid of ent; FP8_OUT (with POOL_OUT): the entry, rounded to
        # bf16, quantized into an fp8 pool row dst as fp8.store_key_rows (1: keys f0 [N, HD] e4m3 + scale f1 [N])
        # or fp8.store_kv_rows (2: nope f0, exp f1, rope f2) store it (same bits)
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        pid = tl.program_id(0)
        if pid < E:
            et = tl.load(et_ptr + pid)
            i = tl.maximum(et, 0)
            pe = tl.load(p_ptr + i)
            valid = (et >= 0) & ((pe + 1) % M == 0)
            w = tl.maximum((pe + 1) // M - 1, 0)
            blk = tl.load(bt_ptr + i * s_bt + w // epb, mask=valid, other=0)
            dst = tl.where(valid, dest_base + blk * epb + w % epb, dest_base + dummy_block * epb)
            tl.store(dst_ptr + pid, dst.to(tl.int64))
            offs_d = tl.arange(0, BLOCK_D)
            dm = offs_d < HD
            if valid:
                c0 = tl.load(cs_ptr + i)
                rbase = tl.load(slot_ptr + i) * ring_len
                NS: tl.constexpr = 2 * M if OVERLAP else M
                q0 = w * M - (M if OVERLAP else 0)
                # per channel: running max (finite floor: window -1's slots are -inf), sum of exp, weighted sum
                mx = tl.full([BLOCK_D], -1.0e30, tl.float32)
                den = tl.zeros([BLOCK_D], tl.float32)
                acc = tl.zeros([BLOCK_D], tl.float32)
                for s0 in range(0, NS, BLOCK_S):
                    s = s0 + tl.arange(0, BLOCK_S)
                    q = q0 + s  # [BLOCK_S] positions
                    qn = tl.maximum(q, 0)
                    exists = (s < NS) & (q >= 0)
                    inc = q >= c0
                    ci = tl.minimum(tl.maximum(i - (pe - q), 0), T - 1)
                    ri = rbase + qn % ring_len
                    if OVERLAP:  # slots < m: Ca (first half of K and of Z), then Cb (second halves)
                        hf = (s >= M).to(tl.int32) * HD
                    else:
                        hf = s * 0
                    kc = hf[:, None] + offs_d[None, :]  # [BLOCK_S, BLOCK_D] K column; Z column = CD + kc
                    mc = exists[:, None] & dm[None, :] & inc[:, None]
                    mr = exists[:, None] & dm[None, :] & (~inc)[:, None]
                    krow = kvz_ptr + ci[:, None] * s_kvz + kc
                    rrow = ring_ptr + ri[:, None] * (2 * CD) + kc
                    k = tl.load(krow, mask=mc, other=0.0).to(tl.float32) + tl.load(rrow, mask=mr, other=0.0)
                    za = tl.load(ape_ptr + (qn % M)[:, None] * CD + kc, mask=mc, other=0.0)
                    z = tl.load(krow + CD, mask=mc, other=0.0).to(tl.float32) + za
                    z = tl.where(inc[:, None], z, tl.load(rrow + CD, mask=mr, other=0.0))
                    z = tl.where(exists[:, None], z, float("-inf"))
                    m_new = tl.maximum(mx, tl.max(z, 0))
                    alpha = tl.exp(mx - m_new)
                    pz = tl.exp(z - m_new[None, :])
                    den = den * alpha + tl.sum(pz, 0)
                    acc = acc * alpha + tl.sum(pz * k, 0)
                    mx = m_new
                x = tl.where(dm, acc / den, 0.0)
                r = tl.rsqrt(tl.sum(x * x, 0) / HD + eps)
                x = tl.load(w_ptr + offs_d, mask=dm, other=0.0) * (x * r)
                # RoPE on the last HALF pairs (interleaved), fp32; pairs before them pass through (cos 1, sin 0)
                e, o = tl.split(tl.reshape(x, [BLOCK_D // 2, 2]))
                NOPE_P: tl.constexpr = HD // 2 - HALF
                pj = tl.arange(0, BLOCK_D // 2) - NOPE_P
                cm = (pj >= 0) & (pj < HALF)
                c = tl.load(cos_ptr + (w * M) * s_cs + pj, mask=cm, other=1.0)
                sn = tl.load(sin_ptr + (w * M) * s_cs + pj, mask=cm, other=0.0)
                y = tl.reshape(tl.join(e * c - o * sn, o * c + e * sn), [BLOCK_D])
            else:
                y = tl.zeros([BLOCK_D], tl.float32)
            if FP8_OUT == 1:
                xb = tl.where(dm, y.to(tl.bfloat16).to(tl.float32), 0.0)
                ce = _pow2_exp(tl.max(tl.abs(xb), 0))
                inv = ((127 - ce) << 23).to(tl.float32, bitcast=True)
                d64 = dst.to(tl.int64)
                tl.store(f0_ptr + d64 * fs0 + offs_d, _to_e4m3(tl.minimum(tl.maximum(xb * inv, -448.0), 448.0)),
                         mask=dm)
                tl.store(f1_ptr + d64, ((ce + 127) << 23).to(tl.float32, bitcast=True))
            elif FP8_OUT == 2:
                xb = tl.reshape(tl.where(dm, y.to(tl.bfloat16).to(tl.float32), 0.0), [1, BLOCK_D])
                _kv_tile_store(xb, tl.full([1], 1, tl.int1), dst.to(tl.int64) + tl.zeros([1], tl.int64), f0_ptr,
                               f1_ptr, f2_ptr, fs0, fs1, fs2, HD, NOPE, BLOCK_D, 1)
            else:
                er = dst if POOL_OUT else pid
                tl.store(ent_ptr + er * HD + offs_d, y.to(ent_ptr.dtype.element_ty), mask=dm)
        else:
            NCB: tl.constexpr = (2 * CD + BLOCK_C - 1) // BLOCK_C
            tile = pid - E
            t = (tile // NCB) * BLOCK_T + tl.arange(0, BLOCK_T)
            col = (tile % NCB) * BLOCK_C + tl.arange(0, BLOCK_C)
            tm = t < T
            m2 = tm[:, None] & (col < 2 * CD)[None, :]
            x = tl.load(kvz_ptr + t[:, None].to(tl.int64) * s_kvz + col[None, :], mask=m2, other=0.0)
            pt = tl.load(p_ptr + t, mask=tm, other=0)
            a = tl.load(ape_ptr + (pt % M)[:, None] * CD + (col - CD)[None, :], mask=m2 & (col >= CD)[None, :],
                        other=0.0)
            if RING_OUT:
                rr = tl.load(rrow_ptr + t, mask=tm, other=0).to(tl.int64)
            else:
                rr = t.to(tl.int64)
            tl.store(rows_ptr + rr[:, None] * (2 * CD) + col[None, :], x.to(tl.float32) + a, mask=m2)


def compress_fused(kvz: torch.Tensor, ape: torch.Tensor, ring: torch.Tensor, norm_w: torch.Tensor, et: torch.Tensor,
                   p: torch.Tensor, chunk_start: torch.Tensor, tok_slot: torch.Tensor, bt_tok: torch.Tensor,
                   cos_t: torch.Tensor, sin_t: torch.Tensor, m: int, ring_len: int, overlap: bool, eps: float,
                   dest_base: int, dummy_block: int, epb: int, block_s: int | None = None,
                   ring_rows: torch.Tensor | None = None, pool: torch.Tensor | None = None,
                   fp8_pool: tuple[torch.Tensor, ...] | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The Triton kernel (see the module docstring); block_s overrides the slots pooled per step (tests).

    ring_rows [T] int64: the state rows are written to ring[ring_rows] in the same launch and rows comes back None;
    only when no candidate reads a ring row another token of the step writes (one token per sequence). pool [N, hd]
    (kvz's dtype): the entries are written to pool[dest] and ent comes back None. fp8_pool (bf16 kvz): the parts of
    an fp8 pool, (keys [N, hd] e4m3, scale [N] fp32) or (nope [N, dn] e4m3, exp [N, g] uint8, rope [N, hd - dn]
    bf16): the entries quantized into rows dest as fp8.store_key_rows / store_kv_rows would (same bits), ent None."""
    assert triton is not None, "compress_fused needs triton"
    t, cd2 = kvz.shape
    cd = cd2 // 2
    hd = cd // 2 if overlap else cd
    half = cos_t.shape[1]
    e = et.shape[0]
    assert kvz.stride(1) == 1 and ring.is_contiguous() and ring.shape[1] == cd2, (kvz.stride(), ring.shape)
    assert ape.shape == (m, cd) and ape.dtype == ring.dtype == torch.float32 and ape.is_contiguous()
    assert norm_w.shape == (hd,) and 2 * half <= hd and cos_t.stride(1) == sin_t.stride(1) == 1
    assert cos_t.stride(0) == sin_t.stride(0) and cos_t.dtype == sin_t.dtype == torch.float32
    assert pool is None or (pool.shape[1] == hd and pool.dtype == kvz.dtype and pool.is_contiguous())
    assert ring_rows is None or ring_rows.shape == (t,)
    fk = fp8_args(fp8_pool, hd, kvz.dtype, pool)
    rows = torch.empty(t, cd2, dtype=torch.float32, device=kvz.device) if ring_rows is None else None
    ent = torch.empty(e, hd, dtype=kvz.dtype, device=kvz.device) if pool is None and fp8_pool is None else None
    dst = torch.empty(e, dtype=torch.int64, device=kvz.device)
    if t == 0:
        dst.fill_(dest_base + dummy_block * epb)
        if pool is not None:
            pool.index_fill_(0, dst, 0)
        assert fp8_pool is None, "fp8_pool with an empty chunk"
        return rows, None if ent is None else ent.zero_(), dst
    ns = 2 * m if overlap else m
    block_d = triton.next_power_of_2(hd)
    bs = block_s or max(1, min(triton.next_power_of_2(ns), 8192 // block_d))
    block_t = min(16, triton.next_power_of_2(t))
    block_c = min(triton.next_power_of_2(cd2), 4096 // block_t)
    grid = (e + triton.cdiv(t, block_t) * triton.cdiv(cd2, block_c),)
    bt = bt_tok if bt_tok.stride(1) == 1 else bt_tok.contiguous()
    _compress_kernel[grid](
        kvz, ape, ring, norm_w.float().contiguous(), et.contiguous(), p.contiguous(), chunk_start.contiguous(),
        tok_slot.contiguous(), bt, cos_t, sin_t, ring if rows is None else rows, ent if ent is not None else
        pool if pool is not None else dst, dst,
        dst if ring_rows is None else ring_rows.contiguous(), e, t, kvz.stride(0), bt.stride(0),
        cos_t.stride(0), eps, dest_base, dummy_block, epb, ring_len, CD=cd, HD=hd, BLOCK_D=block_d, HALF=half, M=m,
        OVERLAP=overlap, BLOCK_S=bs, BLOCK_T=block_t, BLOCK_C=block_c, RING_OUT=ring_rows is not None,
        POOL_OUT=ent is None, **fk, num_warps=8 if block_d >= 512 else 4, **pdl.launch(kvz.device))
    return rows, ent, dst


def fp8_fits(parts: tuple[torch.Tensor, ...]) -> bool:
    """Whether compress_fused's fp8_pool takes an fp8 pool of these parts (its entries' width a power of two)."""
    hd = parts[0].shape[1] + (parts[2].shape[1] if len(parts) == 3 else 0)
    return hd & (hd - 1) == 0 and (len(parts) == 2 or hd >= 64)


def fp8_args(fp8_pool: tuple[torch.Tensor, ...] | None, hd: int, dtype: torch.dtype,
             pool: torch.Tensor | None) -> dict:
    """The kernel's FP8_OUT keywords for fp8_pool's parts (see compress_fused), checked; {} for None."""
    if fp8_pool is None:
        return {}
    assert pool is None and dtype == torch.bfloat16 and fp8_fits(fp8_pool), "fp8_pool: bf16 kvz, no pool beside"
    if len(fp8_pool) == 2:
        keys, scale = fp8_pool
        assert keys.shape[1] == hd and keys.stride(1) == 1 and scale.is_contiguous()
        return dict(f0_ptr=keys.view(torch.uint8), f1_ptr=scale, fs0=keys.stride(0), FP8_OUT=1)
    nope, exp, rope = fp8_pool
    dn = nope.shape[1]
    assert dn + rope.shape[1] == hd and exp.shape[1] * 64 >= dn
    assert nope.stride(1) == exp.stride(1) == rope.stride(1) == 1
    return dict(f0_ptr=nope.view(torch.uint8), f1_ptr=exp, f2_ptr=rope, fs0=nope.stride(0), fs1=exp.stride(0),
                fs2=rope.stride(0), FP8_OUT=2, NOPE=dn)
