"""bench tool, the weight-streaming decode kernels of one TP=2 rank under Nsight Compute and against L2 residency: the
MXFP4 routed MoE (moe_mxfp4_a8's _a8_up / _a8_down, T = 1 and 4, six picks) and the FP8 GEMVs (fp8_gemv's a8 form at
its table tiles: wq_b, wo_a, wo_b, [wq_a; wkv], the shared expert's w13 / w2), each as the model launches it.

--ncu: one warm-up call of every case, then one call each between cudaProfilerStart / Stop, for
    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python3 bench/ncu_decode.py --ncu
(ncu replays each kernel with the caches flushed: its DRAM throughput, stall reasons and occupancy are those of a
cold call, as in the step, where no weight is still in the L2 from the step before).
--time (default): us per call from a CUDA graph of CALLS calls, each case "cold" (distinct weight copies, > 2x the
L2 per graph cycle) and "hot" (one copy: its bytes stay in the L2 between calls, for the cases under ~40 MB), PDL
off, so a call's time is its own: hot well under cold means HBM (or the way the kernel asks for it) bounds it,
hot about cold means the kernel's own latency does. One JSON record per case to --out.

Session 16 timed the GEMVs here also with x quantized once per program before the K loop into scratch rows that the
loop streamed with the weights (bench/results/decode_kernels.jsonl, revision d4914da): slower at every shape (wq_b
9.62 vs 8.23 us cold), as the weight stream then starts only after that serial pass; the code was dropped.

    PYTHONPATH=$PWD python3 bench/ncu_decode.py [--ncu] [--cases moe_T4,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_graph  # noqa: E402
from bench.sweep_fp8_gemv import v4_shapes  # noqa: E402
from bench.sweep_mxfp4_decode import LIMIT, case_inputs, rank_experts  # noqa: E402
from ds4f.kernels import fp8_gemv, pdl  # noqa: E402
from ds4f.kernels.fp8_gemm import _scale_arg  # noqa: E402
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4  # noqa: E402

GEMVS = ("WQ_B_TP2", "WO_A_TP2", "WO_B_TP2", "IN_PROJ", "W13_TP2", "W2_TP2")
L2_BYTES = 50 * 2**20
CALLS = 24


def gemv_case(name: str) -> tuple[Callable[[int], object], int, int]:
    """-> (fn(copy i): one a8 GEMV call at T=1 as the model launches it, bytes per call, copies for a cold graph)."""
    nt, k, groups = v4_shapes()[name]
    nbytes = nt * k + math.ceil(nt / 128) * math.ceil(k / 128)
    copies = max(2, math.ceil(2 * L2_BYTES / nbytes))
    ws = [(torch.randn(nt, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(copies)]
    ss = [_scale_arg(torch.randint(118, 124, (math.ceil(nt / 128), math.ceil(k / 128)), device="cuda",
                                   dtype=torch.uint8).view(torch.float8_e8m0fnu)) for _ in range(copies)]
    x = torch.randn(1, groups, k, device="cuda").bfloat16()
    out = torch.empty(1, groups, nt // groups, dtype=torch.bfloat16, device="cuda")

    def fn(i: int) -> object:
        return fp8_gemv.w8_gemv(x, ws[i], ss[i][0], ss[i][1], out, groups, True, force=True)
    return fn, nbytes, copies


def moe_case(T: int, w: tuple[torch.Tensor, ...], per_expert: int) -> tuple[Callable[[int], object], int, int]:
    """-> (fn(call i): the routed experts of one layer at T tokens with call i's picks, bytes per call, calls)."""
    xs, ids, wts, nbytes = case_inputs(2, T, per_expert)

    def fn(i: int) -> object:
        return fused_moe_mxfp4(xs[i], *w, ids[i], wts[i], LIMIT)
    return fn, int(nbytes), len(xs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncu", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    known: dict[str, int] = {f"moe_T{t}": t for t in (1, 4)} | dict.fromkeys(GEMVS, 0)  # name -> MoE tokens
    want = args.cases.split(",") if args.cases else list(known)
    if unknown := [n for n in want if n not in known]:  # before any GPU work
        ap.error(f"--cases: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    pdl.ENABLED = False  # each kernel's own time (PDL would start it early, waiting on the one before)
    _, w, per_expert = rank_experts(2)
    cases: dict[str, tuple[Callable[[int], object], int, int]] = {
        n: moe_case(t, w, per_expert) if t else gemv_case(n) for n, t in known.items() if n in want}
    for fn, _, _ in cases.values():
        fn(0)
    torch.cuda.synchronize()
    if args.ncu:
        torch.cuda.cudart().cudaProfilerStart()
        for name, (fn, _, _) in cases.items():
            torch.cuda.nvtx.range_push(name)
            fn(1)
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/ncu_decode.py " + " ".join(sys.argv[1:]))
    print(f"device {meta['gpu']} copy {copy_gbps:.0f} GB/s, PDL off", flush=True)
    for name, (fn, nbytes, copies) in cases.items():
        cold = time_graph(fn, copies, max(CALLS, copies))
        hot = time_graph(lambda i, fn=fn: fn(0), 1, CALLS) if nbytes < 0.8 * L2_BYTES else None
        frac = nbytes / (cold * 1e-6) / (copy_gbps * 1e9)
        print(f"{name:17s} {nbytes / 2**20:7.1f} MB  cold {cold:7.2f} us ({frac:.2f} of copy)  hot "
              + (f"{hot:7.2f} us" if hot else "   -"), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(bench="ncu_decode", case=name, mb=round(nbytes / 2**20, 2),
                                        cold_us=round(cold, 2), hot_us=round(hot, 2) if hot else None,
                                        frac_copy=round(frac, 3), copy_gbps=round(copy_gbps, 1), **meta)) + "\n")


if __name__ == "__main__":
    main()
