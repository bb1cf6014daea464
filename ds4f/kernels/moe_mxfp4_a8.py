"""⑥ kernels, MXFP4 routed MoE at decode sizes with FP8 activations (sm_89+): moe_mxfp4_decode's two launches, its
grid, tiles, arrival sums and fused pick sum, with an e4m3 x e4m3 tl.dot in place of the bf16 one.

The checkpoint's own scheme (v4-architecture.md 4.2: every FP8 / FP4 GEMM's input is quantized to FP8 per token per
128 columns with a power-of-two scale): each program quantizes its x (up) or a (down) slice per 128 columns with
fp8_gemv.quant_rows (fp8_gemm.quant_act_ref's math). The weight bytes decode to e4m3 with no arithmetic on values:
an e2m1 nibble s|e1 e0|m placed as e4m3 bits s|0 0 e1 e0|m 0 0 is the value times 2^-6 exactly (e1 e0 = 0 lands on
e4m3's subnormals, code 1 = 2^-7 = 0.5 * 2^-6), so a byte's low nibble takes shl / shl / and / lop3 and its high
nibble shr / and / lop3: ~0.9 instructions per weight value against ~2.8-3.3 for the bf16 decode. Low nibbles (even
columns) and high nibbles (odd columns) are two [BLOCK_N, BLOCK_K/2] operands dotted against B_even / B_odd, whose
16 columns hold x split by 32-column scale group as in moe_mxfp4_decode (B[b, j] = xq[2b + r] if b // 16 == j), so
acc[n, j] is row n's partial over group j; per BLOCK_K step it is scaled by 2^(s[n, j] - 127) (weight) times x's
scale of group j's 128-column block, and the 2^6 of the placement is paid once at the end. Products of e4m3 values
are exact in fp32, so this equals dequantize(W) @ dequantize(quant(x)) (fused_moe_mxfp4_a8_ref) up to the order of
the sums and, with 64+-row tiles on Hopper (wgmma), the e4m3 MMA's own reduced-precision sums inside one dot; the
interpreter (F32) runs the same loop with the values decoded in fp32 and matches the oracle exactly.

Measured on an H200 (session 12, bench/results/moe_mxfp4.jsonl): 25.1 vs 26.8 us per layer at one token, 71.0 vs
74.7 at four (TP=2 widths, 6 picks, against the bf16-activation kernels with their SUB decode): it is not bound by
the decode instructions it saves. Against the oracle the end-to-end difference is 1e-3 - 7e-3 with wgmma tiles and
~1e-5 with 32-row (mma.sync) ones; adding the MMA's partials into fp32 every 32 / 64 / 128 columns (tl.dot's
max_num_imprecise_acc) left it at 0.5e-3 - 7e-3 and cost 11-12 % of the time, because the difference is the oracle's
own double rounding of the activation a (bf16, then e4m3 in the down GEMM) turning ~2^-14 differences in the up sums
into whole e4m3 steps on a few elements. The GPU tests therefore check each launch against the oracle apart.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from ds4f.kernels import pdl
from ds4f.kernels.knobs import env_buckets
from ds4f.kernels.moe_mxfp4_decode import bucket, moe_decode

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: moe_mxfp4 never calls in here without triton
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
Cfg = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages (moe_mxfp4_decode's)

# four bytes of packed nibbles ($1) -> the e4m3 bytes (value * 2^-6) of their low (_LO) or high (_HI) nibbles ($0)
_LO = ("{\n.reg .b32 a, b;\nshl.b32 a, $1, 2;\nand.b32 a, a, 0x1C1C1C1C;\nshl.b32 b, $1, 4;\n"
       "and.b32 b, b, 0x80808080;\nor.b32 $0, a, b;\n}\n")
_HI = ("{\n.reg .b32 a, b;\nshr.b32 a, $1, 2;\nand.b32 a, a, 0x1C1C1C1C;\nand.b32 b, $1, 0x80808080;\n"
       "or.b32 $0, a, b;\n}\n")


@cache
def supported(device: torch.device) -> bool:
    """e4m3 tensor-core dots: sm_89 and newer (the interpreter runs the F32 form anywhere)."""
    if _INTERPRET:
        return True
    if device.type != "cuda":
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(i) >= (8, 9)


# (D, I, token bucket) -> (up, down) tiles for this form; bench/sweep_mxfp4_a8.py on an H200, 2026-11-29
# (bench/results/moe_mxfp4.jsonl, case mxfp4_a8_sweep), us per layer for 6 picks, this form at these tiles vs the
# bf16-activation kernels at their table tiles (SUB decode): shapes not listed take moe_mxfp4_decode's tiles
CONFIGS: dict[tuple[int, int, int], tuple[Cfg, Cfg]] = {
    (4096, 1024, 1): ((64, 512, 2, 4, 3), (64, 512, 1, 4, 3)),  # TP=2, with HALF: 21.82 vs 26.57 (session 21)
    (4096, 1024, 4): ((64, 256, 1, 4, 4), (64, 512, 1, 4, 3)),  # 58.63 vs 74.66 (session 21; XB, DOWN_PICKS 2)
}
# session 21 (bench/sweep_mxfp4_a8.py --half, XB on): at four tokens the up tile (64, 256, 1, 4, 4) 58.63 us per layer
# against session 16's (64, 256, 2, 4, 3) 61.22 in the same run (two calls, within 0.1 us of each other); at one
# token (64, 512, 2, 4, 3) with HALF 21.82 against session 16's (64, 256, 4, 4, 3) 22.58. Full model, TP=2 on two
# H200s (bench/results/full.jsonl, session 21 call 4): batch-4 replay 6.950 ms (7.153 in session 20's run of record),
# batch-1 replay 4.801 with the one-token pair against 4.823 without it in the same call
_A8_ENV = os.environ.get("DS4F_MXFP4_DEC_A8", "")
# XB: the up kernel reads x's B operands from one _a8_expand launch per call instead of every (pick, row tile, K
# slice) program quantizing its x slice and storing the operands to shared memory each step (ncu, H200, T=1:
# 1.46 warps per scheduler, 4.9 cycles per issued instruction, a third of the stalls on barriers and shared-memory
# round trips; 1030 -> 747 SASS instructions per step). Same operand bytes, so the same MMAs: bit for bit the
# per-program build (tests/gpu/test_moe_mxfp4_a8_gpu.py). H200, session 16 (bench/results/moe_mxfp4.jsonl): 22.62
# vs 23.82 us per layer at one token, 66.17 vs 69.36 at four (expand launch included); in the 12-layer TP=2 rank
# step (bench/results/full.jsonl) replay 1.469 vs 1.529 ms at one token, 2.065 vs 2.151 at four.
# DS4F_MXFP4_A8_XB=0 reverts.
XB = os.environ.get("DS4F_MXFP4_A8_XB", "1") == "1"
# XB_DOWN: the same for the down kernel's operands of the activation rows a [T*k, I], by one more _a8_expand launch
# between up and down (in the chain: worth it only where the per-program build costs more than a launch); token
# buckets it runs at, DS4F_MXFP4_A8_XB_DOWN="4" (T >= 2: the default), "1,4" (all), "" (none). 12-layer TP=2 rank
# step on an H200 (session 17): replay 2.038 vs 2.065 ms at four tokens, 1.462 vs 1.469 at one (where it is off)
XB_DOWN = env_buckets("DS4F_MXFP4_A8_XB_DOWN", "4")
# HALF: token buckets whose up kernel runs one weight half (gate or up rows) per program (_a8_up_half: 88 instead of
# 122 registers, 31 instead of 47 KB of shared memory at the four-token tile on sm_90; x's operands from _a8_expand
# whatever XB says). DS4F_MXFP4_A8_HALF="1" (the default: one token, with CONFIGS' one-token tile), "1,4", "" none.
# Isolated (session 21) it helps some tiles and not others (four tokens: 62.00 vs 61.22 us at session 16's tile)
HALF = env_buckets("DS4F_MXFP4_A8_HALF", "1")
# DOWN_PICKS: token bucket -> picks per down program (PPP): with 1, each (token, row tile) has k programs of one pick
# and two K steps each (V4-Flash at TP=2: I = 1024, BLOCK_K = 512), whose id -> weight-address -> load chain and
# arrival sums are paid once per 32 KB; with PPP picks one program streams PPP * 32 KB in one pipelined loop.
# H200, session 17 (bench/sweep_mxfp4_a8.py --ppp, bench/results/moe_mxfp4.jsonl), us per layer at the table tiles,
# PPP = 1 / 2 / 3 / 6: T=4 64.5 / 60.7 / 64.0 / 61.0; T=1 22.4 / 27.8 / 32.0 / 46.4 (64 row tiles: too few programs);
# 12-layer TP=2 rank step with 4:2 (bench/results/full.jsonl): replay 1.984 ms at four tokens (2.038 with XB_DOWN
# alone, session 17's first call). DS4F_MXFP4_A8_DOWN_PICKS="4:2" is the default ("1:1,4:6" etc.; "" : 1 everywhere)
def _down_picks_env(v: str) -> dict[int, int]:
    try:
        return {int(b): int(p) for b, p in (kv.split(":") for kv in v.split(",") if kv)}
    except ValueError:
        raise ValueError(f"DS4F_MXFP4_A8_DOWN_PICKS={v!r}: expected bucket:picks pairs such as '1:1,4:2'") from None


DOWN_PICKS = _down_picks_env(os.environ.get("DS4F_MXFP4_A8_DOWN_PICKS", "4:2"))


def down_picks(T: int, k: int) -> int:
    """Picks per down program at T tokens with top-k: DOWN_PICKS for T's bucket where it divides k, else 1."""
    v = DOWN_PICKS.get(bucket(T), 1)
    return v if v >= 1 and k % v == 0 else 1


