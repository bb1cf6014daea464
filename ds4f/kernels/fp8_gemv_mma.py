"""⑥ kernels, block-FP8 decode GEMV on the tensor cores fed straight from registers, 1-8 tokens: fp8_gemv.launch's
w8 contract (x [T, G, K] bf16, W [G*N, K] e4m3 with one scale per 128x128 block, out [T, G, N]) with no shared
memory, no barrier and no ldmatrix in the loop. Opt-in (DS4F_FP8_GEMV_MMA=1): timed on an H200 in session 20
(bench/sweep_fp8_gemv_mma.py, bench/results/fp8_gemv.jsonl) it is slower than the default at every TP=2 decode shape
at four tokens (w1|w3 8.00 vs 6.79 us) and at best ties at one.

Why: the MMA decode GEMV stages every tile through shared memory and runs latency-bound (0.4-0.6 of copy); the
CUDA-core GEMV skips the staging but pays 4.7-6.5 SASS instructions per weight byte at one token and ~11 at four
(1.3-1.6x the MMA kernel's time there). Here a warp's lanes load 16 contiguous bytes of two weight rows each (rows
g and g + 8 of a 16-row tile, lane 4g + t at columns 16t .. 16t + 15 of a 64-column step: 8 full 64-byte row
segments per load instruction) and 16 bf16 of x's row g (token g; zeros past T), widen the weight bytes to bf16
pairs in registers (fp8_gemv.E4M3_BF16_ASM's integer ops, exact) and issue four `mma.sync.m16n8k16` bf16 MMAs per
step from inline PTX. No weight shuffle: an MMA sums over k, and one k-permutation (each lane's 16 columns, pairs
(4i, 4i + 1) at slots 2t, 2t + 1 and (4i + 2, 4i + 3) at 8 + 2t, 9 + 2t of MMA i) is applied to both operands. A
Triton tensor [32 * warps, 4] int32 loaded from 16 contiguous bytes per row gets the layout sizePerThread [1, 4],
threadsPerWarp [32, 1]: row r is lane r % 32 of warp r // 32 and its 4 words are that lane's registers, which
`inline_asm_elementwise(..., pack=4)` hands to the instructions. Lane 4g + t ends with rows g, g + 8 x tokens 2t,
2t + 1 of its tile. Offline sm_90 SASS (bench/probe_mma_regs.py, the same loop): ~2.6 instructions per weight byte
at any T <= 8. Any sm_80+ (bf16 mma.sync).

Same math as fp8_gemm.fp8_linear_ref (x in bf16, exact e4m3 weights, fp32 sums per 128-column block, then times the
block's scale) up to the order of the sums: the w8 form of today's one-token default (fp8_gemv_cc), so one token and
several compute alike. Program = (NW warps x TILES 16-row tiles inside one group, K slice); the weights of the next
128-column block are loaded while this one's MMAs run (a register double buffer; the first block before the PDL
wait); a K split's fp32 partials are summed in split order by the tile's last program to arrive (arrival counters,
re-armed: CUDA-graph safe). The interpreter (and F32=True) runs an emulation of the four MMAs built from the same
lane registers (tl.dot over the rebuilt 16 x 64 and 64 x 8 tiles): everything but the PTX is CPU-tested.
"""

from __future__ import annotations

import os
import re
from functools import cache

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.fp8_gemv_kernels import E4M3_BF16_ASM
from ds4f.kernels.knobs import env_knobs

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: fp8_gemm takes its reference first
    triton = None

ENABLED = os.environ.get("DS4F_FP8_GEMV_MMA", "0") == "1"
MAX_T = min(8, (env_knobs("DS4F_FP8_GEMV_MMA_MAX_T", 1, "8") or (8,))[0])
Cfg = tuple[int, int, int]  # NW (warps), TILES (16-row tiles per warp), SPLIT
_TILES_ENV = env_knobs("DS4F_FP8_GEMV_MMA_TILES", 3, "4,2,1")  # "nw,tiles,split" for every shape where valid


