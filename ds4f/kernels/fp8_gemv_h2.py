"""⑥ kernels, block-FP8 decode GEMV with f16x2 products for 1-4 tokens (sm_89+): fp8_gemv_cc's contract, grid,
register layout and K split, with fewer instructions per weight byte.

Why: fp8_gemv_cc is issue-bound at four tokens (9.2 SASS instructions per weight byte in its sm_90 loop with bf16x2
products, against ~7.8 that an H200 SM issues per byte at the copy ceiling), so four-token decode takes the MMA
kernel, whose GEMVs cost 0.78 ms more per step than one token's in the full TP=2 model (session 22's timelines: FP8
GEMVs 2.07 vs 1.29 ms) for the same weight bytes. Same grid and register layout as fp8_gemv_cc (two int32 words, 8
weight bytes, per thread per row and 128-column block); cvt.rn.f16x2.e4m3x2 widens each word to two f16x2 pairs
(exact), scaled by 2^-8 (exact: e4m3's 2^-9 subnormal lands at 2^-17, inside f16's range) so that a chain of eight
products stays finite for |x| < ~4600; x's words become f16x2 once per token per thread (an unmasked load that the
compiler shares across the thread's rows; bf16 -> f16 is exact for |x| in [2^-14, 65504], smaller values become f16
subnormals, absolute error <= 2^-25); a mul and three fma.rn.f16x2 per token give a thread's 8-column partial in two
f16 lanes, added in f16, widened, and scaled by the block's scale into an fp32 accumulator. Offline sm_90 SASS of the
loop at 64-row tiles: 6.5 instructions per weight byte at four tokens (fp8_gemv_cc 9.2), 3.2 at one (4.7).

Numerics: the w8 form (x not quantized), products and 4-term chains rounded to f16 (relative 2^-11 per rounding):
against fp8_gemm.fp8_linear_ref ~1e-3 relative, tighter than fp8_gemv_cc's ACC16 (bf16 pairs, 2.5e-3) and the a8
MMA form (x in e4m3, ~2.6e-2). The interpreter (F32) rounds each step to f16 from its exact fp32 value (the GPU's
fma rounds once: the two agree but for rare double-rounding ties).
"""

from __future__ import annotations

import os
from functools import cache

import torch

from ds4f.kernels import pdl
from ds4f.kernels.fp8_gemv_cc import entry_for, table_entry
from ds4f.kernels.fp8_gemv_rows import Cfg, split_buffers, token_slots, valid, x_ok
from ds4f.kernels.knobs import env_buckets, env_knobs

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.fp8_gemv_rows import _finish, _program, _rotate, _step
    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: fp8_gemm takes its reference first
    triton = None

# DS4F_FP8_GEMV_H2: token buckets (1: one token, 4: two to four) whose plain FP8 decode GEMVs take this form where
# CONFIGS_H2 lists the shape at that bucket (every table shape with DS4F_FP8_GEMV_H2_TILES); "" none. Default "1":
# full model, TP=2 on two H200s, session 22 call 5 (one call, b1 at depth 64): replay 4.662 vs 4.698 ms
BUCKETS = frozenset(env_buckets("DS4F_FP8_GEMV_H2", "1"))
# DS4F_FP8_GEMV_H2_TILES: "bn,split,nw,depth" for every table shape (sweeps); else CONFIGS_H2
_TILES = env_knobs("DS4F_FP8_GEMV_H2_TILES", 4, "64,2,4,1")
# name (fp8_gemv.CONFIGS' shape) -> token bucket -> (BLOCK_N, SPLIT, num_warps, DEPTH): where this form beat today's
# default on an H200 (session 22 call 4, bench/sweep_fp8_gemv_h2.py, bench/results/fp8_gemv.jsonl case fp8_gemv_h2;
# us against the default's). Not listed (slower, or a tie): one token WQ_B_TP2 6.78 vs 6.49, WO_A / WO_B_TP2 7.27 /
# 7.29 vs 7.05 / 7.02 (the CUDA-core kernel, already ~0.56-0.60 of copy there), W13_TP2 5.21 vs 5.25 (a tie); four
# tokens every shape 1.17-1.28x the MMA kernel's time (IN_PROJ 8.06 vs 6.57, WO_B_TP2 11.62 vs 9.03, W13_TP2 8.78 vs
# 6.84): 6.5 instructions per byte is still near an SM's issue rate at these occupancies
CONFIGS_H2: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "IN_PROJ": {1: (32, 8, 8, 2)},  # 4.38 vs 4.89 us (fp8_gemv_cc)
    "IDX_WQ_B": {1: (64, 4, 4, 1)},  # 4.64 vs 4.85
    "W2_TP2": {1: (64, 4, 4, 2)},  # 3.39 vs 3.57
}

