"""Register-fed MMA probe: can a decode GEMV feed the tensor cores straight from global loads of the row-major
checkpoint weights, with no shared memory, no barriers and no ldmatrix, and does such a weight stream run near the
copy ceiling at the V4-Flash decode shapes?

Why: the decode GEMVs' MMA kernels stage every tile through shared memory (cp.async, barriers, ldmatrix) and Nsight
Compute found them latency-bound (0.4-0.6 of copy); the CUDA-core forms skip the staging but pay 5-11 SASS
instructions per weight byte (1.3-1.6x the MMA kernel's time at four tokens). Here `mma.sync.m16n8k32` (e4m3 x e4m3
-> fp32; sm_89+: native on Ada / Blackwell, on Hopper ptxas widens to f16 and issues two HMMA.16816) takes its
operands from the registers a thread loaded. A Triton tensor [32 * warps, 4] int32 loaded from 16 contiguous bytes
per row gets the layout sizePerThread [1, 4], threadsPerWarp [32, 1]: row r is lane r % 32 of warp r // 32, its 4
words that lane's registers, which `inline_asm_elementwise(..., pack=4)` hands to the instruction.

No weight shuffle: an MMA sums over k, so any permutation of the 32 k-slots applied to both operands gives the same
product. Lane l = 4g + t reads 16 contiguous bytes of weight rows g and g + 8 of its 16-row tile at columns
k0 + 16t .. k0 + 16t + 15 (a 64-column step: 4 lanes x 16 bytes per row, 8 full rows per load instruction) and 16
bytes of x's e4m3 row g at the same columns (token g; zeros past T); bytes 0-7 feed one m16n8k32 (slots 4t.. of a0 /
a1, 16 + 4t.. of a2 / a3, and of b0 / b1), bytes 8-15 a second. Accumulators per 128-column block, scaled by the
weight block's and the token's scale (the a8 form: fp8_linear_a8_ref's math on pre-quantized x), summed in fp32.
Lane l's results: rows g and g + 8, tokens 2t and 2t + 1.

The BF16 form (x bf16 as is: the w8 math of today's one-token CUDA-core default, no x quantization, so one token
and several compute alike) widens each weight word to two bf16 pairs in registers (fp8_gemv.E4M3_BF16_ASM's ops)
and issues four m16n8k16 per 64 columns; it runs on any sm_80+.

Offline sm_90 SASS (session 19; not yet run on a GPU), loop instructions per weight byte per thread at any T <= 8:
e4m3 form ~1.7 (half of them the F2FP e4m3 -> f16 unpacks Hopper needs; sm_89 / sm_121 take e4m3 natively), BF16
form ~2.6 (the widening: prmt, shift, and, bf16x2 multiply per byte pair); the CUDA-core GEMV: 4.7-6.5 at T = 1, ~11
at T = 4. CPU-checked: the data movement of both forms emulated against the product (tests/test_probe_mma_regs.py).

1. Exactness: random e4m3 weights with fp32 block scales and e4m3 x with per-128 scales against the dequantized
   fp32 product (equal up to summation order), T = 1, 4, 8.
2. Streaming: GB/s against a copy in the same run, 256 MB of weights (past the L2) and the TP=2 decode shapes, at
   T = 1 and 4, several warps / tiles per program (one 16-row tile per warp per step; TILES of them).

    PYTHONPATH=$PWD python3 bench/probe_mma_regs.py [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels.fp8_gemv_mma import mma4_asm  # noqa: E402

# D (4 fp32) = two m16n8k32 MMAs over 64 k-slots + C: rows g / g + 8 as $4-$7 / $8-$11 (16 e4m3 bytes each), x's
# 16 bytes as $12-$15, C as $16-$19
MMA2 = tl.constexpr("""{
.reg .f32 d<4>;
mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {d0,d1,d2,d3}, {$4,$8,$5,$9}, {$12,$13}, {$16,$17,$18,$19};
mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {$0,$1,$2,$3}, {$6,$10,$7,$11}, {$14,$15}, {d0,d1,d2,d3};
}""")


# D (4 fp32) = four m16n8k16 bf16 MMAs over 64 k-slots + C, the weights widened to bf16 in the asm: the
# register-fed GEMV's instructions (fp8_gemv_mma.mma4_asm; operands $4-$7 / $8-$11 rows g / g + 8, $12-$19 x's 16
# bf16, $20-$23 C)
MMA4_BF16 = tl.constexpr(mma4_asm())


@triton.jit
def _mma4_bf16(ag, ah, x0, x1, c):
    return tl.inline_asm_elementwise(MMA4_BF16, "=f,=f,=f,=f," + "r," * 16 + "f,f,f,f", [ag, ah, x0, x1, c],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _mma2(ag, ah, b, c):
    return tl.inline_asm_elementwise(MMA2, "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r,r,r,r,f,f,f,f", [ag, ah, b, c],
                                     dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _gemv_mma_regs(w_ptr, ws_ptr, x_ptr, xs_ptr, o_ptr, T, N, K, NW: tl.constexpr, TILES: tl.constexpr,
                   BF16: tl.constexpr = False):
    # w: [N, K] e4m3 as int32 words [N, K / 4]; ws: [N / 128, K / 128] fp32; x: [T, K] e4m3 as words; xs: [T, K / 128]
    # fp32; o: [T, N] fp32. Program p: warps w < NW, tiles p * NW * TILES + w * TILES + i (16 rows each), all of K.
    # BF16: x [T, K] bf16 as words [T, K / 2] read as is (the w8 form: no x scale, xs unused), weights widened to
    # bf16 in registers, four m16n8k16 MMAs per 64 columns
    r = tl.arange(0, 32 * NW)
    c = tl.arange(0, 4)
    lane = r % 32
    g = lane // 4
    t = lane % 4
    tile = tl.program_id(0) * NW * TILES + (r // 32) * TILES
    kw = K // 4
    col = 4 * t[:, None] + c[None, :]  # words: 16 bytes at 16t within a 64-column step
    x_row = x_ptr + g[:, None] * kw + col
    xm = (g < T)[:, None] & (c[None, :] >= 0)
    tok = 2 * t[:, None] + (c[None, :] % 2)  # this lane's output tokens: c0, c2 -> 2t; c1, c3 -> 2t + 1
    orow = tile[:, None] * 16 + g[:, None] + 8 * (c[None, :] // 2)
    acc0 = tl.zeros([32 * NW, 4], tl.float32)
    acc1 = tl.zeros([32 * NW, 4], tl.float32)
    for kb in range(0, K // 128):
        blk0 = tl.zeros([32 * NW, 4], tl.float32)
        blk1 = tl.zeros([32 * NW, 4], tl.float32)
        for h in tl.static_range(2):
            k0w = kb * 32 + h * 16
            w0 = w_ptr + (tile[:, None] * 16 + g[:, None]).to(tl.int64) * kw + k0w + col
            if BF16:  # x's 16 bf16 at 16t: words 8t .. 8t + 7 of row g (K / 2 words per row)
                xb = x_ptr + g[:, None] * (K // 2) + 2 * k0w + 8 * t[:, None] + c[None, :]
                x0 = tl.load(xb, mask=xm, other=0)
                x1 = tl.load(xb + 4, mask=xm, other=0)
                blk0 = _mma4_bf16(tl.load(w0), tl.load(w0 + 8 * kw), x0, x1, blk0)
                if TILES > 1:
                    blk1 = _mma4_bf16(tl.load(w0 + 16 * kw), tl.load(w0 + 24 * kw), x0, x1, blk1)
            else:
                b = tl.load(x_row + k0w, mask=xm, other=0)
                blk0 = _mma2(tl.load(w0), tl.load(w0 + 8 * kw), b, blk0)
                if TILES > 1:
                    blk1 = _mma2(tl.load(w0 + 16 * kw), tl.load(w0 + 24 * kw), b, blk1)
        if BF16:
            sx = tl.where(tok < T, 1.0, 0.0)
        else:
            sx = tl.load(xs_ptr + tok * (K // 128) + kb, mask=tok < T, other=0.0)
        acc0 += blk0 * (tl.load(ws_ptr + (tile[:, None] * 16 // 128) * (K // 128) + kb) * sx)
        if TILES > 1:
            acc1 += blk1 * (tl.load(ws_ptr + ((tile[:, None] + 1) * 16 // 128) * (K // 128) + kb) * sx)
    tl.store(o_ptr + tok * N + orow, acc0, mask=tok < T)
    if TILES > 1:
        tl.store(o_ptr + tok * N + orow + 16, acc1, mask=tok < T)


def emulate(w: torch.Tensor, ws: torch.Tensor, x: torch.Tensor, xs: torch.Tensor | None) -> torch.Tensor:
    """The kernel's data movement in torch (per 16-row tile and 64-column step: each lane's values, the MMAs'
    operands rebuilt by the PTX ISA's fragment layouts, the block scales) -> out [T, N] fp32. xs given: the e4m3
    form (two m16n8k32 per step: 4 values per register, a2 / a3 / b1 at k-slot 16); None: the BF16 form (x as is,
    four m16n8k16: 2 values per register, the second registers at slot 8). MMA i of a step takes a lane's values
    from column 16t + 2 vpr i: the first vpr at slots vpr t.., the next vpr at half + vpr t.."""
    n, k = w.shape
    tt = x.shape[0]
    vpr, mmas = (4, 2) if xs is not None else (2, 4)
    half, slots = 4 * vpr, 8 * vpr
    wf, xf, sx = w.float(), torch.zeros(8, k), torch.zeros(8, k // 128)
    xf[:tt] = x.float()
    sx[:tt] = xs if xs is not None else 1.0
    out = torch.zeros(8, n)
    for tile in range(n // 16):
        acc = torch.zeros(16, 8)
        for kb in range(k // 128):
            blk = torch.zeros(16, 8)
            for h in range(2):
                for i in range(mmas):
                    a, bt = torch.zeros(16, slots), torch.zeros(slots, 8)
                    for ln in range(32):
                        gg, t4 = ln // 4, ln % 4
                        c0 = kb * 128 + h * 64 + 16 * t4 + 2 * vpr * i
                        lo, hi = slice(vpr * t4, vpr * t4 + vpr), slice(half + vpr * t4, half + vpr * t4 + vpr)
                        for row in (gg, gg + 8):  # a0 / a1, then a2 / a3
                            a[row, lo] = wf[16 * tile + row, c0:c0 + vpr]
                            a[row, hi] = wf[16 * tile + row, c0 + vpr:c0 + 2 * vpr]
                        bt[lo, gg], bt[hi, gg] = xf[gg, c0:c0 + vpr], xf[gg, c0 + vpr:c0 + 2 * vpr]  # b0, b1
                    blk += a @ bt
            acc += blk * ws[16 * tile // 128, kb] * sx[None, :, kb]
        out[:, 16 * tile:16 * tile + 16] = acc.t()
    return out[:tt]


def reference(w: torch.Tensor, ws: torch.Tensor, x: torch.Tensor, xs: torch.Tensor | None) -> torch.Tensor:
    """Dequantize-then-matmul: W * its 128 x 128 block scales, x * its per-128 scales (None: x as is), fp32."""
    wf = w.float() * ws.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    xf = x.float() if xs is None else x.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]
    return xf @ wf.t()


def run(w: torch.Tensor, ws: torch.Tensor, x: torch.Tensor, xs: torch.Tensor | None, nw: int,
        tiles: int) -> torch.Tensor:
    """xs None: x bf16, the BF16 form."""
    n, k = w.shape
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=w.device)
    _gemv_mma_regs[(n // (16 * nw * tiles),)](w.view(torch.int32), ws, x.view(torch.int32), ws if xs is None else xs,
                                             out, x.shape[0], n, k, NW=nw, TILES=tiles, BF16=xs is None,
                                             num_warps=nw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    recs = []
    meta = run_meta("bench/probe_mma_regs.py" + (f" --out {args.out}" if args.out else ""))

    def e4m3(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=g) * 8).clamp(-448, 448).to(torch.float8_e4m3fn)

    def scales(*shape: int) -> torch.Tensor:
        return torch.exp2(torch.randint(-8, -2, shape, device=dev, generator=g).float())

    # 1. exactness (fp32 sums of exact products, block-scaled: summation order only)
    for n, k, tt, nw, tiles in ((256, 512, 1, 4, 1), (512, 1024, 4, 4, 2), (256, 384, 8, 8, 1), (1024, 256, 3, 2, 2)):
        w, ws, x, xs = e4m3(n, k), scales(n // 128, k // 128), e4m3(tt, k), scales(tt, k // 128)
        xb = torch.randn(tt, k, device=dev, generator=g).bfloat16()
        for form, xx, ss in (("e4m3", x, xs), ("bf16", xb, None)):
            got, want = run(w, ws, xx, ss, nw, tiles), reference(w, ws, xx, ss)
            err = ((got - want).norm() / want.norm()).item()
            print(f"exact {form} [{n}, {k}] T={tt} nw={nw} tiles={tiles}: rel err {err:.2e} "
                  f"{'OK' if err < 1e-5 else 'WRONG'}")
            recs.append(dict(case="mma_regs_exact", form=form, N=n, K=k, T=tt, nw=nw, tiles=tiles, rel_err=err,
                             ok=err < 1e-5))
    # 2. streaming: 256 MB, then the TP=2 decode shapes (fp8_gemv.CONFIGS' names; wo_a's groups as one matrix)
    copy_gbps, _ = measure_ceilings(iters=10)
    shapes = {"256MB": (65536, 4096), "IN_PROJ": (1536, 4096), "IDX_WQ_B": (8192, 1024), "WQ_B_TP2": (16384, 1024),
              "WO_A_TP2": (4096, 4096), "WO_B_TP2": (4096, 4096), "W13_TP2": (2048, 4096), "W2_TP2": (4096, 1024)}
    for name, (n, k) in shapes.items():
        w, ws = e4m3(n, k), scales(n // 128, k // 128)
        for tt, form in ((1, "e4m3"), (4, "e4m3"), (1, "bf16"), (4, "bf16")):
            x = e4m3(tt, k) if form == "e4m3" else torch.randn(tt, k, device=dev, generator=g).bfloat16()
            xs = scales(tt, k // 128) if form == "e4m3" else None
            for nw, tiles in ((4, 1), (4, 2), (8, 1), (2, 2), (1, 2)):
                if n % (16 * nw * tiles):
                    continue
                us = time_us(lambda w=w, ws=ws, x=x, xs=xs, nw=nw, tiles=tiles: run(w, ws, x, xs, nw, tiles),
                             iters=30)
                gbps = n * k / us / 1e3
                print(f"stream {form} {name} [{n}, {k}] T={tt} nw={nw} tiles={tiles}: {us:.2f} us, {gbps:.0f} GB/s, "
                      f"{gbps / copy_gbps:.2f} copy")
                recs.append(dict(case="mma_regs_stream", form=form, shape=name, N=n, K=k, T=tt, nw=nw, tiles=tiles,
                                 time_us=round(us, 2), gbps=round(gbps, 1), frac_copy=round(gbps / copy_gbps, 3),
                                 copy_gbps=round(copy_gbps, 1)))
    if args.out:
        with open(args.out, "a") as f:
            for rec in recs:
                f.write(json.dumps({**meta, **rec}) + "\n")


if __name__ == "__main__":
    main()
