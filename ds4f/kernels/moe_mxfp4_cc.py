"""⑥ kernels, MXFP4 routed MoE at decode sizes on the CUDA cores: moe_mxfp4_decode's two launches, grid, arrival
sums and fused pick sum (its _up_finish / _down_finish), with fp8_gemv_cc's streaming in place of tensor-core dots.

Why: the decode MoE kernels (moe_mxfp4_a8's e4m3 MMAs) run at ~0.43 (one token) to ~0.57 (four tokens) of the copy
ceiling in the TP=2 step (session 18), the MoE sublayer being ~80 us per layer at four tokens; each pick is one
token's row, so the MMA's 16 columns are padding, and its tiles go through shared memory with barriers each step.
fp8_gemv_cc's form (weights as int32 words straight into registers, one or two 256-column blocks in flight, no shared
memory or barriers in the loop) ran the FP8 GEMVs of one token at 0.51-0.92x the MMA kernel's time.

Lane j of a [BN, 64] tile holds 16-bit weight word j of a 256-column block (4 nibbles: columns c = 4j..4j+3) and x's
int64 word j (the same 4 columns in bf16; a tile of row stride 0, loaded once per thread for all its rows): two of
each per thread, so weights (4-byte loads, a row's 128 bytes per warp instruction) and x share one register layout
and nothing crosses shared memory in the loop. Two PTX routines per pair of lanes (x_asm on x alone, so a thread's
rows share it; word_asm on the weights): nibble r of both words into a bf16 pair of value * 2^-126 against
x * 2^100 (moe_mxfp4_decode's SUB scaling; DS4F_MXFP4_CC_SUB=0: the exact values against x), two chains of
fma.rn.bf16x2 per word (columns c, c+1 and c+2, c+3: products rounded to bf16, then one bf16 sum, as fp8_gemv_cc's
ACC16), the chains added in fp32 and multiplied by the word's 32-column UE8M0 scale (loaded in the routine); an fp32
accumulator [BN, 64] per row and lane, summed over lanes once at the end. Offline sm_90 SASS of the main loop (K
slices of 16 blocks): 9.6-10.7 instructions per weight byte at every tile (an issue bound near 3.3 TB/s, ~0.78 of
the H200's copy); up tiles of 32 rows take 177 (DEPTH 1) to 226 (DEPTH 2) registers at 4 warps, ~100 at 8, and spill
with 64 rows at 4 warps or 32 at 2 (see bench/sweep_mxfp4_a8.py's CC_TILES). Scales must be <= 228 and |x| < 2^27
(the SUB scaling). Against fused_moe_mxfp4_ref (x in bf16, fp32 math) the bf16 products cost ~2^-9 each: 4.9e-3
relative error of the outputs at the V4-Flash TP=2 width (random experts, CPU, cc_ref), against 5.4e-2 for the a8
MMA form's oracle (x and the activation quantized to e4m3); cc_ref writes the same roundings out in torch, and the
interpreter runs them (F32) for the CPU tests.

Tiles: moe_mxfp4_decode's Cfg with BLOCK_K = 256 (64 words per row per step) and num_stages read as DEPTH (1 or
2 blocks in flight); fused_moe_mxfp4 takes this form with config CC=1 (DEC the tiles) or, without a config,
DS4F_MXFP4_CC=1 (opt-in) at CONFIGS' tiles. Timed (H200, session 19, bench/sweep_mxfp4_a8.py --cc --tp 2,
bench/results/moe_mxfp4.jsonl): best 27.3 us vs 22.4 for the a8 kernels at one token, 93.6 vs 60.9 at four: it loses.
"""

from __future__ import annotations

import os

import torch

from ds4f.kernels.moe_mxfp4_decode import bucket

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.moe_mxfp4_decode_kernels import _down_finish, _down_program, _round_bf16, _up_finish, _up_program
    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: moe_mxfp4 never calls in here without triton
    triton = None

Cfg = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K (256), SPLIT, num_warps, DEPTH
BLOCK_K = 256
# (D, I, token bucket) -> (up, down) tiles: first guesses (fp8_gemv_cc's best TP=2 tiles were 32-64 rows, 4-8 K
# slices, two blocks in flight; offline sm_90 builds of these: 128 / 72 registers, no spills); session 19's sweep
# (bench/sweep_mxfp4_a8.py --cc) had 31.3 / 101.8 us for them at T = 1 / 4, its best 27.3 / 93.6 at
# up (32, 256, 16, 4, 1), down (32, 256, 4, 4, 1)
CONFIGS: dict[tuple[int, int, int], tuple[Cfg, Cfg]] = {
    (4096, 1024, 1): ((32, 256, 8, 4, 2), (32, 256, 2, 4, 2)),
    (4096, 1024, 4): ((32, 256, 8, 4, 2), (32, 256, 2, 4, 2)),
}
ENABLED = os.environ.get("DS4F_MXFP4_CC", "0") == "1"