# int32 word of 4 e4m3 bytes ($2) -> two f16x2 ($0: bytes 0, 1; $1: bytes 2, 3; the lower byte in the lower half),
# each value times 2^-8
DEC_ASM = """{
.reg .b16 a, b;
.reg .b32 k;
mov.b32 {a, b}, $2;
mov.b32 k, 0x1C001C00;
cvt.rn.f16x2.e4m3x2 $0, a;
cvt.rn.f16x2.e4m3x2 $1, b;
mul.rn.f16x2 $0, $0, k;
mul.rn.f16x2 $1, $1, k;
}"""

# int64 word of 4 bf16 ($2) -> two f16x2 ($0: columns 0, 1; $1: 2, 3)
X16_ASM = """{
.reg .b32 lo, hi, a, b, c, d;
mov.b64 {lo, hi}, $2;
shl.b32 a, lo, 16;
and.b32 b, lo, 0xFFFF0000;
shl.b32 c, hi, 16;
and.b32 d, hi, 0xFFFF0000;
cvt.rn.f16x2.f32 $0, b, a;
cvt.rn.f16x2.f32 $1, d, c;
}"""

# a thread's two adjacent words (pack 2: elements e0, e1 = 8 columns): weight pairs w01 ($2, $3 for e0, e1), w23
# ($4, $5) against x pairs x01 ($6, $7), x23 ($8, $9) in one f16x2 chain (a mul, three fmas), its two lanes added in
# f16 -> fp32 in $0 and $1 alike (the caller keeps one per word pair)
DOT8_ASM = """{
.reg .b32 acc;
.reg .b16 l, h;
mul.rn.f16x2 acc, $2, $6;
fma.rn.f16x2 acc, $4, $8, acc;
fma.rn.f16x2 acc, $3, $7, acc;
fma.rn.f16x2 acc, $5, $9, acc;
mov.b32 {l, h}, acc;
add.rn.f16 l, l, h;
cvt.f32.f16 $0, l;
mov.b32 $1, $0;
}"""

