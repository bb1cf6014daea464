"""⑥ kernels, block-FP8 decode GEMV: x [T, G, K] bf16 (T <= MAX_T tokens) + W [G*N, K] e4m3 with one scale per
128x128 block (fp32, or UE8M0 bytes) in, x @ W^T [T, G, N] out (G > 1: group g's rows read x[:, g]; wo_a).

Swap-AB, as the bf16 GEMV (ds4f/kernels/gemv.py): each program streams a [BLOCK_N, BLOCK_K] tile of W (the A operand
of tl.dot, pipelined over num_stages) against x^T [128, 16] (T zero-padded to 16), so the weight is read once at full
width whatever T is. Per 128-column scale block: the e4m3 tile is widened to bf16 in registers (by integer ops in
inline PTX on any sm_80+, E4M3_BF16_ASM; with DS4F_FP8_GEMV_WIDEN=cvt and in the interpreter: Triton's cvt on sm_89+,
fp16 bit patterns below), dotted, and the fp32 partial is scaled by the block's scale; BLOCK_N divides 128, so a
tile's rows share one scale row. Same math as fp8_gemm.fp8_linear_ref up to fp32 summation order. A K split (fp32
partials) is summed in split order by the last program of each N tile to arrive (ds4f/kernels/arrival.py counters,
re-armed by that program: CUDA-graph safe).

The a8 form (sm_89+, the default for the shapes in CONFIGS_A8; DS4F_FP8_GEMV_A8=0 / 1: none / all): each program
quantizes its x tiles per token per 128 columns to e4m3 with power-of-two scales (fp8_gemm.quant_act_ref's math,
the checkpoint's dynamic activation scheme) and dots the e4m3 weight tile as loaded against them (no widening),
scaling each 128-column partial by both scales.

Configs (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) per (G*N, K, G) from CONFIGS (bench/sweep_fp8_gemv.py on an
H200 fills it; None = fp8_gemm's w8 tiles win there), env DS4F_FP8_GEMV_<NAME>=bn,bk,split,nw,ns ("0": the w8 tiles),
else generic_config. DS4F_FP8_GEMV=0 turns the path off (fp8_gemm's _w8_kernel for every M). Counters are per
weight shape: two calls of one shape must not run at once on two streams (decode's side-stream indexer wq_b differs
in shape from wq_b).
"""

from __future__ import annotations

import os
from functools import cache

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.knobs import env_knobs
from ds4f.kernels.sparse_attn import sm_count

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.moe_mxfp4 import _act_bf16
    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: fp8_gemm falls back to the reference before reaching this file
    triton = None

MAX_T = 16  # tokens per call (decode buckets 1, 4, 16)
BLOCK_T = 16  # tl.dot's smallest N: T columns padded with zeros
USE_GEMV = os.environ.get("DS4F_FP8_GEMV", "1") != "0"

Cfg = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages

