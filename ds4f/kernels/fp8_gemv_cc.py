"""⑥ kernels, block-FP8 decode GEMV on the CUDA cores for 1-4 tokens: fp8_gemv.launch's contract (x [T, G, K] bf16,
W [G*N, K] e4m3 with one scale per 128x128 block, out [T, G, N]) without tensor cores, shared memory or barriers.

Why a second form: in fp8_gemv's swap-AB kernel every 128-column step of a program stages its tiles through shared
memory for the MMA (cp.async, barriers, ldmatrix), and Nsight Compute on the H200 (session 16) found it latency-bound:
one or two warps per scheduler, issuing once every 5-13 cycles on barrier and long-scoreboard stalls, 0.4-0.5 of
the copy ceiling. A load-and-dot probe over the same grid streams at 0.85 (session 17, bench/probe_layout.py). At
T <= 4 the MMA's 16 columns are mostly padding anyway. Here the weights are read as int32 words (4 e4m3 bytes),
8 bytes per thread per row of a 128-column block, straight into registers (the next block's while this one is
consumed: a register double buffer); x is read as int64 words (4 bf16) in the same register layout (a [BN, 32] tile
of row stride 0, so no tile crosses shared memory); the bytes widen by integer ops (fp8_gemv.E4M3_BF16_ASM: e4m3 ->
bf16 exactly, then bf16 -> fp32 by a shift), each lane keeps fp32 partials of its 4 columns per token, scaled by
the block's scale each step, and the lanes' sums are reduced once at the end. ~6-7 SASS instructions per weight byte
at T = 1, ~11 at T = 4 on sm_90 (offline build): by issue rate alone ~0.9x an H200's HBM time at T = 1 and ~1.5x at
T = 4 (a GPU sweep decides per T: DS4F_FP8_GEMV_CC_MAX_T); far below the HBM time of a DGX Spark (273 GB/s).

Same math as fp8_gemm.fp8_linear_ref (x in bf16, W dequantized, fp32 sums) up to the order of the sums: the w8
form, not the a8 one (x is not quantized). Program = (BLOCK_N rows inside one 128-row scale block, K slice); a K
split's fp32 partials are summed in split order by the tile's last program to arrive (arrival counters, re-armed:
CUDA-graph safe), as in fp8_gemv. PDL (ds4f.kernels.pdl): the first weight block is loaded before the wait.
"""

from __future__ import annotations

import os
import weakref
from functools import cache
from typing import TypeVar

import torch

from ds4f.kernels import pdl
from ds4f.kernels.fp8_gemv_rows import Cfg, generic_config, split_buffers, token_slots, valid, x_ok
from ds4f.kernels.knobs import env_knobs

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.fp8_gemv_kernels import E4M3_BF16_ASM
    from ds4f.kernels.fp8_gemv_rows import _finish, _program, _rotate, _step
    from ds4f.kernels.moe_mxfp4_decode_kernels import _round_bf16 as _rne16  # RNE by hand in the interpreter
    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: fp8_gemm takes its reference first
    triton = None