if triton is not None:
    _DEC_C = tl.constexpr(DEC_ASM)
    _X16_C = tl.constexpr(X16_ASM)
    _DOT8_C = tl.constexpr(DOT8_ASM)

    @triton.jit
    def _h(v):
        # fp32 -> its nearest f16 value, as fp32
        return v.to(tl.float16).to(tl.float32)

    @triton.jit
    def _byte(wq, j: tl.constexpr):
        # byte j of int32 words as its e4m3 value * 2^-8 (fp32)
        return ((wq >> (8 * j)) & 255).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32) * 0.00390625

    @triton.jit
    def _xcol(xw, j: tl.constexpr):
        # bf16 j of int64 words as its nearest f16 value (fp32)
        return _h((((xw >> (16 * j)) & 65535).to(tl.int32) << 16).to(tl.float32, bitcast=True))

    @triton.jit
    def _pairs16(wq):
        # int32 weight words [BN, 32] -> their f16x2 pairs (bytes 0, 1) and (2, 3), * 2^-8
        return tl.inline_asm_elementwise(_DEC_C, "=r,=r,r", [wq], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)

    @triton.jit
    def _xwords16(x_p, BN: tl.constexpr):
        # the int64 x words (4 bf16) at x_p in a [BN, 32] tile of row stride 0 (fp8_gemv_cc._xwords' layout: the
        # weight words' registers, each thread's copies from L1). Unmasked (the caller clamps the row): every row's
        # load is the same plain load, so the compiler keeps one per thread, and one f16 conversion of it
        return tl.load(x_p + tl.zeros([BN, 1], tl.int32) + tl.arange(0, 32)[None, :])

    @triton.jit
    def _dot8_f32(wq, xw, BN: tl.constexpr):
        # the interpreter's _dot8: the same chain (lanes: even / odd columns; e0's pairs, then e1's) with each f16
        # rounding written out, on the values in fp32
        w0, w1 = tl.split(tl.reshape(wq, [BN, 16, 2]))
        x0, x1 = tl.split(tl.reshape(xw, [BN, 16, 2]))
        lo = _h(_byte(w0, 0) * _xcol(x0, 0))
        hi = _h(_byte(w0, 1) * _xcol(x0, 1))
        lo = _h(_byte(w0, 2) * _xcol(x0, 2) + lo)
        hi = _h(_byte(w0, 3) * _xcol(x0, 3) + hi)
        lo = _h(_byte(w1, 0) * _xcol(x1, 0) + lo)
        hi = _h(_byte(w1, 1) * _xcol(x1, 1) + hi)
        lo = _h(_byte(w1, 2) * _xcol(x1, 2) + lo)
        hi = _h(_byte(w1, 3) * _xcol(x1, 3) + hi)
        return _h(lo + hi)

    @triton.jit
    def _tok(acc, wq, w01, w23, x_p, s, BN: tl.constexpr, F32: tl.constexpr):
        # acc [BN, 16] += s * the 8-column chains of the weight words against the x row at x_p
        xw = _xwords16(x_p, BN)
        if F32:
            return acc + _dot8_f32(wq, xw, BN) * s
        x01, x23 = tl.inline_asm_elementwise(_X16_C, "=r,=r,l", [xw], dtype=(tl.int32, tl.int32), is_pure=True,
                                             pack=1)
        p = tl.inline_asm_elementwise(_DOT8_C, "=r,=r,r,r,r,r,r,r,r,r", [w01, w23, x01, x23], dtype=tl.float32,
                                      is_pure=True, pack=2)
        p0, _ = tl.split(tl.reshape(p, [BN, 16, 2]))
        return acc + p0 * s

    @triton.jit(do_not_specialize=["T"])
    def _gemv_h2(
        x_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, T, NT, K, GN, s_xt, s_xg, s_wsn, s_ot, k_per,
        BLOCK_N: tl.constexpr, TP: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_E8M0: tl.constexpr,
        F32: tl.constexpr, PDL: tl.constexpr = False, DEPTH: tl.constexpr = 1,
    ):
        # program (pid_n, pid_s): rows [n0, n0 + BLOCK_N) (one group, one 128-row scale block) over the 128-column
        # blocks [k_lo, k_lo + k_per); TP (1, 2, 4) >= T tokens, one fp32 accumulator [BLOCK_N, 16] each (a thread's
        # 8-column chain sums, scaled per block; summed once at the end). fp8_gemv_cc._gemv_cc's grid and register
        # layout: w as int32 words [NT, K / 4], 2 per thread (8 bytes), x as int64 words [T, G, K / 4] (word strides)
        pid_n, pid_s, n0, rn, k_lo, w_p, x_p, s_p, steps, wq, sq, wq2, sq2 = _program(
            x_ptr, w_ptr, ws_ptr, NT, K, GN, s_xg, s_wsn, k_per, BLOCK_N, DEPTH)
        a0 = tl.zeros([BLOCK_N, 16], tl.float32)
        a1 = tl.zeros([BLOCK_N, 16], tl.float32)
        a2 = tl.zeros([BLOCK_N, 16], tl.float32)
        a3 = tl.zeros([BLOCK_N, 16], tl.float32)
        pdl_enter(PDL)
        for i in range(0, steps):
            wn, sn, s = _step(w_p, s_p, sq, i, steps, DEPTH, SCALE_E8M0)
            s = s * 256.0  # the decode's 2^-8
            w01 = wq
            w23 = wq
            if not F32:
                w01, w23 = _pairs16(wq)
            xi = x_p + i * 32  # tokens past T read row T - 1 again (their rows are not stored)
            a0 = _tok(a0, wq, w01, w23, xi, s, BLOCK_N, F32)
            if TP > 1:
                a1 = _tok(a1, wq, w01, w23, xi + tl.minimum(1, T - 1) * s_xt, s, BLOCK_N, F32)
            if TP > 2:
                a2 = _tok(a2, wq, w01, w23, xi + tl.minimum(2, T - 1) * s_xt, s, BLOCK_N, F32)
                a3 = _tok(a3, wq, w01, w23, xi + tl.minimum(3, T - 1) * s_xt, s, BLOCK_N, F32)
            wq, sq, wq2, sq2 = _rotate(wq, sq, wq2, sq2, wn, sn, DEPTH)
        _finish(a0, a1, a2, a3, out_ptr, part_ptr, lock_ptr, T, NT, s_ot, pid_n, pid_s, rn, BLOCK_N, TP, SPLIT_K)