# SUB (DS4F_MXFP4_CC_SUB, default 1): the weights decoded as value * 2^-126 against x * 2^100 (no decode multiply;
# the e2m1 code 1 is then a bf16 subnormal, so exact only if the bf16x2 FMAs take subnormal inputs: the GPU tests
# check both forms); 0: the exact bf16 values (a multiply by 2^126 per pair) against x as it is
SUB = os.environ.get("DS4F_MXFP4_CC_SUB", "1") != "0"


def x_asm(sub: bool) -> str:
    """x's side, two lanes per call (pack=2: $4, $5 = x[c..c+1] of lanes e0, e1; $6, $7 = x[c+2..c+3]) -> the bf16
    pairs the word routine multiplies (sub: times 2^100, exact for |x| < 2^27): $0 = (x_e0[c], x_e1[c]), $1 = (..,
    [c+1]), $2 = (.., [c+2]), $3 = (.., [c+3]). Apart from the weights' routine so that it depends on x alone: a
    thread's rows share x, and the compiler computes it once for all of them."""
    out = "{\n.reg .b32 t, big, nz;\n" + ("mov.b32 big, 0x71807180;\nmov.b32 nz, 0x80008000;\n" if sub else "")
    for i, (a, b, sel) in enumerate((("$4", "$5", "0x5410"), ("$4", "$5", "0x7632"), ("$6", "$7", "0x5410"),
                                     ("$6", "$7", "0x7632"))):
        out += (f"prmt.b32 t, {a}, {b}, {sel};\nfma.rn.bf16x2 ${i}, t, big, nz;\n" if sub
                else f"prmt.b32 ${i}, {a}, {b}, {sel};\n")
    return out + "}"


def word_asm(sub: bool) -> str:
    """The weights' side, two 16-bit words per call (pack=2: e0 in the low half of $2, e1 in the high half; $3..$6
    x_asm's pairs; $7, $8: the addresses of e0's, e1's UE8M0 scales) -> $0, $1: the fp32 bits of 2^(s-127) Σ_u
    w[c+u] x[c+u] for e0, e1. Nibble r of both halves at once into a bf16 pair (moe_mxfp4_decode's _NIB decode: mask,
    multiply, mask; sub: left as value * 2^-126 against x * 2^100, products value * x * 2^-26, normal for
    |value * x| > 2^-100; else times 2^126), two chains of fma.rn.bf16x2 (columns c, c+1 and c+2, c+3: products
    rounded to bf16, then one bf16 sum), the chains added in fp32 per word and multiplied by 2^(s-127) (sub: 2^(s-101),
    scales <= 228). The scale bytes are loaded here: a tl.load of the [BN, 64] scale tile (8 lanes share a byte, so
    no two-element vectors) took a register layout of its own, and the words' sums crossed shared memory every step
    to meet it."""
    def dec(r: int) -> str:
        src = "$2"
        out = ""
        if r >= 2:
            out, src = "shr.b32 t, $2, 8;\n", "t"
        out += (f"and.b32 t, {src}, {('0x000F000F', '0x00F000F0')[r % 2]};\n"
                f"mul.lo.u32 t, t, {('0x1040', '0x104')[r % 2]};\nand.b32 w, t, 0x81C081C0;\n")
        return out + ("" if sub else "fma.rn.bf16x2 w, w, big, nz;\n")

    def lane(half: str, out: str, addr: str) -> str:
        get = "shl.b32 t, {h}, 16;\n" if half == "lo" else "and.b32 t, {h}, 0xFFFF0000;\n"
        return (get.format(h="ha") + "mov.b32 f0, t;\n" + get.format(h="hb") + "mov.b32 f1, t;\nadd.f32 f0, f0, f1;\n"
                f"ld.global.nc.u8 t, [{addr}];\nshl.b32 t, t, 23;\n" + ("add.u32 t, t, 0x0D000000;\n" if sub else "")
                + f"mov.b32 f2, t;\nmul.f32 f0, f0, f2;\nmov.b32 {out}, f0;\n")

    return ("{\n.reg .b32 t, w, ha, hb, big, nz;\n.reg .f32 f0, f1, f2;\nmov.b32 nz, 0x80008000;\n"
            "mov.b32 big, 0x7E807E80;\n"
            + dec(0) + "fma.rn.bf16x2 ha, w, $3, nz;\n" + dec(1) + "fma.rn.bf16x2 ha, w, $4, ha;\n"
            + dec(2) + "fma.rn.bf16x2 hb, w, $5, nz;\n" + dec(3) + "fma.rn.bf16x2 hb, w, $6, hb;\n"
            + lane("lo", "$0", "$7") + lane("hi", "$1", "$8") + "}")


