"""bench probe, a warp-specialized FP8 decode GEMV (sm_90+, Triton >= 3.4): the weight tiles streamed by TMA
(tensor descriptors) in a producer partition (`tl.range(..., warp_specialize=True)`) ahead of the MMA warps, against
ds4f/kernels/fp8_gemv.py's a8 kernel at the TP=2 decode shapes, T = 1 and 4.

Why: Nsight Compute (bench/results/profiles/s16_ncu_decode.txt) shows the a8 GEMVs bound by each K step's serial
chain in one warpgroup (x from shared memory, max reduction, quantization, operand store, barrier, wgmma, wait), with
L2-resident weights only 15-20 % faster; moving the x work before the loop made it slower (the weight stream started
later). Here a producer keeps NUM_STAGES weight tiles in flight whatever the consumer does. Two consumer forms:
`x8`: x quantized once per call outside the timed kernel (an upper bound: the operands as XB gives the MoE),
`bf16`: x loaded per step and quantized in the loop, as the a8 kernel does. K split over programs with fp32
partials summed by one torch launch after the kernel (timed with it; an atomic add in the kernel stops the
warp-specialization pass). Checks every variant against
fp8_linear_a8_ref, prints us per call from a CUDA graph over weight copies past the L2 and the fraction of the copy
ceiling, one JSON record per (shape, T, variant) to --out.

Offline (session 16, Triton 3.6, sm_90 builds): every form builds, the warp-specialized ones with setmaxnreg
partitions, once every load in the loop is a tensor-descriptor load or a plain load and the epilogue has no atomic
(an atomic add of the tile stopped the NVGPUWarpSpecialization pass: "Unexpected asyncTaskIds.size()").

    PYTHONPATH=$PWD python3 bench/probe_ws_gemv.py [--shapes WQ_B_TP2,WO_B_TP2,IN_PROJ] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure_ceilings, run_meta, time_graph  # noqa: E402,RUF100
from bench.sweep_fp8_gemv import v4_shapes  # noqa: E402,RUF100
from ds4f.kernels import fp8_gemv  # noqa: E402,RUF100
from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_a8_ref, quant_act_ref  # noqa: E402,RUF100
from ds4f.kernels.fp8_gemv_kernels import quant_rows  # noqa: E402,RUF100


@triton.jit
def _ws_gemv(w_ptr, ws_ptr, x_ptr, xs_ptr, out_ptr, T, N, K, k_per, KSP, XSP,
             BLOCK_N: tl.constexpr, X8: tl.constexpr, WS: tl.constexpr, STAGES: tl.constexpr):
    # program (row tile, K slice): out[t, rows] += sum over the slice's 128-column blocks of
    # (W_blk . xq_blk^T) * w_scale * x_scale; X8: x given as e4m3 [16, K] + scales [16, XSP], else bf16 [16, K].
    # Every load in the loop is a tensor-descriptor load (what the warp-specialization pass takes): the UE8M0 weight
    # scales [N / 128, KSP] (K / 128 padded to 16 bytes) as 16-byte boxes, the x scales [16, XSP] (K / 128 padded
    # to 4) as [16, 4] boxes;
    # the step's scale is picked out of its box
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, 128])
    s_desc = tl.make_tensor_descriptor(ws_ptr, shape=[N // 128, KSP], strides=[KSP, 1], block_shape=[1, 16])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[16, K], strides=[K, 1], block_shape=[16, 128])
    if X8:
        xs_desc = tl.make_tensor_descriptor(xs_ptr, shape=[16, XSP], strides=[XSP, 1], block_shape=[16, 4])
    rt = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    k0 = pid_s * k_per
    for k in tl.range(k0, k0 + k_per, 128, warp_specialize=WS, num_stages=STAGES):
        kb = k // 128
        w = w_desc.load([pid_n * BLOCK_N, k])
        sb = s_desc.load([pid_n, kb // 16 * 16])  # [1, 16] UE8M0 bytes
        sv = tl.sum(tl.where(tl.arange(0, 16)[None, :] == kb % 16, sb.to(tl.int32), 0))
        s = (sv << 23).to(tl.float32, bitcast=True)
        if X8:
            q = x_desc.load([0, k])
            xb = xs_desc.load([0, kb // 4 * 4])  # [16, 4]
            xs = tl.sum(tl.where(tl.arange(0, 4)[None, :] == kb % 4, xb, 0.0), 1)
        else:
            q32, xs = quant_rows(x_desc.load([0, k]).to(tl.float32), False)
            q = q32.to(tl.float8e4nv)
        acc += tl.dot(w, tl.trans(q)) * (s * xs[None, :])
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # the slice's partial [16, N] of part [SPLIT, 16, N] (an atomic add here stops the warp-specialization pass)
    tl.store(out_ptr + pid_s * 16 * N + rt[None, :] * N + rn[:, None], acc, mask=(rt[None, :] < T) & (rn[:, None] < N))


def _alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def run(w, ws, x16, xq, xs, T, cfg, x8, wsp) -> torch.Tensor:
    """ws: the UE8M0 weight scales padded to 16 bytes a row, xs: the x scales [16, K / 128 padded] (see _ws_gemv)."""
    bn, split, nw, stages = cfg
    n, k = w.shape
    part = torch.empty(split, 16, n, dtype=torch.float32, device="cuda")
    _ws_gemv[(n // bn, split)](w, ws, xq if x8 else x16, xs, part, T, n, k, k // split, ws.shape[1], xs.shape[1],
                               BLOCK_N=bn, X8=x8, WS=wsp, STAGES=stages, num_warps=nw)
    return part[0, :T] if split == 1 else part[:, :T].sum(0)  # split > 1: one more launch, in the timing too


def _pad16(t: torch.Tensor) -> torch.Tensor:
    """[R, C] -> [R, C rounded up to 16 bytes] (TMA row strides), zeros past C."""
    per = 16 // t.element_size()
    out = torch.zeros(t.shape[0], -(-t.shape[1] // per) * per, dtype=t.dtype, device=t.device)
    out[:, :t.shape[1]] = t
    return out


def one_case(name: str, n: int, k: int, T: int, ws_: list, ss: list, copy_gbps: float, meta: dict,
             out_path: str) -> None:
    """The table's a8 kernel and every probe variant for W [n, k] at T tokens: print, record."""
    nbytes, copies = n * k, len(ws_)
    x = torch.randn(T, k, device="cuda").bfloat16()
    x16 = torch.zeros(16, k, device="cuda", dtype=torch.bfloat16)
    x16[:T] = x
    q, s = quant_act_ref(x16)
    xq, xs = q.contiguous(), _pad16(s.float())
    ref = fp8_linear_a8_ref(x, ws_[0], ss[0].view(torch.float8_e8m0fnu), torch.float32)
    sc = [_scale_arg(t.view(torch.float8_e8m0fnu)) for t in ss]
    sp = [_pad16(t) for t in ss]
    out = torch.empty(T, 1, n, dtype=torch.bfloat16, device="cuda")
    base = time_graph(lambda i: fp8_gemv.w8_gemv(x[:, None], ws_[i], sc[i][0], sc[i][1], out, 1, True, force=True),
                      copies, max(24, copies))
    rec = [("a8 kernel (table)", base, True)]
    tiles = max(1, n // 128)
    for x8, wsp, split in itertools.product((True, False), (True, False),
                                            sorted({1, max(1, 132 // tiles), max(1, 264 // tiles)})):
        if k % (split * 128):
            continue
        cfg = (128, split, 4, 4)
        try:
            got = run(ws_[0], sp[0], x16, xq, xs, T, cfg, x8, wsp)
            ok = ((got - ref).norm() / ref.norm()).item() < 1e-2
            us = time_graph(functools.partial(_call, ws_, sp, x16, xq, xs, T, cfg, x8, wsp), copies, max(24, copies))
        except Exception as ex:  # a form this Triton or device rejects
            print(f"  {name} T={T} x8={x8} ws={wsp} split={split}: FAILED {str(ex)[:160]}")
            continue
        rec.append((f"ws={int(wsp)} x8={int(x8)} split={split}", us, ok))
    for label, us, ok in rec:
        frac = nbytes / (us * 1e-6) / (copy_gbps * 1e9)
        print(f"{name:9s} T={T} {label:28s} {us:7.2f} us {frac:.2f} of copy{'' if ok else ' WRONG'}", flush=True)
        if out_path:
            with open(out_path, "a") as f:
                f.write(json.dumps(dict(bench="probe_ws_gemv", shape=name, n=n, k=k, t=T, variant=label,
                                        us=round(us, 3), frac_copy=round(frac, 4), ok=ok,
                                        copy_gbps=round(copy_gbps, 1), **meta)) + "\n")


def _call(ws_, ss, x16, xq, xs, T, cfg, x8, wsp, i):
    return run(ws_[i], ss[i], x16, xq, xs, T, cfg, x8, wsp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="WQ_B_TP2,WO_B_TP2,IN_PROJ")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    triton.set_allocator(_alloc)  # the device-side tensor descriptors' workspace
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/probe_ws_gemv.py " + " ".join(sys.argv[1:]))
    print(f"device {meta['gpu']} copy {copy_gbps:.0f} GB/s", flush=True)
    shapes = v4_shapes()
    for name in args.shapes.split(","):
        n, k, groups = shapes[name]
        assert groups == 1, "one group"
        copies = max(2, math.ceil(100 * 2**20 / (n * k)))
        ws_ = [(torch.randn(n, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(copies)]
        ss = [torch.randint(118, 124, (n // 128, k // 128), device="cuda", dtype=torch.uint8) for _ in range(copies)]
        for T in (1, 4):
            one_case(name, n, k, T, ws_, ss, copy_gbps, meta, args.out)


if __name__ == "__main__":
    main()