# tokens per call (at most 4: the kernel's accumulators); above, the MMA forms win (each weight byte costs ~T FMAs
# here: session 18's sweep had this form 1.3-1.6x the a8 MMA kernel's time at T = 4, 0.75-0.95x at T = 1)
E = TypeVar("E")
MAX_T = min(4, (env_knobs("DS4F_FP8_GEMV_CC_MAX_T", 1, "1") or (1,))[0])
# name (fp8_gemv.CONFIGS: the shape) -> (BLOCK_N, SPLIT, num_warps, DEPTH): the shapes that take this form by default
# at T <= MAX_T: all of them, from bench/sweep_fp8_gemv_cc.py on an H200 (session 18, T = 1, fp32 products; time
# vs fp8_gemv's table kernel: a8 for the TP=2 shapes, widening for TP=1). W13_TP1 is WO_B_TP2's shape
CONFIGS_CC: dict[str, tuple[int, int, int, int]] = {
    "IN_PROJ": (32, 8, 8, 1),  # 4.89 vs 6.41 us
    "IDX_WQ_B": (64, 4, 4, 2),  # 5.07 vs 5.43
    "WQ_B_TP2": (64, 2, 4, 2),  # 6.87 vs 7.02
    "WO_A_TP2": (64, 8, 4, 2),  # 7.36 vs 8.94
    "WO_B_TP2": (64, 8, 4, 2),  # 7.37 vs 8.94
    "W13_TP2": (32, 8, 4, 1),  # 5.32 vs 6.70
    "W2_TP2": (32, 2, 8, 2),  # 3.65 vs 4.50
    "WQ_B_TP1": (64, 1, 4, 2),  # 9.86 vs 12.80
    "WO_A_TP1": (64, 4, 4, 2),  # 10.86 vs 17.60
    "WO_B_TP1": (64, 8, 4, 2),  # 11.31 vs 21.33
    "W2_TP1": (32, 4, 4, 1),  # 5.05 vs 6.72
}
# DS4F_FP8_GEMV_CC: "table" (the default) the shapes of CONFIGS_CC; "0" off; "1" every plain FP8 GEMV with
# T <= MAX_T (CONFIGS_CC's tiles where listed, else generic_config); "bn,split,nw" those tiles for every shape
_ENV = os.environ.get("DS4F_FP8_GEMV_CC", "table") or "table"
ENABLED = _ENV != "0"
ALL_SHAPES = _ENV not in ("0", "table")
_TILES = env_knobs("DS4F_FP8_GEMV_CC", 3, "64,2,4") if _ENV not in ("0", "1", "table") else None
# DS4F_FP8_GEMV_CC_DEPTH: 128-column weight blocks in flight per program (1: a register double buffer; 2: two
# ahead) where the table does not say
DEPTH = min(2, (env_knobs("DS4F_FP8_GEMV_CC_DEPTH", 1, "2", minimum=1) or (1,))[0])
# ACC16 (DS4F_FP8_GEMV_CC_ACC16, on by default; "0" fp32 products): each word's 4 products and their pairwise sums
# in bf16x2 FMAs (2 per word per token), then fp32: ~15-25 % fewer instructions (sm_90 SASS: 4.7 vs 5.6 per weight
# byte at T = 1) for bf16 rounding of the products (relative 2^-9 each). Session 18's sweep: 2-6 % faster at every
# T = 1 shape, relative error 2.5-2.7e-3 against the exact reference (bf16 outputs) vs 1.6e-3 with fp32 products,
# and vs ~2.6e-2 for the a8 MMA form it replaces (x quantized to e4m3)
ACC16 = os.environ.get("DS4F_FP8_GEMV_CC_ACC16", "1") != "0"
# A8 (DS4F_FP8_GEMV_CC_A8=1; off until a GPU sweep times it): x quantized per token per 128 columns to e4m3 with a
# power-of-two scale inside the kernel, as the reference quantizes the input of every FP8 GEMM (v4-architecture.md
# 4.2) and as this prefill's a8w8 GEMM and the MMA decode GEMV do: the same numbers at every batch size and in prefill
# (without it, one-token decode computes with x in bf16: closer to the exact product, 2.6e-3 vs ~2.6e-2, but not the
# reference's rounding). x-side work only, shared by a thread's rows (the block max by a warp butterfly,
# WARP_MAX_ASM): offline sm_90 SASS 6.5 vs 4.7 loop instructions per weight byte with bf16x2 products at 64-row
# tiles, 9.2 vs 5.4 at 32
A8 = os.environ.get("DS4F_FP8_GEMV_CC_A8", "0") == "1"
# NORM (DS4F_FP8_GEMV_CC_NORM=1; off by default): fp8_gemv.linear_norm (the decode q_norm + wq_b, and the
# indexer's wq_b on the same normed q) through this kernel where it takes the shape, the RMSNorm inside it (each
# program computes the row's 1 / rms from the whole row first, then normalizes the x words it reads) instead of
# the MMA kernel's norm (no K split there) or a norm launch before the GEMV. Measured slower: H200, rank 0 of the
# TP=2 step alone, 12 layers (session 19, `bash scripts/gpu_session.sh s19c c336697`), replay 1.328 vs 1.300 ms at
# one token; in its timeline wq_b with the norm ~11.6 us vs ~7 for the plain kernel (the prologue's row read and
# reduction sit before every program's weight loop)
NORM = os.environ.get("DS4F_FP8_GEMV_CC_NORM", "0") == "1"

