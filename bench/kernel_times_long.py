"""⑥ where the 1M-context decode calls' time goes, kernel by kernel (torch.profiler over CUDA-graph replays, L2
flushed before each): one token's indexer over 262,144 CSA entries + top-512 + the attention rows (the decode
chain of a CSA layer at 1M: indexer_scores, topk_indices' passes, glue.topk_rows), and the HCA layer's sparse
attention over 8,192 entries + 128 window rows at 32 heads (one TP=2 rank): its split kernel and its combine.
Prints per call: the wall us of the replay (CUDA events) and each kernel's GPU us; --json appends one record per
call. Inputs as bench/sweep_decode_long.py's (random keys / rows, the indexer's own scores for the top-k).

    PYTHONPATH=$PWD python3 bench/kernel_times_long.py [--iters 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import graph_of, run_meta, time_us  # noqa: E402
from ds4f.kernels import topk_radix  # noqa: E402
from ds4f.kernels.fp8 import quantize_kv_rows, quantize_rows  # noqa: E402
from ds4f.kernels.indexer import (  # noqa: E402
    decode_hist_buffer,
    indexer_scores,
    quant_heads_fp8,
    topk_indices,
    topk_pool_rows_long,
)
from ds4f.kernels.sparse_attn import sparse_attn  # noqa: E402
from ds4f.runner.gpu.glue import topk_rows  # noqa: E402


def kernel_us(fn: Callable[[], object], iters: int) -> dict[str, float]:
    """GPU us per replay of fn's graph by kernel name (the L2 flush between replays left out)."""
    from torch.profiler import ProfilerActivity, profile

    replay = graph_of(fn)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush.zero_()
            replay()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type.name == "CUDA" and "elementwise" not in e.name and "fill" not in e.name.lower():
            out[e.name[:60]] += e.device_time / iters
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    meta = run_meta(" ".join(["bench/kernel_times_long.py", *sys.argv[1:]]))
    meta["env"] = {k: v for k, v in os.environ.items() if k.startswith("DS4F_")}  # the knobs this run was under
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    L, HI, DI, K = 262144, 64, 128, 512
    q8, qs = quant_heads_fp8(torch.randn(1, HI, DI, device=dev, generator=g).bfloat16())
    w = torch.randn(1, HI, device=dev, generator=g) * qs
    k8, ks = quantize_rows(torch.randn(L, DI, device=dev, generator=g).bfloat16(), DI)
    ks = ks.view(-1).contiguous()
    epb, nb = 64, L // 64
    bt = torch.randperm(nb, device=dev, generator=g).int()[None]  # one sequence's block table
    slots = (bt.long()[:, :, None] * epb + torch.arange(epb, device=dev)).reshape(1, L).int()
    seq = torch.zeros(1, dtype=torch.int32, device=dev)
    vl = torch.full((1,), L, dtype=torch.int32, device=dev)
    win = torch.arange(128, dtype=torch.int32, device=dev)[None]
    sc = indexer_scores(q8, w, k8, slots, seq, vl, k_scale=ks, zero_rank=True)

    H, D, KA = 32, 512, 8320
    nope, exp, rope = quantize_kv_rows(torch.randn(16384, D, device=dev, generator=g), 64)
    idx = torch.randperm(16384, device=dev, generator=g)[:KA].int()[None].contiguous()
    qa = torch.randn(1, H, D, device=dev, generator=g).bfloat16()
    sink = torch.randn(H, device=dev, generator=g)
    live = torch.full((1,), KA, dtype=torch.int32, device=dev)

    def chain(fused: bool = False, rows: bool = False) -> object:
        # as FastModel._select: DS4F_INDEXER_HIST=1 hands the indexer's first digit to the top-k; fused: the pick in
        # the gather launch (DS4F_TOPK_FUSED_FINAL); rows: that launch writes the attention rows (topk_pool_rows_long)
        was, topk_radix.FUSED_FINAL = topk_radix.FUSED_FINAL, fused
        try:
            buf = decode_hist_buffer(q8, L, K)
            s = indexer_scores(q8, w, k8, slots, seq, vl, k_scale=ks, zero_rank=True, hist=buf)
            if rows:
                return topk_pool_rows_long(s, K, vl, buf, bt, win, 0, epb)
            return topk_rows(topk_indices(s, K, valid_len=vl, hist_buf=buf), bt, win, 0, epb)
        finally:
            topk_radix.FUSED_FINAL = was

    calls: dict[str, Callable[[], object]] = {
        "indexer": lambda: indexer_scores(q8, w, k8, slots, seq, vl, k_scale=ks, zero_rank=True),
        "topk": lambda: topk_indices(sc, K, valid_len=vl),
        "topk_rows": lambda: topk_rows(topk_indices(sc, K, valid_len=vl), bt, win, 0, epb),
        "chain": chain,
        "chain_fused": lambda: chain(fused=True),
        "chain_rows": lambda: chain(fused=True, rows=True),
        "hca_attn": lambda: sparse_attn(qa, nope, idx, sink, D**-0.5, exp, kv_rope=rope, live=live),
    }
    for name, fn in calls.items():
        wall = time_us(fn, iters=30)
        ks_us = kernel_us(fn, args.iters)
        print(f"{name:10s} wall {wall:7.2f} us   kernels: "
              + ", ".join(f"{k} {v:.2f}" for k, v in ks_us.items()), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(meta, case="decode_1m_kernels", call=name, wall_us=round(wall, 2),
                                        kernel_us={k: round(v, 2) for k, v in ks_us.items()})) + "\n")


if __name__ == "__main__":
    main()