# name -> ((G*N, K, G), config or None for fp8_gemm's _w8_kernel): the per-rank decode projections of V4-Flash
# (ds4f/model/args.py flash_config sharded by ds4f/model/tp.py). IN_PROJ = [wq_a; wkv] (the fp8 run of
# runner/gpu/packed.InProj in every layer type: the compressor / indexer input linears are bf16), IDX_WQ_B = the
# indexer's wq_b (CSA layers, replicated; on a side stream beside WQ_B), W13 = the shared expert's [w1; w3].
# WO_B_TP2 is also W13_TP1. bench/sweep_fp8_gemv.py on an H200, 2026-11-29 (bench/results/fp8_gemv.jsonl), one
# token, us this kernel vs _w8_kernel's default tiles (each shape from HBM: weight copies rotated past the L2):
CONFIGS: dict[str, tuple[tuple[int, int, int], Cfg | None]] = {
    "IN_PROJ": ((1536, 4096, 1), (32, 128, 6, 4, 6)),  # 6.94 vs 7.69
    "IDX_WQ_B": ((8192, 1024, 1), (32, 128, 1, 4, 6)),  # 6.26 vs 7.94
    "WQ_B_TP2": ((16384, 1024, 1), (64, 128, 1, 4, 4)),  # 8.93 vs 11.93
    "WO_A_TP2": ((4096, 4096, 4), (32, 128, 3, 4, 6)),  # 10.26 vs 11.63
    "WO_B_TP2": ((4096, 4096, 1), (32, 128, 3, 4, 6)),  # 10.29 vs 11.66
    "W13_TP2": ((2048, 4096, 1), (64, 128, 8, 4, 4)),  # 7.49 vs 8.01
    "W2_TP2": ((4096, 1024, 1), (32, 128, 1, 4, 6)),  # 4.94 vs 6.31
    "WQ_B_TP1": ((32768, 1024, 1), (64, 128, 1, 4, 4)),  # 14.90 vs 17.25
    "WO_A_TP1": ((8192, 4096, 8), (64, 128, 3, 4, 4)),  # 15.71 vs 18.29
    "WO_B_TP1": ((4096, 8192, 1), (32, 128, 3, 4, 6)),  # 15.90 vs 18.18
    "W2_TP1": ((4096, 2048, 1), (32, 128, 2, 4, 6)),  # 7.19 vs 7.94
}

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
WIDEN_BITS = os.environ.get("DS4F_FP8_GEMV_WIDEN", "bits") != "cvt"  # "cvt": Triton's conversions (as fp8_gemm)
# the a8 form: x quantized per token per 128 columns (pow2 scales, fp8_gemm.quant_act_ref: the checkpoint's dynamic
# activation scheme, as HF's FP8Linear and the prefill's a8w8 path) and an e4m3 x e4m3 dot, so the weight tile feeds
# the MMA as loaded (sm_89+; below, the widening path). Default "table": the shapes CONFIGS_A8 lists; "1": every
# shape; "0": none
A8 = os.environ.get("DS4F_FP8_GEMV_A8", "table")

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
        if ACT:  # the routed experts' SwiGLU and bf16 rounding (moe_mxfp4._act_bf16); rows past T give 0
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


# the a8 form's tiles per name (bench/sweep_fp8_gemv.py --a8 fills it; a name not here runs the widening form with
# CONFIGS' tiles unless DS4F_FP8_GEMV_A8=1). H200, 2026-11-29 (bench/results/fp8_gemv.jsonl), one token, us a8 vs the
# widening form at its table tiles in the same run. Every TP=2 shape takes it: in the full model's TP=2 rank step
# (bench_full --tp-sim 2, 43 layers) these seven together took the step from 6.184 to 5.559 ms, more than the
# kernels' sums, as the in-proj / shared-expert GEMVs overlap other streams' kernels there
CONFIGS_A8: dict[str, Cfg] = {  # name -> tiles; the shape is CONFIGS' under the same name
    "IN_PROJ": (128, 128, 11, 8, 4),  # 6.47 vs widening 6.37 us
    "IDX_WQ_B": (128, 128, 4, 8, 4),  # 5.53 vs 5.47
    "WQ_B_TP2": (128, 128, 1, 4, 4),  # 7.18 vs 7.71
    "WO_A_TP2": (128, 128, 8, 8, 4),  # 9.00 vs 12.63
    "WO_B_TP2": (128, 128, 8, 8, 4),  # 9.01 vs 12.64
    "W13_TP2": (128, 128, 8, 8, 4),  # 6.76 vs 6.58
    "W2_TP2": (128, 128, 4, 8, 4),  # 4.59 vs 3.93
}


