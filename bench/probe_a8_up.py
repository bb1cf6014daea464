"""bench probe, where the four-token MXFP4 up launch's time goes (issue 7, batch 4): moe_mxfp4_a8._a8_up's loop
(one TP=2 rank, T tokens, six picks, the table's tile, x's operands from _a8_expand) rebuilt without its finish,
with one piece changed at a time, each timed cold (every call its own picks) against the real launch:

    DEC   0: the e2m1 -> e4m3 placement (7 ALU ops per packed word), 1: 1 op per word (the bytes taken as they
          are: the bound with a free decode), 2: 3 ops per word (what a nibble order permuted at load time would cost)
    SCALE 0: each step's [BN, 16] partials scaled into fp32 accumulators (the kernel's form: every MMA waited for
          at once), 1: the MMAs accumulate in place across steps, no scales (the bound with a loop-carried acc)
      6: SCALE 1's loop over K slices of R steps (more programs at one token; timing only)
      7: SCALE 6 with the real math: each (row, 32-column group)'s scale folded into the e4m3 operand as 2^(s -
          the row's least s) (a PRMT table per group; rows whose scales span more than 12 binades cannot), x
          quantized with one power-of-two scale per token, both applied once at the end (checked against SCALE 0)
    ORDER 0: gate then up, 1: both halves' MMAs issued before either is scaled

Timing only: DEC 1 / 2 and SCALE 1 compute wrong sums on purpose; DEC 0 SCALE 0 ORDER 0 is checked against the
real launch's pre-SwiGLU rows (same sums up to order) so the probe's loop is the kernel's.

Session 28 (one H200, bench/results/moe_mxfp4.jsonl case probe_a8_up): at four tokens the loop is 33 us (0.72 of
copy), 27.7 (0.86) with SCALE 1 and 26.7 with SCALE 1 and DEC 1, so the per-step scaling's waits cost ~5 us and the
decode ~1; the production launch is 37.4 us (13.4 at one token). SCALE 7 (the real math in that form) is 43-45 us:
the table decode's ALU work costs more than the waits it removes. Variants dropped after their runs (code in
commit 65fad49): a step of lag before scaling (Triton waits on every MMA: 34 us), R steps' groups in N = 8R columns
scaled every R steps (34-74 us), a K slice's groups in N columns scaled once (35-62 us; 11.0 at one token, R = 4),
Triton's tl.dot_scaled on bf16 x (100-104 us).

    PYTHONPATH=$PWD python3 bench/probe_a8_up.py [--tokens 4] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_graph  # noqa: E402
from bench.sweep_mxfp4_decode import CALLS, case_inputs, rank_experts  # noqa: E402
from ds4f.kernels import moe_mxfp4_a8 as a8  # noqa: E402
from ds4f.kernels.moe_mxfp4_a8 import _gdot8, _half, _xb_load  # noqa: E402
from ds4f.kernels.moe_mxfp4_decode_kernels import _scales  # noqa: E402

_FREE_LO = tl.constexpr("mov.b32 $0, $1;")
_FREE_HI = tl.constexpr("shr.b32 $0, $1, 4;")
# four packed bytes ($2) and their scale groups' exponent offsets d ($3, one byte each, 0..12) -> the e4m3 bytes of
# their low ($0) and high ($1) nibbles times 2^(d - 6): a PRMT table of the eight magnitudes for this d (code 1 =
# 0.5 is 2^(d - 7): a normal for d >= 1), the codes gathered into PRMT's four selector nibbles, the sign ORed in
_FOLD = tl.constexpr(
    "{\n.reg .b32 d, a, b, la, lb, t;\n"
    "and.b32 d, $3, 0xFF;\nmad.lo.u32 lb, d, 0x08080808, 0x1C181410;\nshl.b32 t, d, 3;\nmax.u32 t, t, 4;\n"
    "shl.b32 t, t, 8;\nmad.lo.u32 la, d, 0x08080000, 0x0C080000;\nor.b32 la, la, t;\n"
    "and.b32 a, $2, 0x07070707;\nshr.b32 b, a, 4;\nor.b32 a, a, b;\nprmt.b32 a, a, 0, 0x0020;\n"
    "prmt.b32 a, la, lb, a;\nshl.b32 t, $2, 4;\nlop3.b32 $0, a, t, 0x80808080, 0xF8;\n"
    "shr.b32 a, $2, 4;\nand.b32 a, a, 0x07070707;\nshr.b32 b, a, 4;\nor.b32 a, a, b;\n"
    "prmt.b32 a, a, 0, 0x0020;\nprmt.b32 a, la, lb, a;\nlop3.b32 $1, a, $2, 0x80808080, 0xF8;\n}\n")
_CHEAP_LO = tl.constexpr("and.b32 $0, $1, 0x9C9C9C9C;")
_CHEAP_HI = tl.constexpr("{\n.reg .b32 a;\nshl.b32 a, $1, 1;\nand.b32 $0, a, 0x9C9C9C9C;\n}\n")


@triton.jit
def _dec(q, R: tl.constexpr, DEC: tl.constexpr):
    if DEC == 0:
        return _half(q, R, False)
    if DEC == 1:
        if R == 0:
            return tl.inline_asm_elementwise(_FREE_LO, "=r,r", [q], dtype=tl.float8e4nv, is_pure=True, pack=4)
        return tl.inline_asm_elementwise(_FREE_HI, "=r,r", [q], dtype=tl.float8e4nv, is_pure=True, pack=4)
    if R == 0:
        return tl.inline_asm_elementwise(_CHEAP_LO, "=r,r", [q], dtype=tl.float8e4nv, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(_CHEAP_HI, "=r,r", [q], dtype=tl.float8e4nv, is_pure=True, pack=4)


@triton.jit
def _dot2(q, be, bo, acc, DEC: tl.constexpr):
    return tl.dot(_dec(q, 1, DEC), bo, tl.dot(_dec(q, 0, DEC), be, acc))


@triton.jit
def _fold_dot(q, dd, be, bo, acc):
    lo, hi = tl.inline_asm_elementwise(_FOLD, "=r,=r,r,r", [q, dd], dtype=(tl.float8e4nv, tl.float8e4nv),
                                       is_pure=True, pack=4)
    return tl.dot(hi, bo, tl.dot(lo, be, acc))


@triton.jit
def _probe_up(q_ptr, s_ptr, ids_ptr, out_ptr, s_qe, s_qn, s_se, s_sn, xb_ptr, xs_ptr, I: tl.constexpr,
              DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DEC: tl.constexpr, SCALE: tl.constexpr, ORDER: tl.constexpr, R: tl.constexpr = 1, rb_ptr=None):
    # program (pick m, BLOCK_N gate rows + the same up rows), the whole K: out[m, {0, I} + rn] = the row sums
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.load(ids_ptr + pid_m).to(tl.int64)
    r64 = rn.to(tl.int64)[:, None]
    KB: tl.constexpr = BLOCK_K // 2
    NS: tl.constexpr = DM // BLOCK_K
    NG: tl.constexpr = BLOCK_K // 32
    qg = q_ptr + e * s_qe + r64 * s_qn + tl.arange(0, KB)[None, :]
    sg = s_ptr + e * s_se + r64 * s_sn + tl.arange(0, 16)[None, :]
    acc_g = tl.zeros([BLOCK_N, 16], tl.float32)
    acc_u = tl.zeros([BLOCK_N, 16], tl.float32)
    fg_n = _scales(sg, NG, True, False)
    fu_n = _scales(sg + I * s_sn, NG, True, False)
    if SCALE == 7:  # the weights' scales folded into the e4m3 operand (2^(s - row base)), x one scale per token
        # (xs_ptr [T]): SCALE 1's in-place loop with the real math; rb_ptr [E, 2I] the rows' base exponents
        sl7 = tl.program_id(2)
        rbg = tl.load(rb_ptr + e * (2 * I) + rn).to(tl.int32)
        rbu = tl.load(rb_ptr + e * (2 * I) + I + rn).to(tl.int32)
        s7 = s_ptr + e * s_se + r64 * s_sn + tl.arange(0, NG)[None, :]
        for i in range(0, R):
            kb = sl7 * R + i
            pe = xb_ptr + ((pid_m // TOPK) * NS + kb).to(tl.int64) * (32 * KB) + tl.arange(0, 16)[:, None] * KB + \
                tl.arange(0, KB)[None, :]
            be = tl.trans(tl.load(pe))
            bo = tl.trans(tl.load(pe + 16 * KB))
            dg = (tl.load(s7 + kb * NG).to(tl.int32) - rbg[:, None]).to(tl.uint8)
            du = (tl.load(s7 + I * s_sn + kb * NG).to(tl.int32) - rbu[:, None]).to(tl.uint8)
            dg = tl.reshape(tl.broadcast_to(dg[:, :, None], [BLOCK_N, NG, 16]), [BLOCK_N, KB])
            du = tl.reshape(tl.broadcast_to(du[:, :, None], [BLOCK_N, NG, 16]), [BLOCK_N, KB])
            acc_g = _fold_dot(tl.load(qg + kb * KB), dg, be, bo, acc_g)
            acc_u = _fold_dot(tl.load(qg + I * s_qn + kb * KB), du, be, bo, acc_u)
        xsc = tl.load(xs_ptr + pid_m // TOPK)
        op = out_ptr + (pid_m * (NS // R) + sl7).to(tl.int64) * (2 * I) + rn
        tl.store(op, tl.sum(acc_g, 1) * ((rbg + 6) << 23).to(tl.float32, bitcast=True) * xsc)
        tl.store(op + I, tl.sum(acc_u, 1) * ((rbu + 6) << 23).to(tl.float32, bitcast=True) * xsc)
        return
    if SCALE == 6:  # SCALE 1's loop (no scales: timing only) over a K slice of R steps; out [M, SPLIT, 2I]
        sl6 = tl.program_id(2)
        for i in range(0, R):
            kb = sl6 * R + i
            be, bo, xs = _xb_load(xb_ptr, xs_ptr, (pid_m // TOPK) * NS + kb, KB)
            acc_g = _dot2(tl.load(qg + kb * KB), be, bo, acc_g, DEC)
            acc_u = _dot2(tl.load(qg + I * s_qn + kb * KB), be, bo, acc_u, DEC)
        op = out_ptr + (pid_m * (NS // R) + sl6).to(tl.int64) * (2 * I) + rn
        tl.store(op, tl.sum(acc_g, 1))
        tl.store(op + I, tl.sum(acc_u, 1))
        return
    for kb in range(0, NS):
        be, bo, xs = _xb_load(xb_ptr, xs_ptr, (pid_m // TOPK) * NS + kb, KB)
        wg = tl.load(qg + kb * KB)
        wu = tl.load(qg + I * s_qn + kb * KB)
        if SCALE == 1:
            acc_g = _dot2(wg, be, bo, acc_g, DEC)
            acc_u = _dot2(wu, be, bo, acc_u, DEC)
        else:
            fg = fg_n
            fu = fu_n
            fg_n = _scales(sg + (kb + 1) * NG, NG, kb + 1 < NS, False)
            fu_n = _scales(sg + I * s_sn + (kb + 1) * NG, NG, kb + 1 < NS, False)
            if ORDER == 1:
                zero = tl.zeros([BLOCK_N, 16], tl.float32)
                dg = _dot2(wg, be, bo, zero, DEC)
                du = _dot2(wu, be, bo, zero, DEC)
                acc_g += dg * (fg * xs[None, :])
                acc_u += du * (fu * xs[None, :])
            elif DEC == 0:
                acc_g += _gdot8(wg, be, bo, False) * (fg * xs[None, :])
                acc_u += _gdot8(wu, be, bo, False) * (fu * xs[None, :])
            else:
                acc_g += _dot2(wg, be, bo, tl.zeros([BLOCK_N, 16], tl.float32), DEC) * (fg * xs[None, :])
                acc_u += _dot2(wu, be, bo, tl.zeros([BLOCK_N, 16], tl.float32), DEC) * (fu * xs[None, :])
    op = out_ptr + pid_m.to(tl.int64) * (2 * I) + rn
    tl.store(op, tl.sum(acc_g, 1) * 64.0)
    tl.store(op + I, tl.sum(acc_u, 1) * 64.0)


def probe(q13: torch.Tensor, s13: torch.Tensor, ids: torch.Tensor, xb: tuple[torch.Tensor, ...],
          out: torch.Tensor, cfg: tuple[int, ...], dec: int, scale: int, order: int, r: int = 1) -> None:
    """xb: _a8_expand's (operands, scales); SCALE 7: fold_inputs'."""
    bn, bk, _, nw, ns = cfg
    I = q13.shape[1] // 2
    x3 = dict(R=r) if scale == 6 else dict(R=r, rb_ptr=xb[2]) if scale == 7 else {}
    split = q13.shape[2] * 2 // bk // r if scale in (6, 7) else 1
    _probe_up[(ids.numel(), I // bn, split)](q13, s13, ids, out, q13.stride(0), q13.stride(1), s13.stride(0),
                                      s13.stride(1), xb[0], xb[1], I=I, DM=q13.shape[2] * 2, TOPK=ids.shape[1],
                                      BLOCK_N=bn, BLOCK_K=bk, DEC=dec, SCALE=scale, ORDER=order, num_warps=nw,
                                      num_stages=ns, **x3)


def real_up(x: torch.Tensor, q13: torch.Tensor, s13: torch.Tensor, ids: torch.Tensor, a: torch.Tensor,
            xb: tuple[torch.Tensor, torch.Tensor], cfg: tuple[int, ...]) -> None:
    """The model's up launch at this tile (SPLIT 1, no HALF: no arrival), SwiGLU rows into a."""
    bn, bk, sp, nw, ns = cfg
    I = q13.shape[1] // 2
    assert sp == 1
    a8._a8_up[(ids.numel(), I // bn, 1)](x, q13, s13, ids, a, a, a, 10.0, x.stride(0), q13.stride(0),
                                         q13.stride(1), s13.stride(0), s13.stride(1), a.stride(0), I=I,
                                         DM=x.shape[1], TOPK=ids.shape[1], BLOCK_N=bn, BLOCK_K=bk, SPLIT=1, F32=0,
                                         XB=True, xb_ptr=xb[0], xs_ptr=xb[1], num_warps=nw, num_stages=ns)


def run_case(T: int, inter: int, q13: torch.Tensor, s13: torch.Tensor, per_expert: int, copy_gbps: float,
             meta: dict, out: str, only: str = "") -> None:
    """Every variant at T tokens: check line, then one timing line (and JSON record) each."""
    xs, ids, _, nbytes = case_inputs(2, T, per_expert)
    nbytes *= 2 / 3  # the up half of each expert's bytes (w13 of w13 + w2)
    cfg = a8.CONFIGS[(4096, inter, 4)][0] if T > 1 else (64, 256, 1, 4, 4)
    xbs = [a8.expand_x(x, cfg[1]) for x in xs]
    flat = [i.contiguous() for i in ids]
    outs = [torch.empty(i.numel(), 2 * inter, device="cuda") for i in ids]
    acts = [torch.empty(i.numel(), inter, dtype=torch.bfloat16, device="cuda") for i in ids]
    # the probe's loop is the kernel's: its rows through the kernel's SwiGLU equal the real launch's
    probe(q13, s13, flat[0], xbs[0], outs[0], cfg, 0, 0, 0)
    real_up(xs[0], q13, s13, flat[0], acts[0], xbs[0], cfg)
    g, u = outs[0][:, :inter], outs[0][:, inter:]
    ref = (torch.nn.functional.silu(g.clamp(max=10.0)) * u.clamp(-10.0, 10.0)).bfloat16().float()
    err = ((acts[0].float() - ref).norm() / ref.norm()).item()
    print(f"T={T} tile {cfg}: probe vs real launch rel err {err:.2e}", flush=True)
    cases = [("real _a8_up", lambda i: real_up(xs[i], q13, s13, flat[i], acts[i], xbs[i], cfg))]
    for dec, scale, order in itertools.product((0, 1, 2), (0, 1), (0, 1)):
        if scale == 1 and order == 1:
            continue
        cases.append((f"probe DEC={dec} SCALE={scale} ORDER={order}",
                      lambda i, d=dec, s=scale, o=order: probe(q13, s13, flat[i], xbs[i], outs[i], cfg, d, s, o)))
    base = outs[0].clone()
    for rr, ns, bk in ((16, 4, 256), (8, 4, 256), (4, 4, 256), (8, 3, 512), (4, 3, 512), (2, 3, 512)):
        c6 = (cfg[0], bk, 1, cfg[3], ns)
        x6 = [a8.expand_x(x, bk) for x in xs]
        o6 = [torch.empty(i.numel(), 4096 // bk // rr, 2 * inter, device="cuda") for i in ids]
        cases.append((f"probe SCALE=6 R={rr} bk={bk} ns={ns}", lambda i, r=rr, x=x6, c=c6, o=o6:
                      probe(q13, s13, flat[i], x[i], o[i], c, 0, 6, 0, r)))
    for rr, ns, bk in ((16, 4, 256), (8, 4, 256), (4, 4, 256), (4, 3, 256), (8, 3, 256), (2, 4, 256)):
        c7 = (cfg[0], bk, 1, cfg[3], ns)
        x7 = [fold_inputs(x, s13, bk) for x in xs]
        o7 = [torch.empty(i.numel(), 4096 // bk // rr, 2 * inter, device="cuda") for i in ids]
        probe(q13, s13, flat[0], x7[0], o7[0], c7, 0, 7, 0, rr)
        e7 = ((o7[0].sum(1) - base).norm() / base.norm()).item()
        print(f"T={T} SCALE=7 R={rr} bk={bk} ns={ns} vs SCALE=0: rel err {e7:.2e}", flush=True)
        cases.append((f"probe SCALE=7 R={rr} bk={bk} ns={ns}", lambda i, r=rr, x=x7, c=c7, o=o7:
                      probe(q13, s13, flat[i], x[i], o[i], c, 0, 7, 0, r)))
    cases.append(("real _a8_up production tiles", lambda i: prod_up(xs[i], q13, s13, flat[i], acts[i])))
    for name, fn in cases:
        if only and not any(o in name for o in only.split(",")):
            continue
        us = time_graph(fn, CALLS, CALLS, 5)
        frac = nbytes / (us * 1e-6) / (copy_gbps * 1e9)
        print(f"T={T} {name:32s} {us:7.2f} us  {frac:.3f} of copy", flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(dict(bench="probe_a8_up", T=T, tile=list(cfg), variant=name, us=round(us, 2),
                                        frac_copy=round(frac, 3), check_rel_err=err, copy_gbps=round(copy_gbps, 1),
                                        **meta)) + "\n")


def fold_inputs(x: torch.Tensor, s13: torch.Tensor, bk: int) -> tuple[torch.Tensor, ...]:
    """SCALE 7's: x [T, D] quantized to e4m3 with one power-of-two scale per token as B operands [T, D / bk, 2,
    16, bk / 2] (row 0 the values, rows 1..15 zero), the scales [T] fp32, the rows' base exponents [E, 2I] uint8."""
    T, D = x.shape
    amax = x.float().abs().amax(1).clamp(min=1e-30)
    sc = torch.exp2(torch.ceil(torch.log2(amax / 448.0)))
    xq = (x.float() / sc[:, None]).to(torch.float8_e4m3fn).view(torch.uint8).view(T, D // bk, bk // 2, 2)
    xb = torch.zeros(T, D // bk, 2, 16, bk // 2, dtype=torch.uint8, device=x.device)
    xb[:, :, 0, 0] = xq[..., 0]
    xb[:, :, 1, 0] = xq[..., 1]
    base = s13.amin(2)
    assert int((s13.amax(2).int() - base.int()).max()) <= 12, "row scale spread past 12"
    return xb.view(torch.float8_e4m3fn), sc.contiguous(), base.contiguous()


def prod_up(x: torch.Tensor, q13: torch.Tensor, s13: torch.Tensor, ids: torch.Tensor, a: torch.Tensor) -> None:
    """The model's up launch at T = x.shape[0] as moe_decode makes it (CONFIGS' tile, HALF where on, the arrival
    sums of SPLIT / HALF), _a8_expand included."""
    from ds4f.kernels import arrival
    from ds4f.kernels.moe_mxfp4_decode import bucket

    T, I = x.shape[0], q13.shape[1] // 2
    bn, bk, sp, nw, ns = a8.CONFIGS[(x.shape[1], I, bucket(T))][0]
    half = bucket(T) in a8.HALF
    xb = a8.expand_x(x, bk)
    part = torch.empty(ids.numel() * sp * 2 * I, dtype=torch.float32, device=x.device)
    lock = arrival.counters(x.device, 64 * (I // bn), ("probe_up", I, bn))
    a8._a8_up[(ids.numel(), I // bn, sp * (2 if half else 1))](
        x, q13, s13, ids, a, part, lock, 10.0, x.stride(0), q13.stride(0), q13.stride(1), s13.stride(0),
        s13.stride(1), a.stride(0), I=I, DM=x.shape[1], TOPK=ids.shape[1], BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp, F32=0,
        XB=True, xb_ptr=xb[0], xs_ptr=xb[1], HALF=half, num_warps=nw, num_stages=ns)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4")
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="", help="comma-separated substrings: time only the variants naming one")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/probe_a8_up.py " + " ".join(sys.argv[1:]))
    inter, w, per_expert = rank_experts(2)
    for T in (int(v) for v in args.tokens.split(",")):
        run_case(T, inter, w[0], w[1], per_expert, copy_gbps, meta, args.out, args.only)


if __name__ == "__main__":
    main()