@cache
def supported(device: torch.device) -> bool:
    """cvt.rn.f16x2.e4m3x2: sm_89 and newer (the interpreter runs the F32 form anywhere)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if device.type != "cuda":
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(i) >= (8, 9)


def config(nt: int, k: int, groups: int, t: int) -> tuple[Cfg, int] | None:
    """(tiles, DEPTH) for the shape at t tokens: DS4F_FP8_GEMV_H2_TILES for a table shape where valid, else
    CONFIGS_H2's entry for t's bucket; None: neither."""
    e = (_TILES if table_entry(nt, k, groups) is not None else None) or (
        entry_for(CONFIGS_H2, nt, k, groups) or {}).get(1 if t == 1 else 4)
    return (e[:3], e[3]) if e is not None and valid(e[:3], nt, k, groups) else None


def choose(x: torch.Tensor, nt: int, k: int, groups: int) -> tuple[Cfg, int] | None:
    """(tiles, DEPTH) if w8_gemv runs x [T, G, K] @ W [nt, k]^T here: T <= 4 in a bucket of DS4F_FP8_GEMV_H2, a
    config for the shape there (config), sm_89+, x_ok; else None."""
    t = x.shape[0]
    if not (1 <= t <= 4 and (1 if t == 1 else 4) in BUCKETS and x_ok(x) and supported(x.device)):
        return None
    return config(nt, k, groups, t)


def takes(x: torch.Tensor, nt: int, k: int, groups: int) -> bool:
    """Whether w8_gemv runs x [T, G, K] @ W [nt, k]^T here (choose)."""
    return choose(x, nt, k, groups) is not None


def launch_h2(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
              cfg: Cfg, depth: int = 1, emulate: bool = False) -> None:
    """out [T, G, N] (contiguous) = x [T, G, K] (unit inner stride) @ W^T per group; W = w [G*N, K] e4m3 (native
    dtype or its bytes), ws [ceil(G*N/128), K/128] fp32 or UE8M0 bytes (e8m0); T <= 4; cfg valid() (fp8_gemv_cc's
    rules). emulate: the interpreter's branch (the f16 roundings written out) on CUDA too, for tests."""
    t, (nt, k) = x.shape[0], w.shape
    if t > 4 or not valid(cfg, nt, k, groups) or not x_ok(x):
        raise ValueError(f"fp8 f16x2 GEMV config {cfg} invalid for [{nt}, {k}] in {groups} groups at T={t}")
    bn, split, nw = cfg
    part, lock = split_buffers(x, out, nt // bn, bn, split, ("fp8_gemv_h2", nt, k, bn, split))
    _gemv_h2[(nt // bn, split)](
        x.view(torch.int64), w.view(torch.uint8).view(torch.int32), ws, out, part, lock, t, nt, k, nt // groups,
        x.stride(0) // 4, x.stride(1) // 4, ws.stride(0), out.stride(0), k // split, BLOCK_N=bn,
        TP=token_slots(t), SPLIT_K=split > 1, SCALE_E8M0=e8m0,
        F32=emulate or not x.is_cuda, DEPTH=depth, num_warps=nw, num_stages=1, **pdl.launch(x.device))