def generic_config(nt: int, k: int, groups: int, sms: int) -> Cfg:
    """A config for a shape the table lacks: 64-row tiles when they give >= 2 programs per SM, else 32; a K split
    up to about 2 programs per SM (>= 2 BLOCK_K steps each)."""
    bk = 256 if k >= 512 else 128
    bn = 64 if nt >= 64 * 2 * sms else 32
    if groups > 1:
        while bn > 16 and (nt // groups) % bn:
            bn //= 2
    tiles, chunks = -(-nt // bn), -(-k // bk)
    split = max(1, min(chunks // 2, 8, -(-2 * sms // tiles)))
    return bn, bk, split, 4, 4


@cache
def _env_config(name: str) -> Cfg | None | str:
    """DS4F_FP8_GEMV_<name>: "0" -> None (the w8 tiles), five ints -> that config, unset -> "table"."""
    var = f"DS4F_FP8_GEMV_{name}"
    if os.environ.get(var, "") == "0":
        return None
    v = env_knobs(var, 5, "64,256,4,4,4")
    return v if v else "table"  # type: ignore[return-value]


def pick(nt: int, k: int, groups: int, dev: torch.device) -> Cfg | None:
    """The config for W [nt, K] in G groups on dev: env override, then CONFIGS_A8 (with A8) or CONFIGS, then
    generic_config; None = use fp8_gemm's _w8_kernel."""
    for name, (shape, cfg) in CONFIGS.items():
        if shape == (nt, k, groups):
            env = _env_config(name)
            if env == "table" and A8 != "0" and name in CONFIGS_A8 and _e4m3(dev):
                return CONFIGS_A8[name]
            return cfg if env == "table" else env  # type: ignore[return-value]
    return generic_config(nt, k, groups, sm_count(dev))


def _e4m3(dev: torch.device) -> bool:
    """e4m3 MMAs on dev (sm_89+; the interpreter: yes): where the a8 form runs (fp8_gemm.fp8_native)."""
    from ds4f.kernels.fp8_gemm import fp8_native

    return fp8_native(dev)


def use_a8(nt: int, k: int, groups: int) -> bool:
    """Whether W [nt, K] in G groups runs the a8 form (DS4F_FP8_GEMV_A8: "table" = the shapes CONFIGS_A8 lists)."""
    if A8 in ("0", "1"):
        return A8 == "1"
    return any(CONFIGS[name][0] == (nt, k, groups) for name in CONFIGS_A8)


def valid(cfg: Cfg, nt: int, groups: int) -> bool:
    """Whether the kernel can run cfg: BLOCK_N a power of two dividing 128 (one scale row per tile) and each group's
    rows, BLOCK_K a multiple of 128."""
    bn, bk, split, nw, ns = cfg
    return (16 <= bn <= 128 and 128 % bn == 0 and (groups == 1 or (nt // groups) % bn == 0)
            and bk % 128 == 0 and bk >= 128 and split >= 1 and nw in (1, 2, 4, 8, 16) and ns >= 1)


@cache
def _smem(index: int) -> int:
    p = torch.cuda.get_device_properties(index)
    return int(getattr(p, "shared_memory_per_block_optin", 99 * 1024))


def smem_of(dev: torch.device) -> int:
    """Opt-in shared memory per block of dev in bytes (the interpreter: an H200's)."""
    if dev.type != "cuda":
        return 227 << 10
    return _smem(dev.index if dev.index is not None else torch.cuda.current_device())


def fit(cfg: Cfg, smem: int) -> Cfg:
    """Fewer pipeline stages where `smem` bytes (~99 KB on sm_86 / sm_12x, 163 KB on sm_80) cannot hold them: a
    stage is the e4m3 tile [BLOCK_N, BLOCK_K] plus bf16 x [16, BLOCK_K]."""
    bn, bk, split, nw, ns = cfg
    while ns > 2 and ns * (bn + 2 * BLOCK_T) * bk > smem - 4096:
        ns -= 1
    return bn, bk, split, nw, ns


def launch(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
           native: bool, cfg: Cfg, bits: bool | None = None, norm: tuple[torch.Tensor, float] | None = None,
           a8: bool | None = None, act: float | None = None, pdl_on: bool = True) -> None:
    """out [T, G, N] (contiguous) = x [T, G, K] (unit inner stride) @ W^T per group, W = w [G*N, K] e4m3 (uint8 bytes
    when not native) with block scales ws [ceil(G*N/128), ceil(K/128)] fp32 or UE8M0 bytes (e8m0). T <= MAX_T.
    bits: widen e4m3 by integer ops (default WIDEN_BITS on CUDA; the interpreter always converts).
    norm = (g [K], eps), one group: out = RMSNorm_g(x) @ W^T (model.layers.RMSNorm on x's rows; no K split).
    a8 (default use_a8; native only): x quantized per token per 128 columns, e4m3 x e4m3 dot (fp8_linear_a8_ref's
    math; with norm, the quantized rows are g * x, the 1 / rms applied after the dot). act = limit (one group):
    x's rows are the gate halves of rows [gate | up] whose up half sits K elements further (x a [T, 1, K] view of
    h [T, 2K]), and the GEMV's input is their SwiGLU (clamp at limit) rounded to bf16, as glue.swiglu_act.
    pdl_on=False: a plain launch even where PDL is on (a kernel on a side stream: launched early it would hold SM
    slots while it waits, beside the main stream's kernels)."""
    a8 = (use_a8(w.shape[0], w.shape[1], groups) if a8 is None else a8) and native
    t, (nt, k) = x.shape[0], w.shape
    bn, bk, split, nw, ns = fit(cfg, smem_of(x.device))
    if not valid(cfg, nt, groups) or t > MAX_T:
        raise ValueError(f"fp8 GEMV config {cfg} invalid for [{nt}, {k}] in {groups} groups at T={t}")
    chunks = -(-k // bk)
    per = -(-chunks // max(1, split))
    split = -(-chunks // per)  # no empty K slice
    if norm is not None:  # the rows' squares are summed inside one program: the whole of K
        assert groups == 1 and norm[0].shape == (k,) and norm[0].stride(0) == 1, "norm: one group, g [K]"
        split, per = 1, chunks
    tiles = -(-nt // bn)
    if split > 1:
        part = torch.empty(split * t * tiles * bn, dtype=torch.float32, device=x.device)
        lock = arrival.counters(x.device, tiles, ("fp8_gemv", nt, k, bn, split))
    else:
        part = lock = out  # unused
    interp = not x.is_cuda  # every split runs `per` steps: the last one's extra steps masked unless K is even
    _fp8_gemv[(tiles, split)](
        x, w if native else w.view(torch.uint8), ws, out, part, lock, x if norm is None else norm[0], t, nt, k,
        nt // groups, x.stride(0), x.stride(1), ws.stride(0), out.stride(0), per * bk,
        0.0 if norm is None else float(norm[1]), BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=BLOCK_T, SPLIT_K=split > 1,
        EVEN_K=k % bk == 0 and not (interp and chunks % per), NATIVE=native, SCALE_E8M0=e8m0, DOT_F32=interp,
        ITERS=per if interp else 0, BITS=not interp and (WIDEN_BITS if bits is None else bits), NORM=norm is not None,
        A8=a8, ACT=act is not None, up_off=k, limit=0.0 if act is None else float(act), num_warps=nw,
        num_stages=ns, **(pdl.launch(x.device) if pdl_on else dict(PDL=False, launch_pdl=False)))


def linear_norm(x: torch.Tensor, g: torch.Tensor, eps: float, w: torch.Tensor, ws: torch.Tensor, e8m0: bool,
                native: bool) -> torch.Tensor:
    """RMSNorm_g(x [T, K]) @ W^T -> [T, N] bf16 in one launch (W = w [N, K] e4m3 with block scales ws; T <= MAX_T):
    the decode step's q_norm inside wq_b's GEMV. The CUDA-core kernel where it takes the shape
    (fp8_gemv_cc.norm_takes: its tiles, the norm in its prologue), else this kernel at the table's config
    (generic_config where it has none)."""
    from ds4f.kernels import fp8_gemv_cc as cc

    nt, k = w.shape
    if cc.norm_takes(x, nt, k):
        cfg, depth = cc.config(nt, k, 1, sm_count(x.device))
        out = torch.empty(x.shape[0], 1, nt, dtype=torch.bfloat16, device=x.device)
        cc.launch_cc(x.view(x.shape[0], 1, -1), w, ws, e8m0, out, 1, cfg, depth=depth, norm=(g, eps))
        return out.view(x.shape[0], nt)
    return _one_group(x.view(x.shape[0], 1, -1), w, ws, e8m0, native, norm=(g, eps))


def _one_group(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, native: bool,
               **kw: object) -> torch.Tensor:
    """launch(x [T, 1, K], ..., **kw) for one group at the table's config (generic_config where it has none) ->
    [T, N] bf16."""
    nt, k = w.shape
    c = pick(nt, k, 1, x.device) or generic_config(nt, k, 1, sm_count(x.device))
    out = torch.empty(x.shape[0], 1, nt, dtype=torch.bfloat16, device=x.device)
    launch(x, w, ws, e8m0, out, 1, native, c, **kw)  # type: ignore[arg-type]
    return out.view(x.shape[0], nt)


def linear_act(h: torch.Tensor, limit: float, w: torch.Tensor, ws: torch.Tensor, e8m0: bool,
               native: bool) -> torch.Tensor:
    """swiglu_clamp(h [T, 2K] = [gate | up], limit) rounded to bf16, @ W^T -> [T, N] bf16 in one launch (W = w [N, K]
    e4m3 with block scales ws; T <= MAX_T): the shared expert's SwiGLU inside its w2 GEMV. The table's config; a
    plain launch (no PDL): it runs on the shared expert's side stream right behind its w13 GEMV, and launched early
    its programs would wait there holding SM slots the routed up kernel beside it needs (session 17: up ~5 us
    slower per layer in the full TP=2 run)."""
    k = w.shape[1]
    assert h.shape[1] == 2 * k and h.stride(1) == 1, "h: [T, 2K] rows [gate | up]"
    return _one_group(h[:, None, :k], w, ws, e8m0, native, act=limit, pdl_on=False)


def w8_gemv(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
            native: bool, split: int | None = None, force: bool = False, a8: bool | None = None) -> bool:
    """fp8_gemm's w8 entry for T <= MAX_T: out [T, G, N] = x [T, G, K] @ W^T with pick's config (split overrides
    its SPLIT; a8 as launch's). -> False (nothing launched) when the table or env gives this shape to the w8 tiles,
    unless force (then generic_config runs it)."""
    nt, k = w.shape
    from ds4f.kernels import fp8_gemv_cc as cc  # the CUDA-core form (its table's shapes at T = 1: DS4F_FP8_GEMV_CC)
    from ds4f.kernels import fp8_gemv_h2 as h2  # its f16x2 form (its table's shapes, DS4F_FP8_GEMV_H2's buckets)
    from ds4f.kernels import fp8_gemv_mma as mma  # the register-fed MMA form (opt-in: DS4F_FP8_GEMV_MMA=1)

    if split is None and a8 is None and mma.takes(x, nt, k, groups) and w.data_ptr() % 16 == 0:
        mma.launch_mma(x, w, ws, e8m0, out, groups)
        return True
    c2 = h2.choose(x, nt, k, groups) if split is None and a8 is None else None
    if c2 is not None:
        h2.launch_h2(x, w, ws, e8m0, out, groups, c2[0], depth=c2[1])
        return True
    if split is None and a8 is None and cc.takes(x, nt, k, groups):
        cfg, depth = cc.config(nt, k, groups, sm_count(x.device))
        cc.launch_cc(x, w, ws, e8m0, out, groups, cfg, depth=depth)
        return True
    c = pick(nt, k, groups, x.device)
    if c is None:
        if not force:
            return False
        c = generic_config(nt, k, groups, sm_count(x.device))
    if split is not None:
        c = (c[0], c[1], split, c[3], c[4])
    bn = c[0]
    while groups > 1 and bn > 16 and (nt // groups) % bn:  # a table BLOCK_N that does not divide the group
        bn //= 2
    launch(x, w, ws, e8m0, out, groups, native, (bn, *c[1:]), a8=a8)
    return True