def a8_default(device: torch.device, D: int, I: int, T: int) -> bool:
    """This form for fused_moe_mxfp4's decode calls without a config: DS4F_MXFP4_DEC_A8=1 (every shape) | 0 (none) if
    set, else the shapes in CONFIGS (the V4-Flash TP=2 widths: 12-layer TP=2 rank step on an H200, replay 1.523 vs
    1.558 ms at one token, 2.191 vs 2.208 at four, bench/results/full.jsonl); sm_89+ only."""
    if not supported(device) or _A8_ENV == "0":
        return False
    return _A8_ENV == "1" or (D, I, bucket(T)) in CONFIGS


def pick(D: int, I: int, T: int, dec: tuple[Cfg, Cfg]) -> tuple[Cfg, Cfg]:
    """This form's tiles for (D, I, T): CONFIGS, else moe_mxfp4_decode's pick `dec`."""
    return CONFIGS.get((D, I, bucket(T)), dec)


def fits(cfgs: tuple[Cfg, Cfg], D: int, I: int) -> bool:
    """BLOCK_K in {128, 256, 512} (whole 128-column quantization blocks) on top of moe_mxfp4_decode.fits."""
    return all(c[1] in (128, 256, 512) for c in cfgs)


if triton is not None:
    from ds4f.kernels.fp8_gemv_kernels import quant_rows
    from ds4f.kernels.moe_mxfp4_decode_kernels import (
        _down_finish,
        _scales,
        _up_arrive,
        _up_finish,
        _up_program,
        _up_setup,
    )

    _LO_C = tl.constexpr(_LO)
    _HI_C = tl.constexpr(_HI)

    @triton.jit
    def _half(q, R: tl.constexpr, F32: tl.constexpr):
        # q [BN, KB] uint8 (two nibbles each) -> nibble R (0: low = even column) as e4m3 = value * 2^-6 [BN, KB]
        # (F32: the same values as fp32)
        if F32:
            c = (q.to(tl.int32) >> (4 * R)) & 15
            mag = c & 7
            v = tl.where(mag >= 2, (2 + (mag & 1)).to(tl.float32) * (1 << (mag >> 1)).to(tl.float32) * 0.25,
                         mag.to(tl.float32) * 0.5)
            return tl.where(c >= 8, -v, v) * 0.015625
        if R == 0:
            return tl.inline_asm_elementwise(_LO_C, "=r,r", [q], dtype=tl.float8e4nv, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(_HI_C, "=r,r", [q], dtype=tl.float8e4nv, is_pure=True, pack=4)

    @triton.jit
    def _xq_t(xp, KB: tl.constexpr, F32: tl.constexpr):
        # x's BLOCK_K = 2 * KB values at xp -> (B_even^T, B_odd^T) [16, KB] (e4m3; F32: fp32): B_r[b, j] =
        # x[2b + r] / s if column 2b + r's scale group (b // 16) is j, else 0; and xs [16] fp32: group j's x scale s
        # (its 128-column block's, j // 4)
        NB: tl.constexpr = 2 * KB // 128
        q, s = quant_rows(tl.reshape(tl.load(xp + tl.arange(0, 2 * KB)).to(tl.float32), [NB, 128]), F32)
        qe, qo = tl.split(tl.reshape(q, [KB, 2]))
        sel = tl.arange(0, 16)[:, None] == (tl.arange(0, KB) // 16)[None, :]
        xs = tl.sum(tl.where((tl.arange(0, 16) // 4)[:, None] == tl.arange(0, NB)[None, :], s[None, :], 0.0), 1)
        if F32:
            return tl.where(sel, qe[None, :], 0.0), tl.where(sel, qo[None, :], 0.0), xs
        # K contiguous: the fp8 MMA's B layout, fed transposed
        return tl.where(sel, qe[None, :], 0.0).to(tl.float8e4nv), tl.where(sel, qo[None, :], 0.0).to(tl.float8e4nv), xs

    @triton.jit
    def _xq(xp, KB: tl.constexpr, F32: tl.constexpr):
        # _xq_t's operands as B [KB, 16]
        be, bo, xs = _xq_t(xp, KB, F32)
        return tl.trans(be), tl.trans(bo), xs

    @triton.jit
    def _xb_at(xb_ptr, xs_ptr, blk, KB: tl.constexpr):
        # K block blk (row-major block index) of _a8_expand's buffers -> pointers of its B_even^T, B_odd^T [16, KB]
        # and of its scales [16]
        p = xb_ptr + blk.to(tl.int64) * (32 * KB) + tl.arange(0, 16)[:, None] * KB + tl.arange(0, KB)[None, :]
        return p, p + 16 * KB, xs_ptr + blk * 16 + tl.arange(0, 16)

    @triton.jit
    def _xb_load(xb_ptr, xs_ptr, blk, KB: tl.constexpr):
        # _xq's (B_even, B_odd, xs) of K block blk from _a8_expand's buffers
        pe, po, ps = _xb_at(xb_ptr, xs_ptr, blk, KB)
        return tl.trans(tl.load(pe)), tl.trans(tl.load(po)), tl.load(ps)

    @triton.jit
    def _a8_expand(x_ptr, xb_ptr, xs_ptr, s_xt, DM: tl.constexpr, BLOCK_K: tl.constexpr, F32: tl.constexpr,
                   PDL: tl.constexpr = False):
        # program (token t, K block kb): _xq_t of x[t, kb * BLOCK_K:][:BLOCK_K] -> xb [T, DM / BLOCK_K, 2, 16,
        # BLOCK_K / 2] (e4m3; F32: fp32) and xs [T, DM / BLOCK_K, 16] fp32: the up kernels' B operands, built once
        # per token instead of once per (pick, row tile, K slice) program
        pdl_enter(PDL)
        t = tl.program_id(0)
        kb = tl.program_id(1)
        KB: tl.constexpr = BLOCK_K // 2
        be, bo, xs = _xq_t(x_ptr + t.to(tl.int64) * s_xt + kb * BLOCK_K, KB, F32)
        pe, po, ps = _xb_at(xb_ptr, xs_ptr, t * (DM // BLOCK_K) + kb, KB)
        tl.store(pe, be)
        tl.store(po, bo)
        tl.store(ps, xs)

    @triton.jit
    def _gdot8(q, be, bo, F32: tl.constexpr):
        # [BN, KB] packed bytes . (B_even, B_odd) -> [BN, 16] fp32 partials per scale group (times 2^-6)
        acc = tl.dot(_half(q, 0, F32), be, tl.zeros([q.shape[0], 16], tl.float32))
        return tl.dot(_half(q, 1, F32), bo, acc)

    @triton.jit
    def _a8_up_half(q_ptr, s_ptr, ids_ptr, a_ptr, part_ptr, lock_ptr, limit, s_qe, s_qn, s_se, s_sn, s_at,
                    I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, F32: tl.constexpr, xb_ptr, xs_ptr):
        # _a8_up's HALF program (pick m, row tile n, (slice s, half h)): one weight tile, one scale set and one
        # accumulator per step instead of two (the per-thread registers and shared-memory stages that capped the
        # two-half program at 2 blocks per SM); x's operands from _a8_expand (XB). Both halves' partials go to
        # [M, SPLIT, 2, I], met by _up_arrive over the tile's 2 * SPLIT programs
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        s = tl.program_id(2) // 2
        h = tl.program_id(2) % 2
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        e = tl.load(ids_ptr + pid_m).to(tl.int64)
        r64 = (rn + h * I).to(tl.int64)[:, None]
        KB: tl.constexpr = BLOCK_K // 2
        K_PER: tl.constexpr = DM // SPLIT
        NS: tl.constexpr = K_PER // BLOCK_K
        NG: tl.constexpr = BLOCK_K // 32
        k0 = s * K_PER
        qg = q_ptr + e * s_qe + r64 * s_qn + k0 // 2 + tl.arange(0, KB)[None, :]
        sg = s_ptr + e * s_se + r64 * s_sn + k0 // 32 + tl.arange(0, 16)[None, :]
        acc = tl.zeros([BLOCK_N, 16], tl.float32)
        f_n = _scales(sg, NG, True, False)
        for kb in range(0, NS):
            f = f_n
            f_n = _scales(sg + (kb + 1) * NG, NG, kb + 1 < NS, False)
            be, bo, xs = _xb_load(xb_ptr, xs_ptr, (pid_m // TOPK) * (DM // BLOCK_K) + k0 // BLOCK_K + kb, KB)
            acc += _gdot8(tl.load(qg + kb * KB), be, bo, F32) * (f * xs[None, :])
        pp = part_ptr + pid_m.to(tl.int64) * (SPLIT * 2 * I) + rn
        tl.store(pp + s * (2 * I) + h * I, tl.sum(acc, 1) * 64.0)
        _up_arrive(pp, a_ptr, lock_ptr, limit, s_at, pid_m, pid_n, rn, I, SPLIT, 2 * SPLIT, F32)

    @triton.jit
    def _a8_up(
        x_ptr, q_ptr, s_ptr, ids_ptr, a_ptr, part_ptr, lock_ptr, limit, s_xt, s_qe, s_qn, s_se, s_sn, s_at,
        I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr = False, XB: tl.constexpr = False,
        xb_ptr=None, xs_ptr=None, HALF: tl.constexpr = False,
    ):
        # moe_mxfp4_decode._dec_up's program (pick m, BLOCK_N gate rows + the same up rows, K slice pid_s) over
        # bytes: I % BLOCK_N == 0, DM % (SPLIT * BLOCK_K) == 0, BLOCK_K in {128, 256, 512}. HALF: the grid's third
        # axis is 2 * SPLIT, program (s, h) streams only the gate (h = 0) or the up (h = 1) rows of slice s
        pdl_enter(PDL)
        if HALF:
            _a8_up_half(q_ptr, s_ptr, ids_ptr, a_ptr, part_ptr, lock_ptr, limit, s_qe, s_qn, s_se, s_sn, s_at, I,
                        DM, TOPK, BLOCK_N, BLOCK_K, SPLIT, F32, xb_ptr, xs_ptr)
            return
        pid_m, pid_n, pid_s, e, rn, r64, k0 = _up_program(ids_ptr, DM, BLOCK_N, SPLIT)
        KB: tl.constexpr = BLOCK_K // 2
        K_PER: tl.constexpr = DM // SPLIT
        qg, sg, xp, acc_g, acc_u, fg_n, fu_n = _up_setup(q_ptr, s_ptr, x_ptr, e, r64, k0, pid_m, s_qe, s_qn, s_se,
                                                         s_sn, s_xt, I, TOPK, BLOCK_N, BLOCK_K, 2, False)
        NS: tl.constexpr = K_PER // BLOCK_K
        NG: tl.constexpr = BLOCK_K // 32
        for kb in range(0, NS):
            fg = fg_n
            fu = fu_n
            fg_n = _scales(sg + (kb + 1) * NG, NG, kb + 1 < NS, False)  # a step ahead (see _dec_up)
            fu_n = _scales(sg + I * s_sn + (kb + 1) * NG, NG, kb + 1 < NS, False)
            if XB:  # _a8_expand's operands of this K block
                be, bo, xs = _xb_load(xb_ptr, xs_ptr, (pid_m // TOPK) * (DM // BLOCK_K) + k0 // BLOCK_K + kb, KB)
            else:
                be, bo, xs = _xq(xp + kb * BLOCK_K, KB, F32)
            wg = tl.load(qg + kb * KB)
            wu = tl.load(qg + I * s_qn + kb * KB)
            acc_g += _gdot8(wg, be, bo, F32) * (fg * xs[None, :])
            acc_u += _gdot8(wu, be, bo, F32) * (fu * xs[None, :])
        _up_finish(tl.sum(acc_g, 1) * 64.0, tl.sum(acc_u, 1) * 64.0, a_ptr, part_ptr, lock_ptr, limit, s_at, pid_m,
                   pid_n, pid_s, rn, I, SPLIT, F32)

    @triton.jit
    def _a8_down(
        a_ptr, q_ptr, s_ptr, ids_ptr, tw_ptr, sh_ptr, out_ptr, part_ptr, lock_ptr, s_at, s_qe, s_qn, s_se, s_sn,
        s_sht, s_ot, DM: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, HAS_SH: tl.constexpr, F32: tl.constexpr,
        PDL: tl.constexpr = False, XB: tl.constexpr = False, xb_ptr=None, xs_ptr=None, PPP: tl.constexpr = 1,
        OUT_F32: tl.constexpr = False,
    ):
        # moe_mxfp4_decode._dec_down's program ((token t, BLOCK_N rows of D), (pick group g, K slice)) over bytes,
        # a's slice quantized per 128 columns: DM % BLOCK_N == 0, I % (SPLIT * BLOCK_K) == 0, TOPK % PPP == 0;
        # XB: a's operands from _a8_expand over the activation rows (XB_DOWN). PPP picks per program (DOWN_PICKS): one
        # loop over (pick, K block) steps, so the weight loads of the next pick are in flight while this one's
        # finish; pick j's partial is summed into y in pick order; the arrival sums add the TOPK / PPP groups' y
        # (none: PPP = TOPK, SPLIT = 1, the program stores out itself)
        pdl_enter(PDL)
        pid_tn = tl.program_id(0)
        pid_js = tl.program_id(1)
        NT: tl.constexpr = DM // BLOCK_N
        KB: tl.constexpr = BLOCK_K // 2
        K_PER: tl.constexpr = I // SPLIT
        t = pid_tn // NT
        rn = (pid_tn % NT) * BLOCK_N + tl.arange(0, BLOCK_N)
        m0 = t * TOPK + (pid_js // SPLIT) * PPP
        k0 = (pid_js % SPLIT) * K_PER
        r64 = rn.to(tl.int64)[:, None]
        NS: tl.constexpr = K_PER // BLOCK_K
        NG: tl.constexpr = BLOCK_K // 32
        acc = tl.zeros([BLOCK_N, 16], tl.float32)
        y = tl.zeros([BLOCK_N], tl.float32)
        e_n = tl.load(ids_ptr + m0).to(tl.int64)
        fd_n = _scales(s_ptr + e_n * s_se + r64 * s_sn + k0 // 32 + tl.arange(0, 16)[None, :], NG, True, False)
        for i in range(0, PPP * NS):
            m = m0 + i // NS
            kb = i % NS
            e = e_n
            fd = fd_n
            # the next step's scales a step ahead (see _dec_up); its pick's id with them
            live = i + 1 < PPP * NS
            e_n = tl.load(ids_ptr + m0 + (i + 1) // NS, mask=live, other=0).to(tl.int64)
            fd_n = _scales(s_ptr + e_n * s_se + r64 * s_sn + k0 // 32 + ((i + 1) % NS) * NG + tl.arange(0, 16)[None, :],
                           NG, live, False)
            if XB:
                be, bo, xs = _xb_load(xb_ptr, xs_ptr, m * (I // BLOCK_K) + k0 // BLOCK_K + kb, KB)
            else:
                be, bo, xs = _xq(a_ptr + m.to(tl.int64) * s_at + k0 + kb * BLOCK_K, KB, F32)
            wd = tl.load(q_ptr + e * s_qe + r64 * s_qn + k0 // 2 + kb * KB + tl.arange(0, KB)[None, :])
            acc += _gdot8(wd, be, bo, F32) * (fd * xs[None, :])
            if PPP > 1:  # pick m's last step: its weighted partial into y, acc restarts
                done = kb == NS - 1
                y += tl.where(done, tl.sum(acc, 1) * (64.0 * tl.load(tw_ptr + m)), 0.0)
                acc = tl.where(done, 0.0, acc)
        if PPP == 1:
            y = tl.sum(acc, 1) * (64.0 * tl.load(tw_ptr + m0))
        _down_finish(y, sh_ptr, out_ptr, part_ptr, lock_ptr, s_sht, s_ot, t, pid_tn, pid_js, rn, DM, TOPK // PPP,
                     SPLIT, HAS_SH, F32, OUT_F32)


def expand_x(x: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MMA B operands of x's rows [T, D] built once per row (_a8_expand; the up kernel's of x with XB, the down
    kernel's of the activation rows with XB_DOWN): -> (xb [T, D / block_k, 2, 16, block_k / 2] e4m3 (fp32 in the
    interpreter), xs [T, D / block_k, 16] fp32)."""
    T, D = x.shape
    nkb, f32 = D // block_k, _INTERPRET or x.device.type != "cuda"
    xb = torch.empty(T, nkb, 2, 16, block_k // 2, dtype=torch.float32 if f32 else torch.float8_e4m3fn,
                     device=x.device)
    xs = torch.empty(T, nkb, 16, dtype=torch.float32, device=x.device)
    _a8_expand[(T, nkb)](x, xb, xs, x.stride(0), DM=D, BLOCK_K=block_k, F32=int(f32), **pdl.launch(x.device))
    return xb, xs


def moe_decode_a8(x: torch.Tensor, w13: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor],
                  ids: torch.Tensor, weights: torch.Tensor, limit: float, shared_out: torch.Tensor | None,
                  cfgs: tuple[Cfg, Cfg], shared_ready: Any = None,
                  act_out: list[torch.Tensor] | None = None, out_f32: bool = False, x_side: Any = None) -> torch.Tensor:
    """moe_mxfp4_decode.moe_decode with these kernels (no asm / sub: the e4m3 placement has one form); cfgs must
    also pass fits() here; act_out: a list that receives the activation rows a [T*k, I] bf16 (tests check the two
    launches apart); out_f32: the pick sum in fp32 (shared_out None: the caller adds it); x_side: moe_decode's.
    -> [T, D] bf16 (fp32)."""
    return moe_decode(x, w13, w2, ids, weights, limit, shared_out, cfgs, False, shared_ready=shared_ready, form="a8",
                      act_out=act_out, out_f32=out_f32, x_side=x_side)


def fused_moe_mxfp4_a8_ref(x: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor,
                           w2_scale: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                           swiglu_limit: float) -> torch.Tensor:
    """Pure-torch oracle of moe_decode_a8 (moe_mxfp4.fused_moe_mxfp4_ref's arguments, no shared expert): x and each
    pick's bf16 activation quantized by fp8_gemm.quant_act_ref (pow2 scales per 128 columns) and dequantized, then
    the reference's fp32 math on the dequantized experts."""
    from ds4f.kernels.fp8_gemm import quant_act_ref
    from ds4f.kernels.ref import swiglu_clamp
    from ds4f.model.quant import dequant_mxfp4

    def dq(v: torch.Tensor) -> torch.Tensor:
        q, s = quant_act_ref(v)
        return (q.float().view(v.shape[0], -1, 128) * s[:, :, None]).view(v.shape)

    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    xq = dq(x)
    flat = ids.reshape(-1).long()
    for e in flat.unique().tolist():
        pos = (flat == e).nonzero().squeeze(1)
        tok = pos // k
        w13 = dequant_mxfp4(w13_q[e], w13_scale[e], torch.float32, name=f"w13[{e}]")
        w2 = dequant_mxfp4(w2_q[e], w2_scale[e], torch.float32, name=f"w2[{e}]")
        a = swiglu_clamp(xq[tok] @ w13.t(), swiglu_limit).to(x.dtype)
        out.index_add_(0, tok, (dq(a) @ w2.t()) * weights.reshape(-1)[pos].float()[:, None])
    return out.to(x.dtype)