def cc_default(device: torch.device, D: int, I: int, T: int) -> bool:
    """This form for fused_moe_mxfp4's decode calls without a config: DS4F_MXFP4_CC=1 and a CONFIGS shape, CUDA."""
    return ENABLED and device.type == "cuda" and (D, I, bucket(T)) in CONFIGS


def pick(D: int, I: int, T: int) -> tuple[Cfg, Cfg] | None:
    """CONFIGS' tiles for (D, I, T's bucket), if listed."""
    return CONFIGS.get((D, I, bucket(T)))


def fits(cfgs: tuple[Cfg, Cfg], D: int, I: int) -> bool:
    """BLOCK_K 256, BLOCK_N a power of two in [8, 128] dividing I (up) / D (down), whole blocks per K slice,
    DEPTH 1 or 2."""
    (bn_u, bk_u, sp_u, nw_u, d_u), (bn_d, bk_d, sp_d, nw_d, d_d) = cfgs
    ok_bn = all(8 <= b <= 128 and b & (b - 1) == 0 for b in (bn_u, bn_d))
    return (ok_bn and bk_u == bk_d == BLOCK_K and I % bn_u == 0 and D % bn_d == 0 and sp_u >= 1 and sp_d >= 1
            and D % (sp_u * BLOCK_K) == 0 and I % (sp_d * BLOCK_K) == 0 and d_u in (1, 2) and d_d in (1, 2)
            and nw_u in (1, 2, 4, 8) and nw_d in (1, 2, 4, 8))


