"""⑥ kernels, sparse MQA attention, the Triton side: q [T, H, D] + a flat KV slot pool (bf16, e4m3 + fp32 group scales,
or fp8_ds_mla split rows) + per-token slot lists in; o [T, H, D] bf16 out (optionally with the inverse RoPE of its last
rope channels applied as it is stored), or per-split fp32 partials that _attn_combine (or the last-arriving program,
FUSE) merges into o. Imported only where triton is; the wrapper, its launch choices and its torch fallback are in
ds4f/kernels/sparse_attn.py (which re-exports _attn_fwd, _attn_combine and _kv_row_tile)."""

from __future__ import annotations

import triton
import triton.language as tl

from ds4f.kernels.pdl import enter as pdl_enter
from ds4f.kernels.rope_tile import inv_rope_tile, norm_rope_tile


@triton.jit
def _nope_f32(kv_ptr, exp_ptr, ridx, valid, offs_d, s_kvn, s_en, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              NOPE: tl.constexpr, NATIVE_FP8: tl.constexpr):
    # fp8_ds_mla rows' e4m3 columns -> [BLOCK_K, BLOCK_D] fp32 (exact): e4m3 bits (uint8) * 2^(exp - 127), one
    # exponent byte per 64 columns; 0 at columns >= NOPE
    nm = offs_d < NOPE
    x = tl.load(kv_ptr + ridx[:, None] * s_kvn + offs_d[None, :], mask=valid[:, None] & nm[None, :], other=0)
    if NATIVE_FP8:  # sm_89+: hardware e4m3 convert
        xf = x.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        bias = 127.0
    else:  # any arch: e4m3 bits -> fp16 bits (exponent bias 7 -> 15, so the value is 2^-8 of the e4m3 one)
        h = x.to(tl.uint16)
        xf = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32)
        bias = 119.0
    NGB: tl.constexpr = BLOCK_D // 64
    if NGB == 1:
        e = tl.load(exp_ptr + ridx * s_en, mask=valid, other=0)
        xf = xf * tl.exp2(e.to(tl.float32) - bias)[:, None]
    else:
        offs_g = tl.arange(0, NGB)
        e = tl.load(exp_ptr + ridx[:, None] * s_en + offs_g[None, :],
                    mask=valid[:, None] & (offs_g * 64 < NOPE)[None, :], other=0)
        sc = tl.exp2(e.to(tl.float32) - bias)
        xf = xf * tl.reshape(tl.broadcast_to(sc[:, :, None], [BLOCK_K, NGB, 64]), [BLOCK_K, BLOCK_D])
    return xf


@triton.jit
def _kv_row_tile(kv_ptr, exp_ptr, rope_ptr, ridx, valid, offs_d, dmask, s_kvn, s_en, s_rn,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, NOPE: tl.constexpr, NATIVE_FP8: tl.constexpr):
    # NOPE == 0: plain rows [BLOCK_K, BLOCK_D] as stored (bf16, or e4m3 that the caller scales). Else fp8_ds_mla
    # rows -> bf16 (exact): columns < NOPE from _nope_f32, columns >= NOPE from the bf16 rope rows
    if NOPE == 0:
        out = tl.load(kv_ptr + ridx[:, None] * s_kvn + offs_d[None, :], mask=valid[:, None] & dmask[None, :],
                      other=0.0)
    else:
        nm = offs_d < NOPE
        xf = _nope_f32(kv_ptr, exp_ptr, ridx, valid, offs_d, s_kvn, s_en, BLOCK_K, BLOCK_D, NOPE, NATIVE_FP8)
        r = tl.load(rope_ptr + ridx[:, None] * s_rn + (offs_d - NOPE)[None, :],
                    mask=valid[:, None] & (~nm & dmask)[None, :], other=0.0)
        out = tl.where(nm[None, :], xf, r.to(tl.float32)).to(tl.bfloat16)
    return out


