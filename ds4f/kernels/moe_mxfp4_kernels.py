"""⑥ kernels, moe_mxfp4's Triton programs: the e2m1 -> bf16 decode (PTX and portable forms), the grouped up / down
GEMMs over packed experts (prefill) and the CUDA-core GEMV programs, the SwiGLU rounding shared with the decode
kernels. ds4f/kernels/moe_mxfp4.py holds the configs, the launches and the reference."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: moe_mxfp4 falls back to the reference
    triton = None

# 4 packed bytes ($4) + their 4 bf16 scales 2^(s-127) ($5, $6) -> lo nibbles ($0, $1) and hi nibbles ($2, $3) as bf16.
# prmt spreads bytes 0,1 (2,3) to 16-bit lanes; one multiply by 0x1040 (lo) / 0x104 (hi) copies a nibble s|e1 e0|m
# to bit 15 and bits 8..6 at once, and the mask keeps bf16 bits 15 | 8 7 | 6, which read as value * 2^-126 (code 1
# is the subnormal 2^-127); fma by 2^126 then by the scale. Per 8 values: 2 prmt, 4 and+mul+and, 8 fma (sm_80+).
_E2M1_PAIR = """and.b32 t, {src}, {mask};
mul.lo.u32 t, t, {mul};
and.b32 t, t, 0x81C081C0;
fma.rn.bf16x2 t, t, big, nz;
fma.rn.bf16x2 {dst}, t, {scale}, nz;
"""
_E2M1_ASM = (
    "{\n.reg .b32 z, nz, big, u, v, t;\nmov.b32 z, 0;\nmov.b32 nz, 0x80008000;\nmov.b32 big, 0x7E807E80;\n"
    "prmt.b32 u, $4, z, 0x4140;\nprmt.b32 v, $4, z, 0x4342;\n"
    + "".join(_E2M1_PAIR.format(dst=d, src=r, mask=m, mul=k, scale=f) for d, r, m, k, f in [
        ("$0", "u", "0x000F000F", "0x1040", "$5"), ("$1", "v", "0x000F000F", "0x1040", "$6"),
        ("$2", "u", "0x00F000F0", "0x104", "$5"), ("$3", "v", "0x00F000F0", "0x104", "$6")])
    + "}\n"
)

if triton is not None:
    _E2M1 = tl.constexpr(_E2M1_ASM)

    @triton.jit
    def _nibble_bits(c, s):
        # c [.., 16] int32 codes 0..15, s [.., 1] int32 UE8M0 -> bf16 value * 2^(s-127) through exact fp32 bits
        # (valid for s in [2, 252]: no fp32 subnormal, no overflow)
        m = c & 7
        b = (m << 22) + ((s - 1) << 23) - ((m == 1).to(tl.int32) << 22)
        b = tl.where(m == 0, 0, b) | ((c & 8) << 28)
        return b.to(tl.float32, bitcast=True).to(tl.bfloat16)

    @triton.jit
    def _decode(q, s, ASM: tl.constexpr):
        # q [BN, NG, 16] uint8 (two nibbles each), s [BN, NG, 1] uint8 -> (even, odd columns) [BN, NG, 16] bf16
        if ASM:
            f = (s.to(tl.int32) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 2^(s-127)
            lo, hi = tl.inline_asm_elementwise(
                _E2M1, "=r,=r,=r,=r,r,r,r", [q, tl.broadcast_to(f, q.shape)],
                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
            )
        else:
            c = q.to(tl.int32)
            s32 = s.to(tl.int32)
            lo = _nibble_bits(c & 15, s32)
            hi = _nibble_bits(c >> 4, s32)
        return lo, hi

    @triton.jit
    def _dot(a, b, acc, F32: tl.constexpr):
        # F32: the interpreter (Triton 3.6) multiplies bf16 dot operands as their uint16 bit patterns
        if F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _mac(xa, q, s, acc, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr,
             F32: tl.constexpr):
        # acc [BM, BN] += xa [BM, BK] @ W[BN, BK]^T with W decoded from q / s
        lo, hi = _decode(q, s, ASM)
        if SPLIT:  # two dots over the even / odd columns: no interleave of the decoded tile
            xe, xo = tl.split(tl.reshape(xa, [xa.shape[0], BK // 2, 2]))
            acc = _dot(xe, tl.trans(tl.reshape(lo, [BN, BK // 2])), acc, F32)
            acc = _dot(xo, tl.trans(tl.reshape(hi, [BN, BK // 2])), acc, F32)
        else:
            w = tl.reshape(tl.join(lo, hi), [BN, BK])
            acc = _dot(xa, tl.trans(w), acc, F32)
        return acc

    @triton.jit
    def _act_bf16(acc_g, acc_u, limit, F32: tl.constexpr):
        # V4 SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit), rounded to bf16
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        a = g / (1.0 + tl.exp(-g)) * u
        if F32:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand, as the GPU does
            b = a.to(tl.int32, bitcast=True)
            a = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return a.to(tl.bfloat16)

    @triton.jit
    def _rows(sid_ptr, be_ptr, pid_m, rows, M, BLOCK_M: tl.constexpr, PER_PICK: tl.constexpr):
        # (expert, pick ids [BLOCK_M]) of block pid_m; PER_PICK: block m holds pick m alone (be_ptr = flat topk_ids)
        e = tl.load(be_ptr + pid_m)
        if PER_PICK:
            sid = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, M)
        else:
            sid = tl.load(sid_ptr + rows)
        return e, sid

    @triton.jit
    def _tile_ptrs(q_ptr, s_ptr, e, offs_n, s_qe, s_qn, s_se, s_sn, BK: tl.constexpr):
        # [BN, NG, 16] byte pointers and [BN, NG, 1] scale pointers of K step 0 of rows offs_n of expert e
        g = tl.arange(0, BK // 32)
        j = tl.arange(0, 16)
        n64 = offs_n.to(tl.int64)[:, None, None]
        qp = q_ptr + e.to(tl.int64) * s_qe + n64 * s_qn + g[None, :, None] * 16 + j[None, None, :]
        sp = s_ptr + e.to(tl.int64) * s_se + n64 * s_sn + g[None, :, None]
        return qp, sp

    @triton.jit
    def _up_mx(
        x_ptr, q_ptr, s_ptr, sid_ptr, be_ptr, a_ptr, M, limit, s_xt, s_qe, s_qn, s_se, s_sn, s_at,
        I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PER_PICK: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr,
    ):
        # program = (BLOCK_M sorted rows of one expert, BLOCK_N gate columns and the same up columns); DM % BLOCK_K == 0
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        e, sid = _rows(sid_ptr, be_ptr, pid_m, rows, M, BLOCK_M, PER_PICK)
        if e >= 0:
            rmask = sid < M  # padding rows hold M
            tok = (sid // TOPK).to(tl.int64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < I
            n3 = nmask[:, None, None]
            qg, sg = _tile_ptrs(q_ptr, s_ptr, e, offs_n, s_qe, s_qn, s_se, s_sn, BLOCK_K)
            qu = qg + I * s_qn
            su = sg + I * s_sn
            x_rows = x_ptr + tok[:, None] * s_xt + tl.arange(0, BLOCK_K)[None, :]
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kb in range(0, DM // BLOCK_K):  # offsets as kb * constant keep the 16-byte alignment visible
                xa = tl.load(x_rows + kb * BLOCK_K, mask=rmask[:, None], other=0.0)
                wg = tl.load(qg + kb * (BLOCK_K // 2), mask=n3, other=0)
                sgv = tl.load(sg + kb * (BLOCK_K // 32), mask=n3, other=127)
                wu = tl.load(qu + kb * (BLOCK_K // 2), mask=n3, other=0)
                suv = tl.load(su + kb * (BLOCK_K // 32), mask=n3, other=127)
                acc_g = _mac(xa, wg, sgv, acc_g, BLOCK_N, BLOCK_K, ASM, SPLIT, F32)
                acc_u = _mac(xa, wu, suv, acc_u, BLOCK_N, BLOCK_K, ASM, SPLIT, F32)
            a = _act_bf16(acc_g, acc_u, limit, F32)
            tl.store(a_ptr + rows.to(tl.int64)[:, None] * s_at + offs_n[None, :], a, mask=nmask[None, :])

    @triton.jit
    def _down_mx(
        a_ptr, q_ptr, s_ptr, sid_ptr, be_ptr, tw_ptr, out_ptr, M, s_at, s_qe, s_qn, s_se, s_sn, s_ot,
        DM: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PER_PICK: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        e, sid = _rows(sid_ptr, be_ptr, pid_m, rows, M, BLOCK_M, PER_PICK)
        if e >= 0:
            rmask = sid < M
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < DM
            n3 = nmask[:, None, None]
            qd, sd = _tile_ptrs(q_ptr, s_ptr, e, offs_n, s_qe, s_qn, s_se, s_sn, BLOCK_K)
            a_rows = a_ptr + rows.to(tl.int64)[:, None] * s_at + tl.arange(0, BLOCK_K)[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for kb in range(0, I // BLOCK_K):
                aa = tl.load(a_rows + kb * BLOCK_K)
                wd = tl.load(qd + kb * (BLOCK_K // 2), mask=n3, other=0)
                sdv = tl.load(sd + kb * (BLOCK_K // 32), mask=n3, other=127)
                acc = _mac(aa, wd, sdv, acc, BLOCK_N, BLOCK_K, ASM, SPLIT, F32)
            tw = tl.load(tw_ptr + sid, mask=rmask, other=0.0)
            acc = acc * tw[:, None]
            # one output row per (token, pick): the k picks are summed by the caller, deterministically
            tl.store(out_ptr + sid.to(tl.int64)[:, None] * s_ot + offs_n[None, :], acc,
                     mask=rmask[:, None] & nmask[None, :])

    @triton.jit
    def _gemv_step(xp, q, s, acc, kb, BK: tl.constexpr, ASM: tl.constexpr):
        # acc [BN, NG, 16] fp32 += decoded W tile * one bf16 row's even / odd columns of K step kb (no tensor cores)
        c = kb * BK + (tl.arange(0, BK // 32)[:, None] * 16 + tl.arange(0, 16)[None, :]) * 2
        xe = tl.load(xp + c).to(tl.float32)[None]
        xo = tl.load(xp + c + 1).to(tl.float32)[None]
        lo, hi = _decode(q, s, ASM)
        return acc + lo.to(tl.float32) * xe + hi.to(tl.float32) * xo

    @triton.jit
    def _up_gemv(
        x_ptr, q_ptr, s_ptr, ids_ptr, a_ptr, limit, s_xt, s_qe, s_qn, s_se, s_sn, s_at,
        I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ASM: tl.constexpr, F32: tl.constexpr,
    ):
        # decode-sized batches: program = (pick m, BLOCK_N gate and up columns) -> activation row m
        pid_m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < I
        n3 = nmask[:, None, None]
        e = tl.load(ids_ptr + pid_m)
        xp = x_ptr + (pid_m // TOPK).to(tl.int64) * s_xt
        qg, sg = _tile_ptrs(q_ptr, s_ptr, e, offs_n, s_qe, s_qn, s_se, s_sn, BLOCK_K)
        acc_g = tl.zeros([BLOCK_N, BLOCK_K // 32, 16], tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K // 32, 16], tl.float32)
        for kb in range(0, DM // BLOCK_K):
            wg = tl.load(qg + kb * (BLOCK_K // 2), mask=n3, other=0)
            sgv = tl.load(sg + kb * (BLOCK_K // 32), mask=n3, other=127)
            wu = tl.load(qg + I * s_qn + kb * (BLOCK_K // 2), mask=n3, other=0)
            suv = tl.load(sg + I * s_sn + kb * (BLOCK_K // 32), mask=n3, other=127)
            acc_g = _gemv_step(xp, wg, sgv, acc_g, kb, BLOCK_K, ASM)
            acc_u = _gemv_step(xp, wu, suv, acc_u, kb, BLOCK_K, ASM)
        a = _act_bf16(tl.sum(tl.sum(acc_g, 2), 1), tl.sum(tl.sum(acc_u, 2), 1), limit, F32)
        tl.store(a_ptr + pid_m.to(tl.int64) * s_at + offs_n, a, mask=nmask)

    @triton.jit
    def _down_gemv(
        a_ptr, q_ptr, s_ptr, ids_ptr, tw_ptr, out_ptr, s_at, s_qe, s_qn, s_se, s_sn, s_ot,
        DM: tl.constexpr, I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < DM
        n3 = nmask[:, None, None]
        e = tl.load(ids_ptr + pid_m)
        ap = a_ptr + pid_m.to(tl.int64) * s_at
        qd, sd = _tile_ptrs(q_ptr, s_ptr, e, offs_n, s_qe, s_qn, s_se, s_sn, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K // 32, 16], tl.float32)
        for kb in range(0, I // BLOCK_K):
            wd = tl.load(qd + kb * (BLOCK_K // 2), mask=n3, other=0)
            sdv = tl.load(sd + kb * (BLOCK_K // 32), mask=n3, other=127)
            acc = _gemv_step(ap, wd, sdv, acc, kb, BLOCK_K, ASM)
        y = tl.sum(tl.sum(acc, 2), 1) * tl.load(tw_ptr + pid_m)
        tl.store(out_ptr + pid_m.to(tl.int64) * s_ot + offs_n, y, mask=nmask)
