"""⑥ would an L2 prefetch of a CSA layer's index keys shorten its 1M decode chain? One token, 262,144 e4m3 keys
(33 MiB with their row scales, the 1M step's per-layer indexer read), one H200.

Cases (each replayed from a CUDA graph after a 256 MB L2 flush, median us): the chain alone (index_q, the keys-major
indexer with the first digit, topk_pool_rows_long: bench/chain_1m.py's), the chain with its keys already in L2 (no
flush between a prefetch and it), the prefetch alone at several grid sizes, and a stand-in for the layer's main stream
before the chain (the TP=2 rank's in-proj, indexer-q and wq_b FP8 GEMVs in series) then the chain, without and with
the keys' prefetch on a side stream forked at the stand-in's start. Rows are checked equal with and without it.

    PYTHONPATH=$PWD python3 bench/prefetch_index_keys.py [--programs 16,32,64] [--out bench/results/prefetch.jsonl]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.chain_1m import chain_inputs, run_chain  # noqa: E402
from bench.common import append_jsonl, measure_ceilings, run_meta, time_us  # noqa: E402
from bench.l2_prefetch import prefetch  # noqa: E402
from ds4f.kernels.fp8_gemm import fp8_linear  # noqa: E402
from ds4f.model.quant import FP8_DTYPE  # noqa: E402

GEMVS = [("in_proj", 1536, 4096), ("idx_wq_b", 8192, 1024), ("wq_b", 16384, 1024)]  # TP=2 rank, in series


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=262144)
    ap.add_argument("--programs", default="16,32,64,132")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta(" ".join(["bench/prefetch_index_keys.py", *sys.argv[1:]]))
    L, dev = args.entries, "cuda"
    c = chain_inputs(L, 1, dev)
    k8, ks = c.pools[0]
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, 4096, device=dev, generator=g).bfloat16()
    ws = [((torch.randn(n, k, device=dev, generator=g) * 0.05).to(FP8_DTYPE),
           torch.rand(n // 128, k // 128, device=dev, generator=g) * 0.01 + 0.001) for _, n, k in GEMVS]
    side = torch.cuda.Stream()

    def chain() -> torch.Tensor:
        return run_chain(c, 0)

    def stand_in() -> None:
        for (w8, s), (_, _, k) in zip(ws, GEMVS):
            fp8_linear(x[:, :k], w8, s, torch.bfloat16)

    def keys_prefetch(p: int) -> None:
        prefetch(k8, p)
        prefetch(ks, p)

    def beside(p: int) -> torch.Tensor:
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            keys_prefetch(p)
        stand_in()
        main.wait_stream(side)
        return chain()

    recs = []

    def emit(rec: dict) -> None:
        rec.update(meta, copy_gbps=round(copy_gbps, 1), entries=L)
        print(" ".join(f"{k}={v}" for k, v in rec.items() if k not in meta), flush=True)
        recs.append(rec)

    mb = (k8.numel() * k8.element_size() + ks.numel() * ks.element_size()) / 2**20
    emit({"case": "chain_cold", "us": round(time_us(chain), 2), "keys_MB": round(mb, 1)})
    emit({"case": "chain_after_prefetch", "programs": 132, "us": round(time_us(lambda: (keys_prefetch(132), chain())),
                                                                        2)})
    emit({"case": "chain_hot", "us": round(time_us(chain, flush=False), 2)})
    for p in (int(v) for v in args.programs.split(",")):
        t = time_us(lambda p=p: keys_prefetch(p))
        emit({"case": "prefetch_alone", "programs": p, "us": round(t, 2),
              "frac_copy": round(mb * 2**20 / (t * 1e-6) / (copy_gbps * 1e9), 3)})
    emit({"case": "stand_in_alone", "us": round(time_us(stand_in), 2)})
    serial = time_us(lambda: (stand_in(), chain()))
    emit({"case": "stand_in_then_chain", "us": round(serial, 2)})
    ref = chain().sort(dim=1).values
    for p in (int(v) for v in args.programs.split(",")):
        t = time_us(lambda p=p: beside(p))
        same = torch.equal(beside(p).sort(dim=1).values, ref)
        emit({"case": "stand_in_beside_prefetch_then_chain", "programs": p, "us": round(t, 2),
              "saved_us": round(serial - t, 2), "same_rows": same})
    if args.out:
        append_jsonl(args.out, recs)


if __name__ == "__main__":
    main()