# ACC16's products: $0 = fma.bf16x2($3, $4, fma.bf16x2($1, $2, -0)) on packed bf16 pairs (a temporary, so $0 may
# share a register with an input)
FMA2_ASM = """{
.reg .b32 z, t;
mov.b32 z, 0x80008000;
fma.rn.bf16x2 t, $1, $2, z;
fma.rn.bf16x2 $0, $3, $4, t;
}"""

# A8's block amax: a thread's two elements ($2, $3: lanes 2i, 2i+1 of a row, as the [BN, 32] x tile holds them) and
# a butterfly over the warp's 32 threads -> the max of the 128 columns in both outputs. Every row of the x tile is the
# same row of x (row stride 0) and a warp holds all 32 lanes of its rows, so mixing rows changes nothing; a pure
# routine of identical inputs, so it runs once for all of a thread's rows (tl.max over the lanes would reduce each
# row apart)
WARP_MAX_ASM = ("{\n.reg .f32 a, b;\nmax.f32 a, $2, $3;\n"
                + "".join(f"shfl.sync.bfly.b32 b, a, {m}, 0x1f, 0xffffffff;\nmax.f32 a, a, b;\n"
                          for m in (1, 2, 4, 8, 16))
                + "mov.b32 $0, a;\nmov.b32 $1, a;\n}")

