"""⑥ kernels, where an MXFP4 MoE decode call's time goes, kernel by kernel: the routed experts of one V4-Flash layer
(D=4096, 256 experts, top-6) at the TP=2 / TP=1 per-rank widths, T = 1 and 4 tokens, through fused_moe_mxfp4's
default decode path (the one the model runs). Per kernel: its GPU µs per call (bench/kernel_times_long.kernel_us over
a CUDA graph of CALLS calls with distinct random picks, as bench/sweep_mxfp4_decode.py times them, so the L2 never
holds a pick's bytes), the bytes it must read (up: gate + up rows of each distinct pick, down: its down rows, with
their UE8M0 scales) and that over the copy ceiling measured in the same run. PDL is off unless DS4F_PDL=1 is set,
so a kernel's time is its own and not its wait on the one before.

    PYTHONPATH=$PWD python3 bench/moe_kernel_split.py [--tp 2] [--tokens 1,4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta  # noqa: E402
from bench.kernel_times_long import kernel_us  # noqa: E402
from bench.sweep_mxfp4_decode import CALLS, LIMIT, D, case_inputs, rank_experts  # noqa: E402
from ds4f.kernels import pdl  # noqa: E402
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4  # noqa: E402
from ds4f.model.quant import MXFP4_BLOCK  # noqa: E402


def split_bytes(inter: int, distinct: float) -> dict[str, float]:
    """Bytes per call of the up (gate + up: 2 * inter rows of D) and down (D rows of inter) weights of `distinct`
    picked experts: MXFP4 nibbles + one UE8M0 byte per MXFP4_BLOCK values."""
    per_value = 0.5 + 1 / MXFP4_BLOCK
    return {"up": distinct * 2 * inter * D * per_value, "down": distinct * D * inter * per_value}


def calls(w: tuple[torch.Tensor, ...], xs: list[torch.Tensor], ids: list[torch.Tensor],
          wts: list[torch.Tensor]) -> Callable[[], object]:
    """The CALLS calls, each with its own picks (one graph of them is what kernel_us replays)."""
    return lambda: [fused_moe_mxfp4(xs[i], *w, ids[i], wts[i], LIMIT) for i in range(CALLS)]


def kind(name: str) -> str:
    return "up" if "up" in name else "down" if "down" in name else "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="2")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    pdl.ENABLED = os.environ.get("DS4F_PDL", "0") == "1"  # read at each launch
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/moe_kernel_split.py " + " ".join(sys.argv[1:]))
    meta["env"] = {k: v for k, v in os.environ.items() if k.startswith("DS4F_")} | {"pdl": pdl.ENABLED}
    print(f"device {meta['gpu']} copy {copy_gbps:.0f} GB/s, {CALLS} calls per graph, env {meta['env']}", flush=True)
    for tp in (int(v) for v in args.tp.split(",")):
        inter, w, per_expert = rank_experts(tp)
        for T in (int(v) for v in args.tokens.split(",")):
            xs, ids, wts, nbytes = case_inputs(tp, T, per_expert)
            distinct = nbytes / per_expert
            per_graph = kernel_us(calls(w, xs, ids, wts), args.reps)  # an L2 flush between replays: harmless here
            us = {name: t / CALLS for name, t in per_graph.items()}
            want = split_bytes(inter, distinct)
            print(f"== TP={tp} I={inter} T={T}: {distinct:.1f} distinct experts, {nbytes / 1e6:.1f} MB per call",
                  flush=True)
            rec = dict(case="moe_kernel_split", tp=tp, I=inter, T=T, distinct_experts=round(distinct, 2),
                       copy_gbps=round(copy_gbps, 1), kernels={}, **meta)
            for name, t in sorted(us.items(), key=lambda kv: -kv[1]):
                b = want.get(kind(name), 0.0)
                frac = b / (t * 1e-6) / (copy_gbps * 1e9) if b and t else 0.0
                print(f"  {name:60s} {t:8.2f} us  {b / 1e6:7.1f} MB  {frac:5.2f} of copy", flush=True)
                rec["kernels"][name] = dict(us=round(t, 2), mb=round(b / 1e6, 2), frac_copy=round(frac, 3))
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        del w
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