def _widen(src: str, dst: str) -> str:
    # e4m3 word src -> bf16 pairs {dst}0 (bytes 0, 1) and {dst}1 (bytes 2, 3), exactly: fp8_gemv.E4M3_BF16_ASM's
    # instructions on these registers (its t0, t1, k, z declared and k, z set once by mma4_asm)
    names = {"$2": src, "$0": f"{dst}0", "$1": f"{dst}1"}
    ops = [ln for ln in E4M3_BF16_ASM.splitlines() if ln.startswith(("prmt", "shl", "and", "fma"))]
    return "".join(re.sub(r"\$[012](?!\d)", lambda m: names[m.group()], ln) + "\n" for ln in ops)


def mma4_asm() -> str:
    """D ($0-$3) = four m16n8k16 bf16 MMAs over a 64-column step + C ($20-$23): weight rows g / g + 8 as $4-$7 /
    $8-$11 (16 e4m3 bytes each, widened here), x's 16 bf16 of row g as $12-$15 / $16-$19 (words of bf16 pairs)."""
    s = ".reg .b32 k, z, t0, t1;\n.reg .b32 " + ", ".join(f"g{i}{j}, h{i}{j}" for i in range(4) for j in range(2))
    s += ";\n.reg .f32 d<4>;\nmov.b32 k, 0x7B807B80;\nmov.b32 z, 0x80008000;\n"
    s += "".join(_widen(f"${4 + i}", f"g{i}") + _widen(f"${8 + i}", f"h{i}") for i in range(4))
    for i in range(4):
        xr = 12 + 4 * (i // 2) + 2 * (i % 2)  # x's pairs (4i, 4i + 1) and (4i + 2, 4i + 3): words 2i, 2i + 1
        c = "$20, $21, $22, $23" if i == 0 else "d0, d1, d2, d3"
        d = "$0, $1, $2, $3" if i == 3 else "d0, d1, d2, d3"
        s += (f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{d}}}, {{g{i}0, h{i}0, g{i}1, h{i}1}}, "
              f"{{${xr}, ${xr + 1}}}, {{{c}}};\n")
    return "{\n" + s + "}"