if triton is not None:
    _ASM_C = tl.constexpr(E4M3_BF16_ASM)
    _WMAX_C = tl.constexpr(WARP_MAX_ASM)
    _FMA2_C = tl.constexpr(FMA2_ASM)

    @triton.jit
    def _f32(v, HIGH: tl.constexpr):
        # the bf16 in the low (HIGH: high) half of int32 words v -> fp32
        if HIGH:
            return (v & -65536).to(tl.float32, bitcast=True)
        return (v << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _widen(w, F32: tl.constexpr):
        # int32 words of 4 e4m3 bytes [BN, 32] -> their values (exact) as 4 fp32 tensors (byte 0 = column 4j first):
        # integer ops to bf16 pairs, then bf16 -> fp32 (F32, the interpreter: casts of the bytes)
        if F32:
            return (((w >> 0) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32),
                    ((w >> 8) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32),
                    ((w >> 16) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32),
                    ((w >> 24) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32))
        p01, p23 = tl.inline_asm_elementwise(_ASM_C, "=r,=r,r", [w], dtype=(tl.int32, tl.int32), is_pure=True,
                                             pack=1)
        return _f32(p01, False), _f32(p01, True), _f32(p23, False), _f32(p23, True)

    @triton.jit
    def _q8(v):
        # fp32 values already scaled into +-448 -> the nearest e4m3 value (RTNE by an fp32 add, as
        # fp8_gemv.quant_rows' SW_ROUND; the same bits on the GPU and in the interpreter)
        e8 = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # grid step 2^(e8-3)
        c = (((e8 + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(e8+20)
        return (v + c) - c

    @triton.jit
    def _bits16(v):
        # fp32 values exact in bf16 -> their bf16 bits in the low half of int32
        return (v.to(tl.int32, bitcast=True) >> 16) & 65535

    @triton.jit
    def _normed(lo, hi, g_p, r, K4, BN: tl.constexpr, F32: tl.constexpr):
        # NORM: x's bf16 words -> those of bf16(g * (x * r)) (model.layers.RMSNorm's math, r = 1 / rms of the row);
        # g_p: this 128-column block of norm_weight(g) ([2, K/4] int64: lane j's fp32 pairs (4j, 4j+1) in row 0,
        # (4j+2, 4j+3) in row 1), loaded as the x words are (row stride 0: the same register layout, no shuffle)
        gp = g_p + tl.zeros([BN, 1], tl.int32) + tl.arange(0, 32)[None, :]
        ga = tl.load(gp)
        gb = tl.load(gp + K4)
        n0 = _rne16(ga.to(tl.int32).to(tl.float32, bitcast=True) * (_f32(lo, False) * r), F32).to(tl.float32)
        n1 = _rne16((ga >> 32).to(tl.int32).to(tl.float32, bitcast=True) * (_f32(lo, True) * r), F32).to(tl.float32)
        n2 = _rne16(gb.to(tl.int32).to(tl.float32, bitcast=True) * (_f32(hi, False) * r), F32).to(tl.float32)
        n3 = _rne16((gb >> 32).to(tl.int32).to(tl.float32, bitcast=True) * (_f32(hi, True) * r), F32).to(tl.float32)
        return _bits16(n0) | (_bits16(n1) << 16), _bits16(n2) | (_bits16(n3) << 16)

    @triton.jit
    def _inv_rms(x_p, t, T, K, eps):
        # 1 / rms of x row t (K columns as int64 words of 4 bf16 at x_p; 0 past T): the NORM prologue, fp32 sums
        ss = tl.zeros([32], tl.float32)
        for kb in range(0, K // 128):
            xw = tl.load(x_p + kb * 32 + tl.arange(0, 32), mask=t < T, other=0)
            lo = xw.to(tl.int32)
            hi = (xw >> 32).to(tl.int32)
            a, b, c, d = _f32(lo, False), _f32(lo, True), _f32(hi, False), _f32(hi, True)
            ss += (a * a + b * b) + (c * c + d * d)
        return tl.rsqrt(tl.sum(ss, 0) / K + eps)

    @triton.jit
    def _xwords(x_p, t, T, BN: tl.constexpr, A8: tl.constexpr, F32: tl.constexpr, g_p=None, r=None, K4=0,
                NORM: tl.constexpr = False):
        # row t of x at x_p, this 128-column block as int64 words of 4 bf16 in a [BN, 32] tile of row stride 0 (the
        # register layout of the weight words as loaded: a [1, 32] load would spread over all threads, and the
        # weights would cross shared memory to meet it; each thread's copies come from L1; row t past T: x = 0) ->
        # (lo, hi) [BN, 32] int32 (bf16 pairs of columns 4j, 4j+1 and 4j+2, 4j+3) and the block's x scale. A8: x
        # quantized as fp8_gemm.quant_act_ref does (the reference's activation path: amax of the 128 columns, a
        # power-of-two scale, e4m3 values RTNE), the e4m3 values as bf16 (exact) and the scale [BN, 32]; else ones.
        # Depends on x alone: a thread's rows share it, and the compiler computes it once for all of them
        xw = tl.load(x_p + tl.zeros([BN, 1], tl.int32) + tl.arange(0, 32)[None, :], mask=t < T, other=0)
        lo = xw.to(tl.int32)
        hi = (xw >> 32).to(tl.int32)
        if NORM:
            lo, hi = _normed(lo, hi, g_p, r, K4, BN, F32)
        sx = tl.full([BN, 32], 1.0, tl.float32)
        if A8:
            x0, x1, x2, x3 = _f32(lo, False), _f32(lo, True), _f32(hi, False), _f32(hi, True)
            ax = tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))
            if F32:
                amax = tl.max(ax, 1)[:, None] + tl.zeros([BN, 32], tl.float32)
            else:  # the block's max by a warp butterfly (WARP_MAX_ASM): the same value in every row, computed once
                amax = tl.inline_asm_elementwise(_WMAX_C, "=r,=r,r,r", [ax], dtype=tl.float32, is_pure=True, pack=2)
            bits = tl.maximum(amax, 1e-4).to(tl.int32, bitcast=True)
            e = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # quant_rows' rule
            inv = ((254 - e) << 23).to(tl.float32, bitcast=True)
            q0 = _q8(tl.minimum(tl.maximum(x0 * inv, -448.0), 448.0))
            q1 = _q8(tl.minimum(tl.maximum(x1 * inv, -448.0), 448.0))
            q2 = _q8(tl.minimum(tl.maximum(x2 * inv, -448.0), 448.0))
            q3 = _q8(tl.minimum(tl.maximum(x3 * inv, -448.0), 448.0))
            lo = _bits16(q0) | (_bits16(q1) << 16)
            hi = _bits16(q2) | (_bits16(q3) << 16)
            sx = (e << 23).to(tl.float32, bitcast=True)
        return lo, hi, sx

    @triton.jit
    def _tok(acc, w0, w1, w2, w3, x_p, t, T, s, BN: tl.constexpr, A8: tl.constexpr, F32: tl.constexpr, g_p, r, K4,
             NORM: tl.constexpr):
        # acc [BN, 32] += s * the 4-column partials of the weight words (w0..w3: columns 4j..4j+3) against x row t
        # (_xwords: A8 its e4m3 values, times their scale; NORM: normed by r and g first)
        lo, hi, sx = _xwords(x_p, t, T, BN, A8, F32, g_p, r, K4, NORM)
        p = w0 * _f32(lo, False) + w1 * _f32(lo, True) + w2 * _f32(hi, False) + w3 * _f32(hi, True)
        return acc + p * (s * sx)

    @triton.jit
    def _pairs(wq, F32: tl.constexpr):
        # ACC16: the weight words [BN, 32] -> their bf16 pairs (columns 4j, 4j + 1), (4j + 2, 4j + 3) as int32
        # (the interpreter: the words twice; _tok16 widens them itself)
        if F32:
            return wq, wq
        return tl.inline_asm_elementwise(_ASM_C, "=r,=r,r", [wq], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _tok16(acc, p01, p23, x_p, t, T, s, BN: tl.constexpr, F32: tl.constexpr, A8: tl.constexpr, g_p, r, K4,
               NORM: tl.constexpr):
        # ACC16: _tok with the products and the pairs' sums in bf16x2 (two fma.rn.bf16x2 per word: columns 4j + 2
        # onto 4j, 4j + 3 onto 4j + 1), then the two halves in fp32: no fp32 widening of W, no unpacking of x beyond
        # its words (the F32 branch emulates the roundings for the interpreter). A8: e4m3 x e4m3 products are exact
        # in bf16, so only the pairs' sums round
        lo, hi, sx = _xwords(x_p, t, T, BN, A8, F32, g_p, r, K4, NORM)
        if F32:
            w0, w1, w2, w3 = _widen(p01, F32)
            h0 = _rne16(w2 * _f32(hi, False) + _rne16(w0 * _f32(lo, False), True).to(tl.float32), True)
            h1 = _rne16(w3 * _f32(hi, True) + _rne16(w1 * _f32(lo, True), True).to(tl.float32), True)
            return acc + (h0.to(tl.float32) + h1.to(tl.float32)) * (s * sx)
        h = tl.inline_asm_elementwise(_FMA2_C, "=r,r,r,r,r", [p01, lo, p23, hi], dtype=tl.int32, is_pure=True,
                                      pack=1)
        return acc + (_f32(h, False) + _f32(h, True)) * (s * sx)

    @triton.jit(do_not_specialize=["T"])
    def _gemv_cc(
        x_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, T, NT, K, GN, s_xt, s_xg, s_wsn, s_ot, k_per,
        BLOCK_N: tl.constexpr, TP: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_E8M0: tl.constexpr,
        F32: tl.constexpr, PDL: tl.constexpr = False, ACC16: tl.constexpr = False, DEPTH: tl.constexpr = 1,
        A8: tl.constexpr = False, g_ptr=None, eps=0.0, NORM: tl.constexpr = False,
    ):
        # program (pid_n, pid_s): rows [n0, n0 + BLOCK_N) (one group, one 128-row scale block) over the 128-column
        # blocks [k_lo, k_lo + k_per) (k_per a multiple of 128, K too); TP (1, 2, 4) >= T tokens, one fp32
        # accumulator [BLOCK_N, 32] each (a lane's 4-column partials, scaled per block; summed once at the end)
        pid_n, pid_s, n0, rn, k_lo, w_p, x_p, s_p, steps, wq, sq, wq2, sq2 = _program(
            x_ptr, w_ptr, ws_ptr, NT, K, GN, s_xg, s_wsn, k_per, BLOCK_N, DEPTH)
        a0 = tl.zeros([BLOCK_N, 32], tl.float32)
        a1 = tl.zeros([BLOCK_N, 32], tl.float32)
        a2 = tl.zeros([BLOCK_N, 32], tl.float32)
        a3 = tl.zeros([BLOCK_N, 32], tl.float32)
        pdl_enter(PDL)
        # NORM (one group): x = RMSNorm_g(x) per token, 1 / rms from the whole row first (every program reads it:
        # K bf16 per token from L2), the product and bf16 rounding per element as x is read
        x_row = x_ptr + (n0 // GN) * s_xg
        r0 = eps
        r1 = eps
        r2 = eps
        r3 = eps
        g_p = x_ptr
        if NORM:
            g_p = g_ptr + k_lo // 4
            r0 = _inv_rms(x_row, 0, T, K, eps)
            if TP > 1:
                r1 = _inv_rms(x_row + s_xt, 1, T, K, eps)
            if TP > 2:
                r2 = _inv_rms(x_row + 2 * s_xt, 2, T, K, eps)
                r3 = _inv_rms(x_row + 3 * s_xt, 3, T, K, eps)
        for i in range(0, steps):
            wn, sn, s = _step(w_p, s_p, sq, i, steps, DEPTH, SCALE_E8M0)
            xi = x_p + i * 32
            gi = g_p + i * 32
            if ACC16:
                p01, p23 = _pairs(wq, F32)
                a0 = _tok16(a0, p01, p23, xi, 0, T, s, BLOCK_N, F32, A8, gi, r0, K // 4, NORM)
                if TP > 1:
                    a1 = _tok16(a1, p01, p23, xi + s_xt, 1, T, s, BLOCK_N, F32, A8, gi, r1, K // 4, NORM)
                if TP > 2:
                    a2 = _tok16(a2, p01, p23, xi + 2 * s_xt, 2, T, s, BLOCK_N, F32, A8, gi, r2, K // 4, NORM)
                    a3 = _tok16(a3, p01, p23, xi + 3 * s_xt, 3, T, s, BLOCK_N, F32, A8, gi, r3, K // 4, NORM)
            else:
                w0, w1, w2, w3 = _widen(wq, F32)
                a0 = _tok(a0, w0, w1, w2, w3, xi, 0, T, s, BLOCK_N, A8, F32, gi, r0, K // 4, NORM)
                if TP > 1:
                    a1 = _tok(a1, w0, w1, w2, w3, xi + s_xt, 1, T, s, BLOCK_N, A8, F32, gi, r1, K // 4, NORM)
                if TP > 2:
                    a2 = _tok(a2, w0, w1, w2, w3, xi + 2 * s_xt, 2, T, s, BLOCK_N, A8, F32, gi, r2, K // 4, NORM)
                    a3 = _tok(a3, w0, w1, w2, w3, xi + 3 * s_xt, 3, T, s, BLOCK_N, A8, F32, gi, r3, K // 4, NORM)
            wq, sq, wq2, sq2 = _rotate(wq, sq, wq2, sq2, wn, sn, DEPTH)
        _finish(a0, a1, a2, a3, out_ptr, part_ptr, lock_ptr, T, NT, s_ot, pid_n, pid_s, rn, BLOCK_N, TP, SPLIT_K)



@cache
def table_entry(nt: int, k: int, groups: int) -> tuple[int, int, int, int] | None:
    """CONFIGS_CC's entry for the shape W [nt, k] in G groups, if listed (once per shape: takes() runs on every
    eager decode GEMV call)."""
    return entry_for(CONFIGS_CC, nt, k, groups)


def entry_for(table: dict[str, E], nt: int, k: int, groups: int) -> E | None:
    """The entry of a table keyed by fp8_gemv.CONFIGS' names whose shape is W [nt, k] in G groups, if listed (two
    names may share a shape: the table's first match)."""
    from ds4f.kernels.fp8_gemv import CONFIGS

    return next((e for name, e in table.items() if CONFIGS[name][0] == (nt, k, groups)), None)


def config(nt: int, k: int, groups: int, sms: int) -> tuple[Cfg, int]:
    """(tiles, DEPTH) for the shape: DS4F_FP8_GEMV_CC's tiles where valid, then CONFIGS_CC, then generic_config."""
    if _TILES is not None and valid(_TILES, nt, k, groups):  # type: ignore[arg-type]
        return _TILES, DEPTH  # type: ignore[return-value]
    e = table_entry(nt, k, groups)
    if e is not None and valid(e[:3], nt, k, groups):
        return e[:3], e[3]
    return generic_config(nt, k, groups, sms), DEPTH


def takes(x: torch.Tensor, nt: int, k: int, groups: int) -> bool:
    """Whether launch_cc runs x [T, G, K] @ W [nt, k]^T: enabled, the shape in CONFIGS_CC (or every shape:
    DS4F_FP8_GEMV_CC=1 / tiles), T <= MAX_T, K in 128-column blocks, 8+-row groups, x_ok."""
    return (ENABLED and 1 <= x.shape[0] <= MAX_T and k % 128 == 0 and (nt // groups) % 8 == 0
            and (ALL_SHAPES or table_entry(nt, k, groups) is not None) and x_ok(x))


_NORM_W: dict[tuple[int, int, str], tuple[weakref.ref, torch.Tensor]] = {}


def norm_weight(g: torch.Tensor) -> torch.Tensor:
    """The NORM kernel's form of a norm weight g [K] (fp32 values, K % 4 == 0): [2, K/4] int64, row 0 the fp32
    pairs (g[4j], g[4j+1]), row 1 (g[4j+2], g[4j+3]). Cached per weight tensor (norm weights are parameters: made
    once, at the first call, which a decode graph's warm-up makes outside the capture); a capture that misses
    builds it inside the graph and does not cache it."""
    key = (g.data_ptr(), g.numel(), str(g.device))
    hit = _NORM_W.get(key)
    if hit is not None and hit[0]() is g:
        return hit[1]
    w = g.detach().float().contiguous().view(torch.int64)
    packed = torch.stack([w[0::2], w[1::2]]).contiguous()
    if not (g.is_cuda and torch.cuda.is_current_stream_capturing()):
        _NORM_W[key] = (weakref.ref(g), packed)
    return packed


def norm_takes(x: torch.Tensor, nt: int, k: int) -> bool:
    """Whether linear_norm's RMSNorm(x [T, K]) @ W [nt, k]^T runs here (NORM on, and takes() for one group)."""
    return NORM and x.dim() == 2 and takes(x.view(x.shape[0], 1, -1), nt, k, 1)


def launch_cc(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
              cfg: Cfg, acc16: bool | None = None, emulate: bool = False, depth: int | None = None,
              a8: bool | None = None, norm: tuple[torch.Tensor, float] | None = None) -> None:
    """out [T, G, N] (contiguous) = x [T, G, K] (unit inner stride) @ W^T per group; W = w [G*N, K] e4m3 (native
    dtype or its bytes), ws [ceil(G*N/128), K/128] fp32 or UE8M0 bytes (e8m0); T <= 4; cfg valid(). acc16: the
    bf16x2 products (default ACC16); depth: weight blocks in flight (default DEPTH); a8: x quantized per 128 columns
    to e4m3 first, the reference's activation path (fp8_linear_a8_ref's math; default A8); emulate: the interpreter's
    branch (casts, ACC16's roundings by hand) on CUDA too, for tests. norm = (g [K] fp32, eps), one group: x
    RMSNorm_g-ed inside the kernel first (fp8_gemv.linear_norm's contract; x rounded to bf16 after the norm, as the
    separate norm launch does)."""
    t, (nt, k) = x.shape[0], w.shape
    if t > 4 or not valid(cfg, nt, k, groups) or not x_ok(x):
        raise ValueError(f"fp8 CUDA-core GEMV config {cfg} invalid for [{nt}, {k}] in {groups} groups at T={t}")
    g = None
    if norm is not None:
        if groups != 1 or norm[0].numel() != k:
            raise ValueError(f"fp8 CUDA-core GEMV norm: one group and a [{k}] weight (got {groups}, "
                             f"{norm[0].numel()})")
        g = norm_weight(norm[0])
    bn, split, nw = cfg
    part, lock = split_buffers(x, out, nt // bn, bn, split, ("fp8_gemv_cc", nt, k, bn, split))
    _gemv_cc[(nt // bn, split)](
        x.view(torch.int64), w.view(torch.uint8).view(torch.int32), ws, out, part, lock, t, nt, k, nt // groups,
        x.stride(0) // 4, x.stride(1) // 4, ws.stride(0), out.stride(0),
        k // split, BLOCK_N=bn, TP=token_slots(t), SPLIT_K=split > 1, SCALE_E8M0=e8m0, F32=emulate or not x.is_cuda,
        ACC16=ACC16 if acc16 is None else acc16, DEPTH=DEPTH if depth is None else depth,
        A8=A8 if a8 is None else a8, g_ptr=g, eps=0.0 if norm is None else float(norm[1]), NORM=norm is not None,
        num_warps=nw, num_stages=1, **pdl.launch(x.device))
