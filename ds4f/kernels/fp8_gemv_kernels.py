"""⑥ kernels, fp8_gemv's Triton programs: the block-FP8 decode GEMV (_fp8_gemv, its per-block steps, the a8 form's
per-token x quantization quant_rows, shared with the MXFP4 a8 kernels and fp8_gemm) and the e4m3 -> bf16 widening by
integer ops (E4M3_BF16_ASM, shared with the CUDA-core and register-fed MMA forms). ds4f/kernels/fp8_gemv.py holds the
tables, the choice of form and the launch."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.moe_mxfp4_kernels import _act_bf16
    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: the GEMV's callers fall back to the reference before reaching here
    triton = None
_fp8_gemv = None  # the kernel below where triton is installed

# e4m3 bytes -> bf16 with integer ops (Triton's cvt path runs 3 conversions per element in sm_90 SASS, and conversions
# issue at 16 lanes per clock per SM: at most ~1.4 TB/s of e4m3 on an H200, _w8_kernel's measured rate). Four bytes b
# in $2 -> bf16 pairs $0 = (b0, b1), $1 = (b2, b3): prmt puts each b in the low byte of a 16-bit half with its sign
# replicated over the high byte; << 4 and the mask keep the sign at bit 15 and exponent|mantissa (b & 0x7F) at bits
# 4..10: the bf16 of value * 2^-120, exact for subnormal e4m3 too (bf16 subnormals); then * 2^120 (+ -0.0) by a
# bf16x2 fma, exact. NaN bytes (0x7F, 0xFF) come out as 480: checkpoints have none.
E4M3_BF16_ASM = """{
.reg .b32 t0, t1, k, z;
prmt.b32 t0, $2, 0, 0x9180;
prmt.b32 t1, $2, 0, 0xB3A2;
shl.b32 t0, t0, 4;
shl.b32 t1, t1, 4;
and.b32 t0, t0, 0x87F087F0;
and.b32 t1, t1, 0x87F087F0;
mov.b32 k, 0x7B807B80;
mov.b32 z, 0x80008000;
fma.rn.bf16x2 $0, t0, k, z;
fma.rn.bf16x2 $1, t1, k, z;
}"""

if triton is not None:
    _ASM = tl.constexpr(E4M3_BF16_ASM)

    @triton.jit
    def _wload(w_p, c, k_len, EVEN_K: tl.constexpr):
        # the [BLOCK_N, 128] weight bytes of the scale block c columns into the program's K slice (of k_len)
        if EVEN_K:
            return tl.load(w_p + c)
        km = (c + tl.arange(0, 128)) < k_len
        return tl.load(w_p + c, mask=km[None, :], other=0.0)

    @triton.jit
    def quant_rows(x, SW_ROUND: tl.constexpr):
        # x [R, 128] fp32 -> (q [R, 128] fp32 on the e4m3 grid's range, s [R] fp32): fp8_gemm.quant_act_ref's pow2
        # scales (amax floored at 1e-4; amax = 1.f * 2^e: s = 2^(e-8), or 2^(e-7) when 1.f > 1.75), x / s clamped
        # to +-448; SW_ROUND: snapped to the e4m3 grid here (RTNE by an fp32 add: the interpreter's fp8 cast
        # mis-rounds), else the caller's cast to e4m3 rounds
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        s = (e << 23).to(tl.float32, bitcast=True)
        q = x * ((254 - e) << 23).to(tl.float32, bitcast=True)[:, None]
        q = tl.minimum(tl.maximum(q, -448.0), 448.0)
        if SW_ROUND:
            e8 = tl.maximum(((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # grid step 2^(e8-3)
            c = (((e8 + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(e8+20)
            q = (q + c) - c
        return q, s

    @triton.jit
    def _block(acc, ss, w_p, x_p, g_p, s_p, c, k_len, tmask, EVEN_K: tl.constexpr, NATIVE: tl.constexpr,
               SCALE_E8M0: tl.constexpr, DOT_F32: tl.constexpr, BITS: tl.constexpr, NORM: tl.constexpr,
               A8: tl.constexpr, ACT: tl.constexpr, up_off, limit):
        # (acc [BLOCK_N, 16], ss [16]) += the 128-column scale block starting c columns into the program's K slice
        # (of k_len); NORM: x times the norm weight g, ss += the rows' squares; ACT: x = SwiGLU of the gate at x_p
        # and the up half up_off elements further (see _fp8_gemv)
        return _wblock(acc, ss, _wload(w_p, c, k_len, EVEN_K), x_p, g_p, s_p, c, k_len, tmask, EVEN_K, NATIVE,
                       SCALE_E8M0, DOT_F32, BITS, NORM, A8, ACT, up_off, limit)

    @triton.jit
    def _wblock(acc, ss, wq, x_p, g_p, s_p, c, k_len, tmask, EVEN_K: tl.constexpr, NATIVE: tl.constexpr,
                SCALE_E8M0: tl.constexpr, DOT_F32: tl.constexpr, BITS: tl.constexpr, NORM: tl.constexpr,
                A8: tl.constexpr, ACT: tl.constexpr, up_off, limit):
        # _block with the weight bytes wq already loaded. A8 (NATIVE only): x quantized per token to e4m3 with a
        # pow2 scale (quant_rows) and the e4m3 x e4m3 dot: W goes to the MMA as loaded, no widening
        km = (c + tl.arange(0, 128)) < k_len
        if EVEN_K:
            xv = tl.load(x_p + c, mask=tmask, other=0.0)
            s = tl.load(s_p + c // 128)
        else:
            xv = tl.load(x_p + c, mask=tmask & km[None, :], other=0.0)
            s = tl.load(s_p + c // 128, mask=c < k_len, other=0)
        if ACT:  # the routed experts' SwiGLU and bf16 rounding (moe_mxfp4_kernels._act_bf16); rows past T give 0
            uv = tl.load(x_p + up_off + c, mask=tmask & km[None, :], other=0.0)
            xv = _act_bf16(xv.to(tl.float32), uv.to(tl.float32), limit, DOT_F32)
        if NORM:
            xf = xv.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            xv = tl.load(g_p + c, mask=km, other=0.0).to(tl.float32)[None, :] * xf
        if SCALE_E8M0:  # UE8M0 byte b -> 2^(b-127) as fp32 bits (b == 0 gives 0, not 2^-127)
            s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        if A8:
            q, xs = quant_rows(xv.to(tl.float32), DOT_F32)
            if DOT_F32:
                d = tl.dot(wq.to(tl.float32), tl.trans(q))
            else:
                d = tl.dot(wq, tl.trans(q.to(wq.dtype)))
            return acc + d * (s * xs[None, :]), ss
        if BITS:  # integer ops, any sm_80+ (inline PTX: not in the interpreter)
            if NATIVE:
                wq = wq.to(tl.uint8, bitcast=True)
            wb = tl.inline_asm_elementwise(_ASM, "=r,=r,r", [wq], dtype=tl.bfloat16, is_pure=True, pack=4)
        elif NATIVE:
            wb = wq.to(tl.bfloat16)
        else:  # e4m3 byte -> fp16 bits of value / 256 (exact), x 256 folded into the scale
            h = wq.to(tl.uint16)
            wb = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.bfloat16)
            s = s * 256.0
        xb = xv.to(tl.bfloat16)
        if DOT_F32:  # the interpreter's bf16 tl.dot multiplies raw bits; same values in fp32
            wb = wb.to(tl.float32)
            xb = xb.to(tl.float32)
        return acc + tl.dot(wb, tl.trans(xb)) * s, ss

    @triton.jit(do_not_specialize=["T"])
    def _fp8_gemv(
        x_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, g_ptr, T, NT, K, GN, s_xt, s_xg, s_wsn, s_ot, k_per, eps,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr, NATIVE: tl.constexpr, SCALE_E8M0: tl.constexpr, DOT_F32: tl.constexpr,
        ITERS: tl.constexpr, BITS: tl.constexpr, NORM: tl.constexpr = False, PDL: tl.constexpr = False,
        A8: tl.constexpr = False, ACT: tl.constexpr = False, up_off=0, limit=0.0,
    ):
        # program (pid_n, pid_s): rows [n0, n0 + BLOCK_N) of W [NT, K] (inside group n0 // GN and inside one 128-row
        # scale block) over columns [k_lo, k_lo + k_per); k_per a multiple of BLOCK_K, itself a multiple of 128.
        # NORM (one group, no K split): RMSNorm_g(x) @ W^T as r * ((g * x) @ W^T), r [T] the rows' 1 / rms from
        # the squares of the x tiles the loop loads anyway (model.layers.RMSNorm; g_ptr = x_ptr without NORM)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, BLOCK_T)
        rk = tl.arange(0, 128)
        rows = tl.minimum(rn, NT - 1)  # rows past NT re-read row NT-1 (same scale block); the store drops them
        k_lo = pid_s * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
        w_p = w_ptr + rows.to(tl.int64)[:, None] * K + (k_lo + rk)[None, :]
        x_p = x_ptr + (n0 // GN) * s_xg + rt[:, None] * s_xt + (k_lo + rk)[None, :]
        s_p = ws_ptr + (n0 // 128) * s_wsn + k_lo // 128
        tmask = rt[:, None] < T
        g_p = g_ptr + k_lo + rk
        acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
        ss = tl.zeros([BLOCK_T], tl.float32)
        kl = k_hi - k_lo
        i0 = 0
        if PDL:  # (ds4f.kernels.pdl) the first weight block is read while the kernel before drains; x after the wait
            wq = _wload(w_p, 0, kl, EVEN_K)
            pdl_enter(PDL)
            acc, ss = _wblock(acc, ss, wq, x_p, g_p, s_p, 0, kl, tmask, EVEN_K, NATIVE, SCALE_E8M0, DOT_F32, BITS,
                              NORM, A8, ACT, up_off, limit)
            for j in tl.static_range(1, BLOCK_K // 128):
                acc, ss = _block(acc, ss, w_p, x_p, g_p, s_p, j * 128, kl, tmask, EVEN_K, NATIVE, SCALE_E8M0,
                                 DOT_F32, BITS, NORM, A8, ACT, up_off, limit)
            i0 = 1
        if ITERS > 0:  # the interpreter (numpy 2) takes no runtime loop bound: the caller passes the count
            for i in range(0, ITERS):
                for j in tl.static_range(BLOCK_K // 128):  # one 128-column scale block per dot
                    acc, ss = _block(acc, ss, w_p, x_p, g_p, s_p, i * BLOCK_K + j * 128, kl, tmask, EVEN_K, NATIVE,
                                     SCALE_E8M0, DOT_F32, BITS, NORM, A8, ACT, up_off, limit)
        else:
            for i in range(i0, tl.cdiv(kl, BLOCK_K)):
                for j in tl.static_range(BLOCK_K // 128):
                    acc, ss = _block(acc, ss, w_p, x_p, g_p, s_p, i * BLOCK_K + j * 128, kl, tmask, EVEN_K, NATIVE,
                                     SCALE_E8M0, DOT_F32, BITS, NORM, A8, ACT, up_off, limit)
        if NORM:
            acc = acc * tl.rsqrt(ss / K + eps)[None, :]
        omask = (rn[:, None] < NT) & (rt[None, :] < T)
        o_p = out_ptr + rt[None, :] * s_ot + rn[:, None]
        if SPLIT_K:
            # partials [n_split, T, n_tiles * BLOCK_N] fp32 (row-contiguous per token); the last arrival sums them
            n_split = tl.num_programs(1)
            nr = tl.num_programs(0) * BLOCK_N
            p_off = rt[None, :] * nr + rn[:, None]
            pmask = rt[None, :] < T
            tl.store(part_ptr + pid_s * T * nr + p_off, acc, mask=pmask)
            tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
            cnt = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == n_split - 1:
                tot = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
                sp = 0
                while sp < n_split:  # fixed order: the sum does not depend on arrival order (a while loop: the
                    # interpreter cannot range over a runtime bound)
                    tot += tl.load(part_ptr + sp * T * nr + p_off, mask=pmask, other=0.0, cache_modifier=".cg")
                    sp += 1
                tl.store(o_p, tot.to(out_ptr.dtype.element_ty), mask=omask)
                tl.store(lock_ptr + pid_n, 0)  # every program of this tile has counted: re-armed for the next call
        else:
            tl.store(o_p, acc.to(out_ptr.dtype.element_ty), mask=omask)