if triton is not None:
    _MMA4_C = tl.constexpr(mma4_asm())

    @triton.jit
    def _e4m3_vals(wd, R: tl.constexpr):
        # [R, 4] int32 words -> [R, 16] fp32, byte j of word c at column 4c + j (the interpreter's emulation)
        b = (wd[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 255
        return tl.reshape(b.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32), [R, 16])

    @triton.jit
    def _bf16_vals(xa, xb, R: tl.constexpr):
        # two [R, 4] int32 words of bf16 pairs (low half first) -> [R, 16] fp32: xa's 8 values, then xb's
        a = tl.reshape(tl.join((xa << 16).to(tl.float32, bitcast=True), (xa & -65536).to(tl.float32, bitcast=True)),
                       [R, 8])
        b = tl.reshape(tl.join((xb << 16).to(tl.float32, bitcast=True), (xb & -65536).to(tl.float32, bitcast=True)),
                       [R, 8])
        return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [R, 16])

    @triton.jit
    def _mma4(ag, ah, x0, x1, acc, NW: tl.constexpr, F32: tl.constexpr):
        # acc [32 NW, 4] += this lane's D fragment of the 64-column step (see the module docstring)
        if F32:  # the MMAs rebuilt from the same registers: W [NW, 16, 64] (rows g, then g + 8; k = 16t + v),
            # X [NW, 8 tokens, 64]; lane 4g + t, element 2 hi + p <- D[g + 8 hi, 2t + p]
            R: tl.constexpr = 32 * NW
            wg = tl.reshape(_e4m3_vals(ag, R), [NW, 8, 64])
            wh = tl.reshape(_e4m3_vals(ah, R), [NW, 8, 64])
            w = tl.reshape(tl.permute(tl.join(wg, wh), (0, 3, 1, 2)), [NW, 16, 64])
            x = tl.reshape(_bf16_vals(x0, x1, R), [NW, 8, 64])
            x = tl.reshape(tl.permute(tl.join(x, tl.zeros([NW, 8, 64], tl.float32)), (0, 3, 1, 2)), [NW, 16, 64])
            d = tl.dot(w, tl.permute(x, (0, 2, 1)), input_precision="ieee")  # [NW, 16, 16]: tokens 8-15 padding
            d, _ = tl.split(tl.permute(tl.reshape(d, [NW, 16, 2, 8]), (0, 1, 3, 2)))  # [NW, 16, 8]
            d = tl.permute(tl.reshape(d, [NW, 2, 8, 4, 2]), (0, 2, 3, 1, 4))
            return acc + tl.reshape(d, [R, 4])
        return tl.inline_asm_elementwise(_MMA4_C, "=f,=f,=f,=f," + "r," * 16 + "f,f,f,f", [ag, ah, x0, x1, acc],
                                         dtype=tl.float32, is_pure=True, pack=4)

    @triton.jit
    def _scale(s_ptr, SCALE_E8M0: tl.constexpr):
        s = tl.load(s_ptr)
        if SCALE_E8M0:  # UE8M0 byte b -> 2^(b-127) as fp32 bits
            s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        return s

    @triton.jit(do_not_specialize=["T"])
    def _gemv_mma(
        x_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, lock_ptr, T, NT, K, GN, s_xt, s_xg, s_wsn, s_ot, k_per,
        NW: tl.constexpr, TILES: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_E8M0: tl.constexpr, F32: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # program (pid_n, pid_s): rows [n0, n0 + 16 NW TILES) (one group; warp w's tiles at n0 + 16 TILES w + 16 i)
        # over the 128-column blocks of [k_lo, k_lo + k_per). x as int32 words of bf16 pairs (strides in words), w as
        # int32 words [NT, K / 4]; out (or the split's partials [n_split, T, NT] fp32) at row n for token t
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        R: tl.constexpr = 32 * NW
        r = tl.arange(0, R)
        c = tl.arange(0, 4)
        g = (r % 32) // 4
        t = r % 4
        n0 = pid_n * (16 * NW * TILES)
        row0 = n0 + (r // 32) * (16 * TILES)  # the warp's first tile
        kw = K // 4
        k_lo = pid_s * k_per
        col = 4 * t[:, None] + c[None, :]  # 16 bytes at column 16t of a 64-column step, as words
        wp = w_ptr + (row0 + g)[:, None].to(tl.int64) * kw + k_lo // 4 + col
        xp = x_ptr + g[:, None] * s_xt + (n0 // GN) * s_xg + k_lo // 2 + 8 * t[:, None] + c[None, :]
        xm = (g < T)[:, None] & (c >= 0)[None, :]
        tok = 2 * t[:, None] + c[None, :] % 2  # this lane's tokens: elements 0, 2 -> 2t; 1, 3 -> 2t + 1
        orow = row0[:, None] + g[:, None] + 8 * (c[None, :] // 2)
        sp0 = ws_ptr + (row0[:, None] // 128) * s_wsn + k_lo // 128 + 0 * c[None, :]
        sp1 = ws_ptr + ((row0 + 16)[:, None] // 128) * s_wsn + k_lo // 128 + 0 * c[None, :]
        steps = k_per // 128
        # block 0's weights before the wait (ds4f.kernels.pdl): tile 0 rows g / g + 8 at steps h = 0, 1; tile 1
        a0 = tl.load(wp)
        a1 = tl.load(wp + 8 * kw)
        a2 = tl.load(wp + 16)
        a3 = tl.load(wp + 8 * kw + 16)
        b0 = a0
        b1 = a1
        b2 = a2
        b3 = a3
        if TILES > 1:
            b0 = tl.load(wp + 16 * kw)
            b1 = tl.load(wp + 24 * kw)
            b2 = tl.load(wp + 16 * kw + 16)
            b3 = tl.load(wp + 24 * kw + 16)
        pdl_enter(PDL)
        acc0 = tl.zeros([R, 4], tl.float32)
        acc1 = tl.zeros([R, 4], tl.float32)
        for i in range(0, steps):
            nm = i + 1 < steps  # the next block's weights, in flight during this one's MMAs
            nx = wp + (i + 1) * 32
            n_a0 = tl.load(nx, mask=nm, other=0)
            n_a1 = tl.load(nx + 8 * kw, mask=nm, other=0)
            n_a2 = tl.load(nx + 16, mask=nm, other=0)
            n_a3 = tl.load(nx + 8 * kw + 16, mask=nm, other=0)
            n_b0 = n_a0
            n_b1 = n_a1
            n_b2 = n_a2
            n_b3 = n_a3
            if TILES > 1:
                n_b0 = tl.load(nx + 16 * kw, mask=nm, other=0)
                n_b1 = tl.load(nx + 24 * kw, mask=nm, other=0)
                n_b2 = tl.load(nx + 16 * kw + 16, mask=nm, other=0)
                n_b3 = tl.load(nx + 24 * kw + 16, mask=nm, other=0)
            xb = xp + i * 64  # this block's 128 bf16 of row g: step 0 at words 8t, step 1 at 32 + 8t
            x0 = tl.load(xb, mask=xm, other=0)
            x1 = tl.load(xb + 4, mask=xm, other=0)
            x2 = tl.load(xb + 32, mask=xm, other=0)
            x3 = tl.load(xb + 36, mask=xm, other=0)
            blk = _mma4(a2, a3, x2, x3, _mma4(a0, a1, x0, x1, tl.zeros([R, 4], tl.float32), NW, F32), NW, F32)
            acc0 += blk * _scale(sp0 + i, SCALE_E8M0)
            if TILES > 1:
                blk = _mma4(b2, b3, x2, x3, _mma4(b0, b1, x0, x1, tl.zeros([R, 4], tl.float32), NW, F32), NW, F32)
                acc1 += blk * _scale(sp1 + i, SCALE_E8M0)
            a0 = n_a0
            a1 = n_a1
            a2 = n_a2
            a3 = n_a3
            b0 = n_b0
            b1 = n_b1
            b2 = n_b2
            b3 = n_b3
        om = (tok < T) & (orow < NT)
        if SPLIT_K:
            pp = part_ptr + (pid_s * T + tok) * NT + orow  # partials [n_split, T, NT] fp32
            tl.store(pp, acc0, mask=om)
            if TILES > 1:
                tl.store(pp + 16, acc1, mask=om)
            tl.debug_barrier()  # every thread's partial is written before the release below
            n_split = tl.num_programs(1)
            cnt = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == n_split - 1:  # the last arrival sums the partials in split order
                rn = n0 + tl.arange(0, 16 * NW * TILES)
                for tt in range(0, T):
                    tot = tl.zeros([16 * NW * TILES], tl.float32)
                    sp = 0
                    while sp < n_split:
                        tot += tl.load(part_ptr + (sp * T + tt) * NT + rn, cache_modifier=".cg")
                        sp += 1
                    tl.store(out_ptr + tt * s_ot + rn, tot.to(out_ptr.dtype.element_ty), mask=rn < NT)
                tl.store(lock_ptr + pid_n, 0)
        else:
            op = out_ptr + tok * s_ot + orow
            tl.store(op, acc0.to(out_ptr.dtype.element_ty), mask=om)
            if TILES > 1:
                tl.store(op + 16, acc1.to(out_ptr.dtype.element_ty), mask=om)


def valid(cfg: Cfg, nt: int, k: int, groups: int) -> bool:
    """16 NW TILES rows per program dividing each group's rows; K in 128-column blocks that the split divides."""
    nw, tiles, split = cfg
    bn = 16 * nw * tiles
    return (nw in (1, 2, 4, 8) and tiles in (1, 2) and (nt // groups) % bn == 0 and nt % groups == 0
            and k % 128 == 0 and split >= 1 and (k // 128) % split == 0)


def generic_config(nt: int, k: int, groups: int, sms: int) -> Cfg:
    """The largest of 4 x 2, 4 x 1, 2 x 1, 1 x 1 (warps x tiles) the groups allow, then a K split toward ~2
    programs per SM."""
    cfg = next((c for c in ((4, 2, 1), (4, 1, 1), (2, 1, 1), (1, 1, 1)) if valid(c, nt, k, groups)), (1, 1, 1))
    nw, tiles, _ = cfg
    progs, blocks, split = nt // (16 * nw * tiles), k // 128, 1
    while blocks % (split * 2) == 0 and progs * split * 2 <= 2 * sms:
        split *= 2
    return nw, tiles, split


@cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def config(nt: int, k: int, groups: int, device: torch.device) -> Cfg:
    """DS4F_FP8_GEMV_MMA_TILES ("nw,tiles,split") where valid, else generic_config."""
    env = _TILES_ENV
    if env and valid(env, nt, k, groups):  # type: ignore[arg-type]
        return env  # type: ignore[return-value]
    sms = _sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" \
        else 132
    return generic_config(nt, k, groups, sms)


def x_ok(x: torch.Tensor) -> bool:
    """x [T, G, K] readable as 16-byte words of bf16: unit inner stride, 8-element aligned rows."""
    return (x.dtype == torch.bfloat16 and x.stride(-1) == 1 and x.stride(0) % 8 == 0 and x.stride(1) % 8 == 0
            and x.data_ptr() % 16 == 0)


def takes(x: torch.Tensor, nt: int, k: int, groups: int) -> bool:
    """Whether launch_mma runs x [T, G, K] @ W [nt, k]^T by default: DS4F_FP8_GEMV_MMA=1, T <= MAX_T, some valid
    tile (the smallest, 16 rows per program, is valid whenever any is), x_ok."""
    return ENABLED and 1 <= x.shape[0] <= MAX_T and valid((1, 1, 1), nt, k, groups) and x_ok(x)


def launch_mma(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
               cfg: Cfg | None = None, emulate: bool = False) -> None:
    """out [T, G, N] (contiguous; bf16 or fp32) = x [T, G, K] @ W^T per group; W = w [G*N, K] e4m3 (native dtype or
    its bytes, 16-byte aligned rows), ws [ceil(G*N/128), K/128] fp32 or UE8M0 bytes (e8m0); T <= 8; cfg valid()
    (default config()). emulate: the interpreter's MMA emulation on CUDA too, for tests."""
    t, (nt, k) = x.shape[0], w.shape
    cfg = cfg or config(nt, k, groups, x.device)
    if not 1 <= t <= 8 or not valid(cfg, nt, k, groups) or not x_ok(x) or w.data_ptr() % 16:
        raise ValueError(f"fp8 register-MMA GEMV config {cfg} invalid for [{nt}, {k}] in {groups} groups at T={t}")
    nw, tiles, split = cfg
    progs = nt // (16 * nw * tiles)
    if split > 1:
        part = torch.empty(split * t * nt, dtype=torch.float32, device=x.device)
        lock = arrival.counters(x.device, progs, ("fp8_gemv_mma", nt, k, nw, tiles, split))
    else:
        part = lock = out  # unused
    f32 = emulate or not x.is_cuda
    _gemv_mma[(progs, split)](
        x.view(torch.int32), w.view(torch.uint8).view(torch.int32), ws, out, part, lock, t, nt, k, nt // groups,
        x.stride(0) // 2, x.stride(1) // 2, ws.stride(0), out.stride(0), k // split, NW=nw, TILES=tiles,
        SPLIT_K=split > 1, SCALE_E8M0=e8m0, F32=f32, num_warps=nw, num_stages=1,
        **(dict(PDL=False, launch_pdl=False) if f32 else pdl.launch(x.device)))
