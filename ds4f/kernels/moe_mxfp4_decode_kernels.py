"""⑥ kernels, MXFP4 routed MoE at decode sizes, the Triton side (imported only where triton is): the nibble decode
routines, the up (`_dec_up`) and down (`_dec_down`) programs and their shared pieces (scales, arrival sums, pick
sum). ds4f/kernels/moe_mxfp4_decode.py holds their launches, tiles and contracts, and re-exports them."""

from __future__ import annotations

import triton
import triton.language as tl

from ds4f.kernels.moe_mxfp4_kernels import _act_bf16, _nibble_bits
from ds4f.kernels.pdl import enter as pdl_enter

# Two K-adjacent 16-bit words of packed nibbles ($1: word 0 in bits 0..15, word 1 in 16..31; one K pair of the MMA
# operand layout) -> nibble R of each word as an exact bf16 pair ($0, no scale): (a shift by 8 for R >= 2 and) a mask
# leave nibble R at bits 0..3 / 4..7 of both lanes, one multiply by 0x1040 / 0x104 copies each nibble s|e1 e0|m to
# bit 15 and bits 8..6, the mask keeps bf16 bits 15 | 8 7 | 6 (= value * 2^-126; code 1 is the subnormal 2^-127)
# and one bf16x2 multiply by 2^126 makes it the value: 4-5 instructions per two values. One input, one output:
# Triton hoists the MMA-operand layout conversion above it to the load, so the packed words go from shared memory
# straight into the operand layout (no 16-bit tile round trip through shared memory).
_NIB = ("{{\n.reg .b32 t, big, nz;\nmov.b32 big, 0x7E807E80;\nmov.b32 nz, 0x80008000;\n{shift}"
        "and.b32 t, {src}, {mask};\nmul.lo.u32 t, t, {mul};\nand.b32 t, t, 0x81C081C0;\n"
        "fma.rn.bf16x2 $0, t, big, nz;\n}}\n")
_NIB_ASM = tuple(_NIB.format(shift="shr.b32 t, $1, 8;\n" if r >= 2 else "", src="t" if r >= 2 else "$1",
                             mask=("0x000F000F", "0x00F000F0")[r % 2], mul=("0x1040", "0x104")[r % 2])
                 for r in range(4))
# SUB: the same without the multiply: value * 2^-126 (bf16 subnormals for codes 0.5 / -0.5) goes into the MMA
# against x * 2^100 (exact for |x| < 2^27), the scale factors times 2^26 (UE8M0 scales <= 228). One instruction
# fewer per two values, exact only if the tensor cores take bf16 subnormal inputs: the GPU tests check it
# (test_decode_sub_variant_matches_reference passed on H200). Default on sm_90 only (verified there); elsewhere the
# multiply stays unless DS4F_MXFP4_DEC_SUB=1; =0 turns it off. H200, 12-layer TP=2 rank step with DS4F_KV_FUSED=1
# (bench/results/full.jsonl, session 11): replay 1.548 vs 1.565 ms at one token, 2.198 vs 2.258 at four.
_SUB_ASM = tuple(a.replace("fma.rn.bf16x2 $0, t, big, nz;", "mov.b32 $0, t;") for a in _NIB_ASM)

_N0, _N1, _N2, _N3 = (tl.constexpr(a) for a in _NIB_ASM)
_S0, _S1, _S2, _S3 = (tl.constexpr(a) for a in _SUB_ASM)