def cc_ref(x: torch.Tensor, w13_q: torch.Tensor, w13_scale: torch.Tensor, w2_q: torch.Tensor, w2_scale: torch.Tensor,
           ids: torch.Tensor, weights: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """This form's arithmetic written out in torch (no shared expert): per 4-column word, the products of columns
    (0, 1) and (2, 3) each rounded to bf16 and their sums too, the two sums added in fp32, times the group's scale;
    words summed in fp32 (in another order than the kernels': last-bit differences only); the activation as the
    reference rounds it. -> [T, D] bf16."""
    from ds4f.kernels.ref import swiglu_clamp
    from ds4f.model.quant import dequant_mxfp4

    def bf(v: torch.Tensor) -> torch.Tensor:
        return v.bfloat16().float()

    def rows(xr: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # xr [K] (bf16 values), q [N, K/2] bytes, s [N, K/32] -> [N] fp32
        w = dequant_mxfp4(q, torch.full_like(s, 127), torch.float32)  # the nibbles' values, unscaled
        p = (w * xr.float()[None, :]).view(w.shape[0], -1, 4)  # [N, 4-column words, column in word]
        part = bf(bf(p[..., 0]) + p[..., 1]) + bf(bf(p[..., 2]) + p[..., 3])  # the word's two chains, fp32 sum
        scale = torch.exp2(s.float() - 127).repeat_interleave(8, 1)  # a 32-column group = 8 words
        return (part * scale).sum(1)

    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            h = rows(x[t], w13_q[e], w13_scale[e].view(torch.uint8))  # [2I]: gate rows, then up rows
            act = swiglu_clamp(h[None], swiglu_limit).to(x.dtype)[0]
            out[t] += float(weights[t, j]) * rows(act, w2_q[e], w2_scale[e].view(torch.uint8))
    return out.to(x.dtype)


if triton is not None:
    _WORD_S, _WORD_N = tl.constexpr(word_asm(True)), tl.constexpr(word_asm(False))
    _X_S, _X_N = tl.constexpr(x_asm(True)), tl.constexpr(x_asm(False))

    @triton.jit
    def _lane_f32(v, LANE: tl.constexpr):
        # bf16 LANE (0..3) of int64 words v -> fp32
        return (((v >> (16 * LANE)) & 65535).to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _nib_f32(w, U: tl.constexpr):
        # nibble U (0..3: column c + U) of the words w (int32) -> its e2m1 value, fp32
        c = (w >> (4 * U)) & 15
        m = c & 7
        v = tl.where(m >= 2, (2 + (m & 1)).to(tl.float32) * (1 << (m >> 1)).to(tl.float32) * 0.25,
                     m.to(tl.float32) * 0.5)
        return tl.where(c >= 8, -v, v)

    @triton.jit
    def _word(acc, wq, xw, sp, F32: tl.constexpr, SUB: tl.constexpr):
        # acc [BN, 64] += 2^(s-127) * Σ_u w[c+u] x[c+u] over lane j's 16-bit word (columns c = 4j..4j+3 of this
        # block): wq [BN, 64] int16, xw [BN, 64] int64 = x[c..c+3] (bf16), sp [BN, 64] = its group scale's address
        if F32:  # word_asm's roundings written out (the interpreter)
            w = wq.to(tl.int32)
            ha = _round_bf16(_nib_f32(w, 1) * _lane_f32(xw, 1)
                             + _round_bf16(_nib_f32(w, 0) * _lane_f32(xw, 0), True).to(tl.float32), True)
            hb = _round_bf16(_nib_f32(w, 3) * _lane_f32(xw, 3)
                             + _round_bf16(_nib_f32(w, 2) * _lane_f32(xw, 2), True).to(tl.float32), True)
            return acc + (ha.to(tl.float32) + hb.to(tl.float32)) * _scale(sp)
        xlo = xw.to(tl.int32)
        xhi = (xw >> 32).to(tl.int32)
        sa = sp.to(tl.int64)
        if SUB:
            xa, xb = tl.inline_asm_elementwise(_X_S, "=r,=r,=r,=r,r,r,r,r", [xlo, xhi], dtype=(tl.int32, tl.int32),
                                               is_pure=True, pack=2)
            part = tl.inline_asm_elementwise(_WORD_S, "=r,=r,r,r,r,r,r,l,l", [wq, xa, xb, sa], dtype=tl.int32,
                                             is_pure=True, pack=2)
        else:
            xa, xb = tl.inline_asm_elementwise(_X_N, "=r,=r,=r,=r,r,r,r,r", [xlo, xhi], dtype=(tl.int32, tl.int32),
                                               is_pure=True, pack=2)
            part = tl.inline_asm_elementwise(_WORD_N, "=r,=r,r,r,r,r,r,l,l", [wq, xa, xb, sa], dtype=tl.int32,
                                             is_pure=True, pack=2)
        return acc + part.to(tl.float32, bitcast=True)

    @triton.jit
    def _scale(sp):
        # UE8M0 bytes at sp [BN, 64] (a lane's group's; 8 lanes share one) -> 2^(s-127) fp32
        return (tl.load(sp).to(tl.int32) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _stream(acc0, acc1, q0, q1, s0, s1, xp, steps, BN: tl.constexpr, TWO: tl.constexpr, F32: tl.constexpr,
                DEPTH: tl.constexpr, SUB: tl.constexpr):
        # steps 256-column blocks of one or two (TWO) weight row sets (int16 word pointers q0 / q1 and scale
        # pointers s0 / s1 [BN, 64] at the first block) against x (int64 word pointers xp [1, 64] at the first
        # block) -> the accumulators. Weights 2 words (4 bytes) per thread and row, x 2 int64 words (16 bytes): one
        # register layout, nothing crosses shared memory; DEPTH blocks of weights in flight
        zero = tl.zeros([BN, 1], tl.int32)
        w0 = tl.load(q0)
        w1 = w0
        if TWO:
            w1 = tl.load(q1)
        v0 = w0
        v1 = w1
        if DEPTH > 1:
            v0 = tl.load(q0 + 64, mask=steps > 1, other=0)
            if TWO:
                v1 = tl.load(q1 + 64, mask=steps > 1, other=0)
        for i in range(0, steps):
            n0 = tl.load(q0 + (i + DEPTH) * 64, mask=i + DEPTH < steps, other=0)
            n1 = n0
            if TWO:
                n1 = tl.load(q1 + (i + DEPTH) * 64, mask=i + DEPTH < steps, other=0)
            xw = tl.load(xp + i * 64 + zero)  # [BN, 64] of row stride 0: each thread's copies come from L1
            acc0 = _word(acc0, w0, xw, s0 + i * 8, F32, SUB)
            if TWO:
                acc1 = _word(acc1, w1, xw, s1 + i * 8, F32, SUB)
            if DEPTH > 1:
                w0 = v0
                v0 = n0
                if TWO:
                    w1 = v1
                    v1 = n1
            else:
                w0 = n0
                w1 = n1
        return acc0, acc1

    @triton.jit
    def _cc_up(
        x_ptr, q_ptr, s_ptr, ids_ptr, a_ptr, part_ptr, lock_ptr, limit, s_xt, s_qe, s_qn, s_se, s_sn, s_at,
        I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr = False, DEPTH: tl.constexpr = 1,
        SUB: tl.constexpr = True,
    ):
        # moe_mxfp4_decode._dec_up's program (pick m, BLOCK_N gate rows + the same up rows, K slice pid_s) over 16-bit
        # words (q_ptr [E, 2I, DM / 4], strides in words); x bf16 [T, DM] read as int64 words
        pdl_enter(PDL)  # ds4f.kernels.pdl: the ids (and so every weight address) come from the router
        pid_m, pid_n, pid_s, e, rn, r64, k0 = _up_program(ids_ptr, DM, BLOCK_N, SPLIT)
        K_PER: tl.constexpr = DM // SPLIT
        lanes = tl.arange(0, 64)[None, :]
        qg = q_ptr + e * s_qe + r64 * s_qn + k0 // 4 + tl.max_contiguous(lanes, [1, 2])  # 4-byte weight loads
        sg = s_ptr + e * s_se + r64 * s_sn + k0 // 32 + lanes // 8
        xw = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        xp = xw + (pid_m // TOPK).to(tl.int64) * (s_xt // 4) + k0 // 4 + lanes
        acc_g = tl.zeros([BLOCK_N, 64], tl.float32)
        acc_u = tl.zeros([BLOCK_N, 64], tl.float32)
        acc_g, acc_u = _stream(acc_g, acc_u, qg, qg + I * s_qn, sg, sg + I * s_sn, xp, K_PER // BLOCK_K, BLOCK_N,
                               True, F32, DEPTH, SUB)
        _up_finish(tl.sum(acc_g, 1), tl.sum(acc_u, 1), a_ptr, part_ptr, lock_ptr, limit, s_at, pid_m, pid_n, pid_s,
                   rn, I, SPLIT, F32)

    @triton.jit
    def _cc_down(
        a_ptr, q_ptr, s_ptr, ids_ptr, tw_ptr, sh_ptr, out_ptr, part_ptr, lock_ptr, s_at, s_qe, s_qn, s_se, s_sn,
        s_sht, s_ot, DM: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, HAS_SH: tl.constexpr, F32: tl.constexpr,
        PDL: tl.constexpr = False, DEPTH: tl.constexpr = 1, SUB: tl.constexpr = True,
    ):
        # moe_mxfp4_decode._dec_down's program ((token t, BLOCK_N rows of D), (pick j, K slice)) over 16-bit words
        # (q_ptr [E, DM, I / 4]); the activation rows a [T*k, I] bf16 read as int64 words
        pdl_enter(PDL)
        pid_tn, pid_js, t, rn, m, k0, e, r64 = _down_program(ids_ptr, DM, I, TOPK, BLOCK_N, SPLIT)
        K_PER: tl.constexpr = I // SPLIT
        lanes = tl.arange(0, 64)[None, :]
        qd = q_ptr + e * s_qe + r64 * s_qn + k0 // 4 + tl.max_contiguous(lanes, [1, 2])
        sd = s_ptr + e * s_se + r64 * s_sn + k0 // 32 + lanes // 8
        aw = a_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        ap = aw + m.to(tl.int64) * (s_at // 4) + k0 // 4 + lanes
        acc = tl.zeros([BLOCK_N, 64], tl.float32)
        acc, _ = _stream(acc, acc, qd, qd, sd, sd, ap, K_PER // BLOCK_K, BLOCK_N, False, F32, DEPTH, SUB)
        _down_finish(tl.sum(acc, 1) * tl.load(tw_ptr + m), sh_ptr, out_ptr, part_ptr, lock_ptr, s_sht, s_ot, t,
                     pid_tn, pid_js, rn, DM, TOPK, SPLIT, HAS_SH, F32)
