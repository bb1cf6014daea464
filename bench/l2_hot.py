"""Is a decode GEMV bound by HBM or by the kernel? Each TP=2 decode projection (fp8_gemv.w8_gemv, the default decode
path) and the routed MXFP4 MoE (fused_moe_mxfp4's default) timed with its weights cold (a CUDA graph cycling through
>= --mb MB of weight copies / distinct random picks, as the sweeps time them) and hot (one copy / the same picks every
call: the weights sit in the 50 MB L2 when they fit), back to back (PDL overlaps a call's weight loads with the call
before) and after a dependency (a torch launch on x between calls: no early start, as after a latency-bound kernel
in the model; that launch's own time subtracted). A hot / cold ratio near 1 says the kernel bounds it, not HBM.

    PYTHONPATH=$PWD python3 bench/l2_hot.py [--shapes WQ_B_TP2,...] [--tokens 1,4] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure_ceilings, run_meta, time_graph
from bench.sweep_fp8_gemv import v4_shapes
from bench.sweep_fp8_gemv_cc import TP2, weights
from bench.sweep_mxfp4_decode import CALLS, LIMIT, case_inputs, rank_experts
from ds4f.kernels import fp8_gemv
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4


def times(fn, x: torch.Tensor, copies: int, calls: int) -> tuple[float, float, float]:
    """(cold back to back, hot back to back, cold after a dependency, hot after one) us per call; fn(i) runs on
    copy i."""
    def dep(i: int, fn=fn) -> None:
        x.mul_(1.0)
        fn(i)

    mul = time_graph(lambda i: x.mul_(1.0), 1, calls)
    return (time_graph(fn, copies, calls), time_graph(fn, 1, calls),
            time_graph(dep, copies, calls) - mul, time_graph(dep, 1, calls) - mul)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=TP2)
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--mb", type=int, default=96)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(5)
    meta = run_meta("python3 bench/l2_hot.py " + " ".join(sys.argv[1:]))
    print(f"device {meta['gpu']} copy {copy_gbps:.0f} GB/s", flush=True)
    recs = []

    def emit(name: str, t: int, mb: float, us: tuple[float, ...]) -> None:
        cold, hot, dcold, dhot = us
        rec = dict(case="l2_hot", shape=name, t=t, MB=round(mb, 2), cold_us=round(cold, 2), hot_us=round(hot, 2),
                   dep_cold_us=round(dcold, 2), dep_hot_us=round(dhot, 2),
                   cold_frac_copy=round(mb * 2**20 / cold / 1e3 / copy_gbps, 3),
                   dep_cold_frac_copy=round(mb * 2**20 / dcold / 1e3 / copy_gbps, 3),
                   copy_gbps=round(copy_gbps, 1), **meta)
        print(f"{name:10s} T={t} {mb:6.1f} MB  b2b cold {cold:6.2f} hot {hot:6.2f} ({hot / cold:.2f})   after dep "
              f"cold {dcold:6.2f} hot {dhot:6.2f} ({dhot / dcold:.2f})  cold {rec['dep_cold_frac_copy']} of copy",
              flush=True)
        recs.append(rec)

    shapes = v4_shapes()
    for name in args.shapes.split(","):
        nt, k, groups = shapes[name]
        ws, _, sc = weights(shapes[name], args.mb)
        mb = (nt * k + (-(-nt // 128)) * (k // 128)) / 2**20
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, groups, k, device="cuda").bfloat16()
            out = torch.empty(t, groups, nt // groups, dtype=torch.bfloat16, device="cuda")

            def gemv(i: int, ws=ws, sc=sc, x=x, out=out, groups=groups) -> None:
                assert fp8_gemv.w8_gemv(x, ws[i], sc[i][0], sc[i][1], out, groups, True)

            emit(name, t, mb, times(gemv, x, len(ws), len(ws) * 4))
        del ws, sc
        torch.cuda.empty_cache()
    inter, w, per_expert = rank_experts(2)
    for t in (int(v) for v in args.tokens.split(",")):
        xs, ids, wts, nbytes = case_inputs(2, t, per_expert)

        def moe(i: int, xs=xs, ids=ids, wts=wts) -> None:
            fused_moe_mxfp4(xs[i], *w, ids[i], wts[i], LIMIT)

        emit("MOE_TP2", t, nbytes / 2**20, times(moe, xs[0], CALLS, CALLS))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)


if __name__ == "__main__":
    main()