@triton.jit
def _nibbles(q, R: tl.constexpr, ASM: tl.constexpr, SUB: tl.constexpr):
    # q [BN, KW] int16 words of 4 nibbles (columns 4w..4w+3) -> nibble R of each as exact bf16 [BN, KW]
    # (SUB: times 2^-126)
    if ASM:
        if SUB:
            v = tl.inline_asm_elementwise(_S0 if R == 0 else _S1 if R == 1 else _S2 if R == 2 else _S3, "=r,r",
                                          [q], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            v = tl.inline_asm_elementwise(_N0 if R == 0 else _N1 if R == 1 else _N2 if R == 2 else _N3, "=r,r",
                                          [q], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        c = (q.to(tl.int32) >> (4 * R)) & 15
        v = _nibble_bits(c, tl.full(c.shape, 127, tl.int32))
        if SUB:  # 2^-126, exact (0.5 -> an fp32 subnormal); left fp32: the interpreter flushes bf16 subnormals
            v = v.to(tl.float32) * 1.1754943508222875e-38
    return v

@triton.jit
def _mm(a, b, acc, F32: tl.constexpr):
    if F32:  # the interpreter (Triton 3.6) multiplies bf16 dot operands as their uint16 bit patterns
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a.to(b.dtype), b, acc)

@triton.jit
def _gdot(q, b0, b1, b2, b3, ASM: tl.constexpr, SUB: tl.constexpr, F32: tl.constexpr):
    # [BN, KW] words . (B of column residue r mod 4) [KW, 16] -> [BN, 16] fp32 partials per scale group
    acc = _mm(_nibbles(q, 0, ASM, SUB), b0, tl.zeros([q.shape[0], 16], tl.float32), F32)
    acc = _mm(_nibbles(q, 1, ASM, SUB), b1, acc, F32)
    acc = _mm(_nibbles(q, 2, ASM, SUB), b2, acc, F32)
    return _mm(_nibbles(q, 3, ASM, SUB), b3, acc, F32)

@triton.jit
def _group_b(xp, KW: tl.constexpr, SUB: tl.constexpr):
    # x's BLOCK_K = 4*KW values at xp -> B_r [KW, 16] bf16, r = column mod 4: B_r[w, j] = x[4w + r] if the
    # column's scale group (w // 8) is j, else 0
    xv = tl.load(xp + tl.arange(0, 4 * KW))
    if SUB:  # 2^100: exact (the weights come in times 2^-126)
        xv = (xv.to(tl.float32) * 1.2676506002282294e30).to(tl.bfloat16)
    x4 = tl.reshape(xv, [KW, 2, 2])  # (w, r // 2, r % 2)
    xa, xb = tl.split(x4)
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    # built as B_r^T [16, KW] (each thread's values contiguous along KW: wide shared-memory stores), fed
    # transposed
    sel = tl.arange(0, 16)[:, None] == (tl.arange(0, KW) // 8)[None, :]
    return (tl.trans(tl.where(sel, x0[None, :], 0.0).to(tl.bfloat16)),
            tl.trans(tl.where(sel, x1[None, :], 0.0).to(tl.bfloat16)),
            tl.trans(tl.where(sel, x2[None, :], 0.0).to(tl.bfloat16)),
            tl.trans(tl.where(sel, x3[None, :], 0.0).to(tl.bfloat16)))

@triton.jit
def _scales(sp, NG: tl.constexpr, live, SUB: tl.constexpr):
    # [BN, 16] UE8M0 bytes (groups >= NG, or all when not live, masked) -> 2^(s-127) fp32 (0 where masked);
    # SUB: 2^(s-101), the 2^26 the SUB decode owes (2^-126 weights against x * 2^100; needs s <= 228)
    s = tl.load(sp, mask=(tl.arange(0, 16)[None, :] < NG) & live, other=0).to(tl.int32)
    if SUB:
        s = tl.where(s > 0, s + 26, 0)
    return (s << 23).to(tl.float32, bitcast=True)

@triton.jit
def _round_bf16(v, F32: tl.constexpr):
    if F32:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand, as the GPU does
        b = v.to(tl.int32, bitcast=True)
        v = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16)

@triton.jit
def _up_arrive(pp, a_ptr, lock_ptr, limit, s_at, pid_m, pid_n, rn, I: tl.constexpr, SPLIT: tl.constexpr,
               N: tl.constexpr, F32: tl.constexpr):
    # after this program stored its partial(s) into the tile's [SPLIT, 2, I] rows at pp: the last of the tile's N
    # programs to arrive sums the gate / up partials in slice order and stores the SwiGLU row a[m, rn] (bf16)
    tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
    cnt = tl.atomic_add(lock_ptr + pid_m * tl.num_programs(1) + pid_n, 1, sem="acq_rel", scope="gpu")
    if cnt == N - 1:
        g = tl.zeros(rn.shape, tl.float32)
        u = tl.zeros(rn.shape, tl.float32)
        for s in range(0, SPLIT):  # fixed order: the sum does not depend on arrival order
            g += tl.load(pp + s * (2 * I), cache_modifier=".cg")
            u += tl.load(pp + s * (2 * I) + I, cache_modifier=".cg")
        tl.store(a_ptr + pid_m.to(tl.int64) * s_at + rn, _act_bf16(g, u, limit, F32))
        tl.store(lock_ptr + pid_m * tl.num_programs(1) + pid_n, 0)  # re-armed for the next call

@triton.jit
def _up_finish(g, u, a_ptr, part_ptr, lock_ptr, limit, s_at, pid_m, pid_n, pid_s, rn, I: tl.constexpr,
               SPLIT: tl.constexpr, F32: tl.constexpr):
    # gate / up sums g, u [BLOCK_N] fp32 of (pick m, tile n, K slice s) -> the SwiGLU row a[m, rn] (bf16); with
    # SPLIT > 1 the partials [M, SPLIT, 2, I] fp32 are summed in slice order by the tile's last program to arrive
    if SPLIT > 1:
        pp = part_ptr + pid_m.to(tl.int64) * (SPLIT * 2 * I) + rn
        tl.store(pp + pid_s * (2 * I), g)
        tl.store(pp + pid_s * (2 * I) + I, u)
        _up_arrive(pp, a_ptr, lock_ptr, limit, s_at, pid_m, pid_n, rn, I, SPLIT, SPLIT, F32)
    else:
        tl.store(a_ptr + pid_m.to(tl.int64) * s_at + rn, _act_bf16(g, u, limit, F32))

@triton.jit
def _store_out(p, v, F32: tl.constexpr, OUT_F32: tl.constexpr):
    # down's output row: fp32 as summed (OUT_F32: the caller adds the shared expert's output and rounds), else
    # rounded to bf16
    if OUT_F32:
        tl.store(p, v)
    else:
        tl.store(p, _round_bf16(v, F32))

@triton.jit
def _down_finish(y, sh_ptr, out_ptr, part_ptr, lock_ptr, s_sht, s_ot, t, pid_tn, pid_js, rn, DM: tl.constexpr,
                 TOPK: tl.constexpr, SPLIT: tl.constexpr, HAS_SH: tl.constexpr, F32: tl.constexpr,
                 OUT_F32: tl.constexpr = False):
    # a weighted pick partial y [BLOCK_N] fp32 of (token t, tile, (pick, K slice) pid_js) -> partials [T, k * SPLIT,
    # DM] fp32; the last of the tile's k * SPLIT programs to arrive sums them in order, adds the shared expert's
    # output and stores out[t, rn] (bf16; OUT_F32: the fp32 sum, out fp32)
    if TOPK * SPLIT == 1:  # one program per tile (moe_mxfp4_a8's PPP = k): nothing to wait for
        if HAS_SH:
            y += tl.load(sh_ptr + t.to(tl.int64) * s_sht + rn).to(tl.float32)
        _store_out(out_ptr + t.to(tl.int64) * s_ot + rn, y, F32, OUT_F32)
    else:
        pp = part_ptr + t.to(tl.int64) * (TOPK * SPLIT * DM) + rn
        tl.store(pp + pid_js * DM, y)
        tl.debug_barrier()
        cnt = tl.atomic_add(lock_ptr + pid_tn, 1, sem="acq_rel", scope="gpu")
        if cnt == TOPK * SPLIT - 1:
            tot = tl.zeros(y.shape, tl.float32)
            for js in range(0, TOPK * SPLIT):
                tot += tl.load(pp + js * DM, cache_modifier=".cg")
            if HAS_SH:
                tot += tl.load(sh_ptr + t.to(tl.int64) * s_sht + rn).to(tl.float32)
            _store_out(out_ptr + t.to(tl.int64) * s_ot + rn, tot, F32, OUT_F32)
            tl.store(lock_ptr + pid_tn, 0)

@triton.jit
def _up_program(ids_ptr, DM: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    # the up kernels' program (pick m, row tile n of BLOCK_N gate rows, K slice s) -> (m, n, s, m's expert e
    # (int64), the rows rn, rn as an int64 column r64, the slice's first column k0); after pdl_enter (the ids
    # come from the router)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return (pid_m, pid_n, pid_s, tl.load(ids_ptr + pid_m).to(tl.int64), rn, rn.to(tl.int64)[:, None],
            pid_s * (DM // SPLIT))

@triton.jit
def _up_setup(q_ptr, s_ptr, x_ptr, e, r64, k0, pid_m, s_qe, s_qn, s_se, s_sn, s_xt, I: tl.constexpr,
              TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER: tl.constexpr, SUB: tl.constexpr):
    # the up programs' K-loop prologue (PER weight columns per loaded element: 4 in int16 words, 2 in bytes) ->
    # (weight pointers [BLOCK_N, BLOCK_K / PER], scale pointers [BLOCK_N, 16], x at the slice, zeroed gate / up
    # accumulators [BLOCK_N, 16], the first step's gate / up scales). The scales feed no dot, so Triton's pipeliner
    # leaves their loads in the loop: the kernels fetch them a step ahead by hand, starting here
    qg = q_ptr + e * s_qe + r64 * s_qn + k0 // PER + tl.arange(0, BLOCK_K // PER)[None, :]
    sg = s_ptr + e * s_se + r64 * s_sn + k0 // 32 + tl.arange(0, 16)[None, :]
    xp = x_ptr + (pid_m // TOPK).to(tl.int64) * s_xt + k0
    NG: tl.constexpr = BLOCK_K // 32
    return (qg, sg, xp, tl.zeros([BLOCK_N, 16], tl.float32), tl.zeros([BLOCK_N, 16], tl.float32),
            _scales(sg, NG, True, SUB), _scales(sg + I * s_sn, NG, True, SUB))

@triton.jit
def _down_program(ids_ptr, DM: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT: tl.constexpr):
    # the down kernels' program ((token t, BLOCK_N rows of D), (pick j, K slice)) with one pick per program ->
    # (tile id, (pick, slice) id, t, the rows rn, the pick m, the slice's first column k0, m's expert e (int64),
    # rn as an int64 column r64); after pdl_enter
    pid_tn = tl.program_id(0)
    pid_js = tl.program_id(1)
    t = pid_tn // (DM // BLOCK_N)
    rn = (pid_tn % (DM // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = t * TOPK + pid_js // SPLIT
    return (pid_tn, pid_js, t, rn, m, (pid_js % SPLIT) * (I // SPLIT), tl.load(ids_ptr + m).to(tl.int64),
            rn.to(tl.int64)[:, None])

@triton.jit
def _dec_up(
    x_ptr, q_ptr, s_ptr, ids_ptr, a_ptr, part_ptr, lock_ptr, limit, s_xt, s_qe, s_qn, s_se, s_sn, s_at,
    I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, ASM: tl.constexpr, SUB: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr = False,
):
    # program (pick m, gate rows [n0, n0 + BLOCK_N) and the same up rows, K slice pid_s); I % BLOCK_N == 0,
    # DM % (SPLIT * BLOCK_K) == 0, BLOCK_K <= 512
    pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
    pid_m, pid_n, pid_s, e, rn, r64, k0 = _up_program(ids_ptr, DM, BLOCK_N, SPLIT)
    KW: tl.constexpr = BLOCK_K // 4
    K_PER: tl.constexpr = DM // SPLIT
    qg, sg, xp, acc_g, acc_u, fg_n, fu_n = _up_setup(q_ptr, s_ptr, x_ptr, e, r64, k0, pid_m, s_qe, s_qn, s_se, s_sn,
                                                     s_xt, I, TOPK, BLOCK_N, BLOCK_K, 4, SUB)
    NS: tl.constexpr = K_PER // BLOCK_K
    NG: tl.constexpr = BLOCK_K // 32
    for kb in range(0, NS):  # offsets as kb * constant keep the 16-byte alignment visible
        fg = fg_n
        fu = fu_n
        fg_n = _scales(sg + (kb + 1) * NG, NG, kb + 1 < NS, SUB)
        fu_n = _scales(sg + I * s_sn + (kb + 1) * NG, NG, kb + 1 < NS, SUB)
        b0, b1, b2, b3 = _group_b(xp + kb * BLOCK_K, KW, SUB)
        wg = tl.load(qg + kb * KW)
        wu = tl.load(qg + I * s_qn + kb * KW)
        acc_g += _gdot(wg, b0, b1, b2, b3, ASM, SUB, F32) * fg
        acc_u += _gdot(wu, b0, b1, b2, b3, ASM, SUB, F32) * fu
    _up_finish(tl.sum(acc_g, 1), tl.sum(acc_u, 1), a_ptr, part_ptr, lock_ptr, limit, s_at, pid_m, pid_n, pid_s, rn,
               I, SPLIT, F32)

@triton.jit
def _dec_down(
    a_ptr, q_ptr, s_ptr, ids_ptr, tw_ptr, sh_ptr, out_ptr, part_ptr, lock_ptr, s_at, s_qe, s_qn, s_se, s_sn,
    s_sht, s_ot, DM: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, HAS_SH: tl.constexpr, ASM: tl.constexpr, SUB: tl.constexpr,
    F32: tl.constexpr, PDL: tl.constexpr = False,
):
    # program ((token t, rows [n0, n0 + BLOCK_N) of D), (pick j, K slice)); DM % BLOCK_N == 0,
    # I % (SPLIT * BLOCK_K) == 0
    pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
    pid_tn, pid_js, t, rn, m, k0, e, r64 = _down_program(ids_ptr, DM, I, TOPK, BLOCK_N, SPLIT)
    KW: tl.constexpr = BLOCK_K // 4
    K_PER: tl.constexpr = I // SPLIT
    qd = q_ptr + e * s_qe + r64 * s_qn + k0 // 4 + tl.arange(0, KW)[None, :]
    sd = s_ptr + e * s_se + r64 * s_sn + k0 // 32 + tl.arange(0, 16)[None, :]
    ap = a_ptr + m.to(tl.int64) * s_at + k0
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    NS: tl.constexpr = K_PER // BLOCK_K
    NG: tl.constexpr = BLOCK_K // 32
    fd_n = _scales(sd, NG, True, SUB)
    for kb in range(0, NS):
        fd = fd_n
        fd_n = _scales(sd + (kb + 1) * NG, NG, kb + 1 < NS, SUB)  # a step ahead (see _dec_up)
        b0, b1, b2, b3 = _group_b(ap + kb * BLOCK_K, KW, SUB)
        wd = tl.load(qd + kb * KW)
        acc += _gdot(wd, b0, b1, b2, b3, ASM, SUB, F32) * fd
    _down_finish(tl.sum(acc, 1) * tl.load(tw_ptr + m), sh_ptr, out_ptr, part_ptr, lock_ptr, s_sht, s_ot, t, pid_tn,
                 pid_js, rn, DM, TOPK, SPLIT, HAS_SH, F32)