@triton.jit
def _col_group(x, g, BH: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    # x [BH, G * R] -> its columns [g * R, (g + 1) * R) as [BH, R] (exact: one nonzero term per sum)
    sel = (tl.arange(0, G) == g)[None, :, None]
    return tl.sum(tl.where(sel, tl.reshape(x, [BH, G, R]), 0.0), axis=1).to(x.dtype)


@triton.jit
def _put_group(x, y, g, BH: tl.constexpr, G: tl.constexpr, R: tl.constexpr):
    # x [BH, G * R] with columns [g * R, (g + 1) * R) replaced by y [BH, R]
    sel = (tl.arange(0, G) == g)[None, :, None]
    return tl.reshape(tl.where(sel, y[:, None, :], tl.reshape(x, [BH, G, R])), [BH, G * R])


@triton.jit
def _key_block_rs(q, q_r, kv_ptr, exp_ptr, rope_ptr, idx, m, l, acc, acc_r, offs_d, s_kvn, s_en, s_rn, qk_scale,
                  BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, NOPE: tl.constexpr, RD: tl.constexpr,
                  NATIVE_FP8: tl.constexpr, go):
    # RSPLIT (fp8_ds_mla rows): _key_block with the rope columns as a tile of their own, [BLOCK_K, RD] (RD = D -
    # NOPE), against q's rope columns q_r [BLOCK_H, RD]: logits = q . nope^T + q_r . rope^T, acc += p . nope (0 at
    # columns >= NOPE), acc_r += p . rope. The rope rows are loaded at their width, not as a [BLOCK_K, BLOCK_D] tile
    # masked to RD columns, so a pipelined stage holds BLOCK_K * (NOPE-wide bytes + 2 RD) instead of 3 BLOCK_D
    if go:
        valid = idx >= 0
        ridx = idx.to(tl.int64)
        rows = _nope_f32(kv_ptr, exp_ptr, ridx, valid, offs_d, s_kvn, s_en, BLOCK_K, BLOCK_D, NOPE,
                         NATIVE_FP8).to(tl.bfloat16)
        r = tl.load(rope_ptr + ridx[:, None] * s_rn + tl.arange(0, RD)[None, :], mask=valid[:, None], other=0.0)
        s = (tl.dot(q, tl.trans(rows)) + tl.dot(q_r, tl.trans(r))) * qk_scale  # [BLOCK_H, BLOCK_K]
        m, l, alpha, p = _softmax_step(s, valid, m, l)
        pb = p.to(tl.bfloat16)
        acc = acc * alpha[:, None] + tl.dot(pb, rows)
        acc_r = acc_r * alpha[:, None] + tl.dot(pb, r)
    return m, l, acc, acc_r


@triton.jit
def _key_block(q, kv_ptr, kvs_ptr, rope_ptr, idx, m, l, acc, offs_d, dmask, s_kvn, s_kvsn, s_rn, qk_scale,
               BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, SCALE_BCAST: tl.constexpr,
               NOPE: tl.constexpr, NATIVE_FP8: tl.constexpr, go):
    # one key block (idx [BLOCK_K], -1 = none) into the online softmax's running (m, l, acc); go False (SKIP,
    # a block of -1 only): unchanged
    if go:
        valid = idx >= 0
        rows = _kv_row_tile(kv_ptr, kvs_ptr, rope_ptr, idx.to(tl.int64), valid, offs_d, dmask,
                            s_kvn, s_kvsn, s_rn, BLOCK_K, BLOCK_D, NOPE, NATIVE_FP8)
        # fp8 rows dequantize exactly to bf16 (power-of-two scales); through fp32, which measured faster than
        # Triton 3.6's direct e4m3 -> bf16 / fp16 converts on H200
        if NG == 1:
            # one scale per row: it goes on the logits and on p instead of on the tile
            sc = tl.load(kvs_ptr + idx.to(tl.int64), mask=valid, other=0.0)
            rows = rows.to(tl.float32).to(tl.bfloat16)
            s = tl.dot(q, tl.trans(rows)) * (sc * qk_scale)[None, :]
        else:
            if NG > 1:
                # scales per group of BLOCK_D // NG columns
                sc = tl.load(kvs_ptr + idx.to(tl.int64)[:, None] * NG + tl.arange(0, NG)[None, :],
                             mask=valid[:, None], other=0.0)
                if SCALE_BCAST:  # widen the scales to the tile's shape; the data keeps its layout
                    sc = tl.reshape(tl.broadcast_to(sc[:, :, None], [BLOCK_K, NG, BLOCK_D // NG]),
                                    [BLOCK_K, BLOCK_D])
                    rows = (rows.to(tl.float32) * sc).to(tl.bfloat16)
                else:
                    rows = tl.reshape(rows.to(tl.float32), [BLOCK_K, NG, BLOCK_D // NG]) * sc[:, :, None]
                    rows = tl.reshape(rows, [BLOCK_K, BLOCK_D]).to(tl.bfloat16)
            s = tl.dot(q, tl.trans(rows)) * qk_scale  # [BLOCK_H, BLOCK_K]
        m, l, alpha, p = _softmax_step(s, valid, m, l)
        if NG == 1:
            p = p * sc[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), rows)
    return m, l, acc


@triton.jit
def _softmax_step(s, valid, m, l):
    # logits s [BLOCK_H, BLOCK_K] (log2 units; keys not valid masked here) into the running max m and denominator
    # l -> (m, l, alpha = the factor the accumulators take, p = the block's unnormalized weights)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l * alpha + tl.sum(p, 1), alpha, p

@triton.jit
def _attn_fwd(
    q_ptr, kv_ptr, kvs_ptr, rope_ptr, idx_ptr, sink_ptr, o_ptr, po_ptr, pm_ptr, live_ptr, cos_ptr, sin_ptr,
    cnt_ptr, H, K, keys_per_split, qk_scale,
    s_qt, s_qh, s_kvn, s_kvsn, s_rn, s_it, s_ot, s_oh, s_cs, q_eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    NG: tl.constexpr, SPLIT: tl.constexpr, SCALE_BCAST: tl.constexpr,
    NOPE: tl.constexpr, NATIVE_FP8: tl.constexpr, LIVE: tl.constexpr, HALF: tl.constexpr,
    DYN: tl.constexpr = False, FUSE: tl.constexpr = 0, SKIP: tl.constexpr = False, PDL: tl.constexpr = False,
    QNR: tl.constexpr = False, RSPLIT: tl.constexpr = False,
):
    # program = (token t, head block, key split); heads are the M dim so one KV tile feeds BLOCK_H heads (MQA).
    # DYN (with LIVE): the S splits share token t's live keys, ceil(live / S) rounded up to BLOCK_K each (not
    # keys_per_split, which is sized for the capacity K), so a short live count still spreads over programs.
    # FUSE (> 0, a power of two >= S): the last program of (t, head block) to arrive merges the partials (no
    # combine launch); cnt_ptr [T * head blocks] int32 arrival counts, zero between calls (re-armed here).
    # SKIP: a key block whose indices are all -1 skips its loads and math (sparse decode lists).
    # RSPLIT (fp8_ds_mla rows; RD = D - NOPE a power of two dividing NOPE and BLOCK_D): the rope columns as a tile
    # of their own (_key_block_rs), merged into acc after the loop.
    pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
    t = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    hmask = offs_h < H
    dmask = offs_d < D
    lim = K
    if LIVE:  # token t's indices at or past live[t] are all -1: splits past it skip the loop and their partials
        lim = tl.minimum(tl.load(live_ptr + t), K)
    kps = keys_per_split
    if DYN:
        kps = tl.cdiv(tl.cdiv(tl.maximum(lim, 1), tl.num_programs(2)), BLOCK_K) * BLOCK_K
    k_lo = sp * kps
    n_k = kps
    if LIVE:
        n_k = tl.minimum(kps, lim - k_lo)  # <= 0: a split past the live keys does nothing (not even read q)
    if QNR:  # q is the raw projection: its per-head RMSNorm + RoPE here (rope.norm_rope's row code, D == BLOCK_D)
        q, _, _ = norm_rope_tile(q_ptr, q_ptr, cos_ptr, sin_ptr, hmask & (n_k > 0), tl.zeros([BLOCK_H], tl.int64) + t,
                                 t.to(tl.int64) * s_qt + offs_h.to(tl.int64) * s_qh, s_cs, q_eps, 1.0, D, HALF,
                                 BLOCK_D // 2, BLOCK_H, True, False)
    else:
        q = tl.load(q_ptr + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :],
                    mask=hmask[:, None] & dmask[None, :] & (n_k > 0), other=0.0)
    # m is in log2 units; a finite floor keeps exp2(m - m_new) defined while every key so far is masked
    m = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if RSPLIT:
        RD: tl.constexpr = D - NOPE
        G: tl.constexpr = BLOCK_D // RD
        q_r = _col_group(q, NOPE // RD, BLOCK_H, G, RD)
        acc_r = tl.zeros([BLOCK_H, RD], tl.float32)
    for k0 in range(0, n_k, BLOCK_K):  # from 0: Triton 3.6's interpreter rejects a tensor start
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + t * s_it + offs_k, mask=offs_k < lim, other=-1)
        if SKIP:
            go = tl.max(idx, 0) >= 0
        else:
            go = True
        if RSPLIT:
            m, l, acc, acc_r = _key_block_rs(q, q_r, kv_ptr, kvs_ptr, rope_ptr, idx, m, l, acc, acc_r, offs_d, s_kvn,
                                             s_kvsn, s_rn, qk_scale, BLOCK_D, BLOCK_K, NOPE, RD, NATIVE_FP8, go)
        else:
            m, l, acc = _key_block(q, kv_ptr, kvs_ptr, rope_ptr, idx, m, l, acc, offs_d, dmask, s_kvn, s_kvsn,
                                   s_rn, qk_scale, BLOCK_D, BLOCK_K, NG, SCALE_BCAST, NOPE, NATIVE_FP8, go)
    if RSPLIT:
        acc = _put_group(acc, acc_r, NOPE // RD, BLOCK_H, G, RD)
    if SPLIT:
        S = tl.num_programs(2)
        if k_lo < lim:  # the combine reads the partials of the splits below the live bound only
            row = (t * S + sp) * H + offs_h  # partials [T, S, H, (D | 2)]
            tl.store(po_ptr + row.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=hmask[:, None])
            tl.store(pm_ptr + row * 2, m, mask=hmask)
            tl.store(pm_ptr + row * 2 + 1, l, mask=hmask)
        if FUSE > 0:
            tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
            c_ptr = cnt_ptr + t * tl.num_programs(1) + hb
            if tl.atomic_add(c_ptr, 1, sem="acq_rel", scope="gpu") == S - 1:
                # the splits that stored (k_lo < lim): their max and denominator first (sink in the
                # denominator only), then o = sum_j w_j o_j in split order: loads independent of the sum, so the
                # unrolled loop can keep several splits' tiles in flight
                offs_j = tl.arange(0, FUSE)
                n_s = tl.cdiv(lim, kps)
                okj = (offs_j < n_s)[:, None] & hmask[None, :]  # [FUSE, BLOCK_H]
                rowj = (t * S + offs_j)[:, None] * H + offs_h[None, :]
                ms = tl.load(pm_ptr + rowj * 2, mask=okj, other=-1.0e30, cache_modifier=".cg")
                ls = tl.load(pm_ptr + rowj * 2 + 1, mask=okj, other=0.0, cache_modifier=".cg")
                sink = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0) * 1.4426950408889634
                mx = tl.maximum(tl.max(ms, 0), sink)
                den = tl.sum(ls * tl.exp2(ms - mx[None, :]), 0) + tl.exp2(sink - mx)
                acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
                for j in tl.static_range(FUSE):
                    ok = hmask & (j < n_s)
                    row = (t * S + j) * H + offs_h
                    mj = tl.load(pm_ptr + row * 2, mask=ok, other=-1.0e30, cache_modifier=".cg")
                    oj = tl.load(po_ptr + row.to(tl.int64)[:, None] * BLOCK_D + offs_d[None, :],
                                 mask=ok[:, None], other=0.0, cache_modifier=".cg")
                    acc += oj * (tl.exp2(mj - mx) / den)[:, None]
                _store_o(acc, o_ptr, cos_ptr, sin_ptr, t, offs_h, 0, offs_d, hmask, s_ot, s_oh, s_cs, D, HALF,
                         BLOCK_H, BLOCK_D)
                tl.atomic_xchg(c_ptr, 0)  # every program of (t, head block) has counted: re-armed
    else:
        # sink in the denominator only: o = acc·2^(m-M) / (l·2^(m-M) + 2^(sink-M))
        sink = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0) * 1.4426950408889634
        mm = tl.maximum(m, sink)
        a = tl.exp2(m - mm)
        den = l * a + tl.exp2(sink - mm)
        _store_o(acc * (a / den)[:, None], o_ptr, cos_ptr, sin_ptr, t, offs_h, 0, offs_d, hmask, s_ot, s_oh,
                 s_cs, D, HALF, BLOCK_H, BLOCK_D)

@triton.jit
def _store_o(o, o_ptr, cos_ptr, sin_ptr, t, offs_h, d0, offs_c, hmask, s_ot, s_oh, s_cs, D: tl.constexpr,
             HALF: tl.constexpr, BLOCK_H: tl.constexpr, C: tl.constexpr):
    # o [BLOCK_H, C] fp32: columns d0 + offs_c (offs_c = arange(C)) of token t's heads offs_h -> bf16 o rows
    if HALF > 0:  # inverse RoPE of the last 2 * HALF columns (rope_tile: the rounding of rope_ after o)
        ob = inv_rope_tile(o, cos_ptr, sin_ptr, t, s_cs, d0, D, HALF, BLOCK_H, C)
    else:
        ob = o.to(tl.bfloat16)
    tl.store(o_ptr + t * s_ot + offs_h[:, None] * s_oh + (d0 + offs_c)[None, :], ob,
             mask=hmask[:, None] & (d0 + offs_c < D)[None, :])

@triton.jit
def _attn_combine(
    po_ptr, pm_ptr, sink_ptr, o_ptr, live_ptr, cos_ptr, sin_ptr, H, S, K, kps, s_ot, s_oh, s_cs,
    D: tl.constexpr, PD: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_H: tl.constexpr, LIVE: tl.constexpr,
    UNROLL: tl.constexpr, HALF: tl.constexpr, DYN: tl.constexpr = False, BLOCK_K: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    # program = (token, head block, column chunk): merges the S partials [T, S, H, PD] of its tile (LIVE: the
    # first ceil(min(live[t], K) / kps) of them, the splits that saw a key; DYN: kps as _attn_fwd's DYN sizes
    # it), UNROLL splits per iteration: their loads are issued together (a chain of dependent loads UNROLL times
    # shorter) and merged through their max.
    pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
    t = tl.program_id(0)
    n_s = S
    if LIVE:
        lim = tl.minimum(tl.load(live_ptr + t), K)
        if DYN:
            kps = tl.cdiv(tl.cdiv(tl.maximum(lim, 1), S), BLOCK_K) * BLOCK_K
        n_s = tl.cdiv(lim, kps)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    hmask = offs_h < H
    mm = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0) * 1.4426950408889634  # the sink seeds M and L
    den = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DC], tl.float32)
    offs_u = tl.arange(0, UNROLL)
    for s0 in range(0, n_s, UNROLL):
        su = s0 + offs_u
        ok = (su < n_s)[:, None] & hmask[None, :]  # a split past n_s: m = -1e30, l = 0, o = 0 add exactly 0
        row = (t * S + su)[:, None] * H + offs_h[None, :]  # [UNROLL, BLOCK_H]
        ms = tl.load(pm_ptr + row * 2, mask=ok, other=-1.0e30)
        ls = tl.load(pm_ptr + row * 2 + 1, mask=ok, other=0.0)
        os_ = tl.load(po_ptr + row.to(tl.int64)[:, :, None] * PD + offs_d[None, None, :], mask=ok[:, :, None],
                      other=0.0)
        m_new = tl.maximum(mm, tl.max(ms, 0))
        a = tl.exp2(mm - m_new)
        b = tl.exp2(ms - m_new[None, :])
        den = den * a + tl.sum(ls * b, 0)
        acc = acc * a[:, None] + tl.sum(os_ * b[:, :, None], 0)
        mm = m_new
    o = acc / den[:, None]
    if HALF > 0:
        ob = inv_rope_tile(o, cos_ptr, sin_ptr, t, s_cs, tl.program_id(2) * BLOCK_DC, D, HALF, BLOCK_H, BLOCK_DC)
    else:
        ob = o.to(tl.bfloat16)
    tl.store(o_ptr + t * s_ot + offs_h[:, None] * s_oh + offs_d[None, :], ob,
             mask=hmask[:, None] & (offs_d < D)[None, :])
