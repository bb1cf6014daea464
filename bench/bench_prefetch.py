"""⑥ kernels, L2 prefetch microbenchmark: does pulling a decode GEMV's weight into L2 on a side stream, while the main
stream runs latency-bound kernels, shorten chain + GEMV? Per weight shape (V4-Flash TP=2 decode projections, e4m3 with
block scales, through fp8_linear's default decode path; a bf16 GEMV too) and chain length, in CUDA graphs with a
256 MB L2 flush before every replay: the chain alone, the GEMV cold / after a finished prefetch / hot, chain then
GEMV serially, and chain beside the prefetch then GEMV. One line per case, JSON records to --out.

    PYTHONPATH=$PWD python3 bench/bench_prefetch.py --out bench/results/prefetch.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl, measure_ceilings, run_meta, time_us  # noqa: E402
from bench.l2_prefetch import prefetch  # noqa: E402
from ds4f.kernels import gemv  # noqa: E402
from ds4f.kernels.fp8_gemm import fp8_linear  # noqa: E402
from ds4f.model.quant import FP8_DTYPE  # noqa: E402

SHAPES = [("wq_b", 16384, 1024), ("wo_b", 4096, 4096), ("w13_shared", 2048, 4096), ("wq_a+wkv", 1536, 4096)]


def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = (torch.randn(n, k, device="cuda") * 0.05).to(FP8_DTYPE)
    s = torch.rand(-(-n // 128), -(-k // 128), device="cuda") * 0.01 + 0.001
    return w, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chain", default="8,24", help="latency-bound launches before the GEMV")
    ap.add_argument("--programs", default="8,16,32", help="prefetch grid sizes to try")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta(" ".join(sys.argv))
    side = torch.cuda.Stream()
    small = torch.ones(4096, device="cuda")
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    recs = []

    def emit(rec: dict) -> None:
        rec.update(meta, copy_gbps=round(copy_gbps, 1))
        print(" ".join(f"{k}={v}" for k, v in rec.items() if k not in meta), flush=True)
        recs.append(rec)

    def chain(n: int) -> None:
        for _ in range(n):
            small.mul_(1.0000001)

    cases = [(name, n, k, "fp8") for name, n, k in SHAPES] + [("bf16 4096x4096", 4096, 4096, "bf16")]
    for name, n, k, kind in cases:
        if kind == "fp8":
            w, s = fp8_weight(n, k)
            xi = x[:, :k].contiguous()

            def gemm(w=w, s=s, xi=xi) -> torch.Tensor:
                return fp8_linear(xi, w, s, torch.bfloat16)
        else:
            w = (torch.randn(n, k, device="cuda") * 0.05).bfloat16()
            xi = x[:, :k].contiguous()

            def gemm(w=w, xi=xi) -> torch.Tensor:
                return gemv.linear(xi, w)
        mb = w.numel() * w.element_size() / 2**20
        cold = time_us(gemm)
        hot = time_us(gemm, flush=False)
        emit({"case": "gemv", "shape": name, "MB": round(mb, 1), "cold_us": round(cold, 2), "hot_us": round(hot, 2),
              "cold_frac_copy": round(mb * 2**20 / (cold * 1e-6) / (copy_gbps * 1e9), 3)})
        for p in (int(v) for v in args.programs.split(",")):
            def pre_then(p=p, w=w) -> None:
                prefetch(w, p)
                gemm()
            emit({"case": "prefetch_then_gemv", "shape": name, "programs": p,
                  "us": round(time_us(pre_then), 2), "prefetch_us": round(time_us(lambda p=p, w=w: prefetch(w, p)), 2)})
        for c in (int(v) for v in args.chain.split(",")):
            serial = time_us(lambda c=c: (chain(c), gemm()))
            alone = time_us(lambda c=c: chain(c))
            for p in (int(v) for v in args.programs.split(",")):
                def overlapped(c=c, p=p, w=w) -> None:
                    main = torch.cuda.current_stream()
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        prefetch(w, p)
                    chain(c)
                    main.wait_stream(side)
                    gemm()
                t = time_us(overlapped)
                emit({"case": "chain_beside_prefetch", "shape": name, "chain": c, "programs": p, "us": round(t, 2),
                      "serial_us": round(serial, 2), "chain_us": round(alone, 2),
                      "saved_us": round(serial - t, 2)})
    if args.out:
        append_jsonl(args.out, recs)


if __name__ == "__main__":
    main()
