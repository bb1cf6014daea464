"""⑥ decode indexer + top-512, old vs new per-call µs (CUDA graph of N calls on N distinct input copies, replayed,
L2 flushed before each replay): top-k without / with the one-program-per-row kernel (small=0 vs the default), and
indexer_scores in the former adjacent-block tiling (128 x 4 blocks, 4 warps, 3 stages) vs the default (strided
blocks, n_inner cut at a short L). Cases: L = 262,144 (a 1M max_model_len pool) at valid_len 2048 and 262,144, and
L = 2048 (a pool the size of an 8K depth). Each new result is checked against the old one (indexer: bit-equal;
top-k: equal ids where the old path runs one chunk, else the same values). One line per case; --json appends them."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_meta, time_us  # noqa: E402
from ds4f.kernels.fp8 import quantize_rows  # noqa: E402
from ds4f.kernels.indexer import TOPK_KNOBS, indexer_scores, quant_heads_fp8, topk_indices  # noqa: E402
from ds4f.runner.gpu.glue import topk_rows  # noqa: E402

HI, DI, K = 64, 128, 512
CASES = ((262144, 2048), (262144, 65536), (262144, 262144), (2048, 2048))


def per_call(fn: Callable[[int], object], n: int) -> float:
    return time_us(lambda: [fn(i) for i in range(n)], iters=30) / n


def bench_topk(T: int, L: int, vlen: int, n: int, g: torch.Generator) -> dict:
    vl = torch.full((T,), vlen, dtype=torch.int32, device="cuda")
    cols = torch.arange(L, device="cuda")[None, :] >= vl.long()[:, None]
    sc = [torch.randn(T, L, device="cuda", generator=g).masked_fill_(cols, float("-inf")) for _ in range(n)]
    old = topk_indices(sc[0], K, valid_len=vl, small=0)
    new = topk_indices(sc[0], K, valid_len=vl)
    if vlen <= TOPK_KNOBS[0]:
        ok = bool(torch.equal(old, new))
    else:
        ok = all(torch.equal(sc[0][r, old[r].long()].sort().values, sc[0][r, new[r].long()].sort().values)
                 for r in range(T))
    return dict(old_us=per_call(lambda i: topk_indices(sc[i], K, valid_len=vl, small=0), n),
                new_us=per_call(lambda i: topk_indices(sc[i], K, valid_len=vl), n), match=ok)


def bench_indexer(T: int, L: int, vlen: int, n: int, keys: str, g: torch.Generator) -> dict:
    q = torch.randn(T, HI, DI, device="cuda", generator=g).bfloat16()
    w = torch.randn(T, HI, device="cuda", generator=g)
    if keys == "fp8q":
        q, qs = quant_heads_fp8(q)
        w = w * qs
    pools = []
    for _ in range(n):  # distinct key pools: no call finds the previous one's keys in L2
        kp = torch.randn(L, DI, device="cuda", generator=g).bfloat16()
        if keys == "bf16":
            pools.append((kp, None))
        else:
            k8, ks = quantize_rows(kp, DI)
            pools.append((k8, ks.view(-1).contiguous()))
    slots = torch.randperm(L, device="cuda", generator=g).int()[None]
    seq = torch.zeros(T, dtype=torch.int32, device="cuda")
    vl = torch.full((T,), vlen, dtype=torch.int32, device="cuda")

    def old(i: int) -> torch.Tensor:
        return indexer_scores(q, w, pools[i][0], slots, seq, vl, k_scale=pools[i][1], zero_rank=True, block_l=128,
                              n_inner=4, num_warps=4, num_stages=3, strided=False)

    def new(i: int) -> torch.Tensor:
        return indexer_scores(q, w, pools[i][0], slots, seq, vl, k_scale=pools[i][1], zero_rank=True)

    return dict(old_us=per_call(old, n), new_us=per_call(new, n), match=bool(torch.equal(old(0), new(0))))


def bench_chain(T: int, L: int, vlen: int, n: int, g: torch.Generator) -> dict:
    """A CSA layer's decode selection, e4m3 q + keys: indexer_scores + topk_indices + glue.topk_rows with the radix
    passes (passes_us), and the indexer alone (indexer_us). (Session 11's records also time two forms since removed:
    topk_long, a three-launch select with the first digit's histogram in the indexer, 51.7 vs 54.9 us at one token,
    133.3 vs 112.5 at four; and the one-launch barrier form, fused_us: 65.4 vs 54.6, 146.2 vs 112.0.)"""
    W = 128
    q, qs = quant_heads_fp8(torch.randn(T, HI, DI, device="cuda", generator=g).bfloat16())
    w = torch.randn(T, HI, device="cuda", generator=g) * qs
    pools = []
    for _ in range(n):
        k8, ks = quantize_rows(torch.randn(L, DI, device="cuda", generator=g).bfloat16(), DI)
        pools.append((k8, ks.view(-1).contiguous()))
    slots = torch.arange(L, device="cuda", dtype=torch.int32)[None]
    seq = torch.zeros(T, dtype=torch.int32, device="cuda")
    vl = torch.full((T,), vlen, dtype=torch.int32, device="cuda")
    bt = torch.arange(L // 32 + 1, device="cuda")[None].repeat(T, 1)  # identity block table: pool row = id + base
    win = torch.zeros(T, W, dtype=torch.int32, device="cuda")
    rows = (bt, win, 0, 32)

    def ix(i: int) -> torch.Tensor:
        return indexer_scores(q, w, pools[i][0], slots, seq, vl, k_scale=pools[i][1], zero_rank=True)

    def radix(i: int) -> torch.Tensor:
        return topk_rows(topk_indices(ix(i), K, valid_len=vl), *rows)

    return dict(passes_us=per_call(radix, n), indexer_us=per_call(ix, n))

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--keys", default="bf16,fp8,fp8q", help="indexer formats: bf16 q+keys, e4m3 keys, e4m3 q+keys")
    ap.add_argument("--calls", type=int, default=20, help="calls per graph (distinct input copies)")
    ap.add_argument("--json", default="", help="append one JSON record per line to this file")
    ap.add_argument("--chain", action="store_true",
                    help="only the indexer + top-k + rows chain (the radix passes)")
    args = ap.parse_args()
    meta = run_meta(" ".join(sys.argv))
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        for L, vlen in CASES:
            if args.chain:
                rows.append(dict(kernel="chain", T=T, L=L, vlen=vlen, **bench_chain(T, L, vlen, args.calls, g)))
                r = rows[-1]
                print(f"chain T={r['T']:2d} L={r['L']:6d} vlen={r['vlen']:6d}  passes {r['passes_us']:7.2f} us  "
                      f"(indexer {r['indexer_us']:.2f})", flush=True)
                continue
            rows.append(dict(kernel="topk", T=T, L=L, vlen=vlen, **bench_topk(T, L, vlen, args.calls, g)))
            for keys in args.keys.split(","):
                rows.append(dict(kernel=f"indexer_{keys}", T=T, L=L, vlen=vlen,
                                 **bench_indexer(T, L, vlen, args.calls, keys, g)))
            for r in rows[-1 - len(args.keys.split(",")):]:
                print(f"{r['kernel']:14s} T={r['T']:2d} L={r['L']:6d} vlen={r['vlen']:6d}  old {r['old_us']:7.2f} us"
                      f"  new {r['new_us']:7.2f} us  match={r['match']}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(meta, case="topk_decode", **r)) + "\n")


if __name__ == "__main__":
    main()
