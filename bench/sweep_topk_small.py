"""⑥ decode top-512 of one short row, per-call µs: the one-program kernel (ds4f.kernels.topk_small) writing ids and
then the torch mapping to attention rows (glue.topk_rows), against the same kernel writing the rows itself
(indexer.topk_pool_rows), at 4 / 8 / 16 / 32 warps; with --prev, a former topk_small.py (a file path) in the first
form beside them. CUDA graph of N calls on N distinct score rows, replayed (bench.common.time_graph), L2 not flushed
(the scores were just written by the indexer in a decode step). Each form's rows are checked equal to the default's.
One line per case, PICK the fastest; --json appends the records."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl, run_meta, time_graph  # noqa: E402
from ds4f.kernels import topk_small  # noqa: E402
from ds4f.kernels.indexer import topk_pool_rows  # noqa: E402
from ds4f.runner.gpu.glue import topk_rows  # noqa: E402

K, W, EPB = 512, 128, 64


def run_case(T: int, v: int, warps: list[int], prev: object, calls: int, g: torch.Generator) -> list[dict]:
    L = 1 << (v - 1).bit_length()
    lanes = max(16, L)
    vl = torch.full((T,), v, dtype=torch.int32, device="cuda")
    cols = torch.arange(L, device="cuda")[None, :] >= v
    sc = [torch.randn(T, L, device="cuda", generator=g).masked_fill_(cols, float("-inf")) for _ in range(calls)]
    bt = torch.randperm(4096, device="cuda", generator=g)[: L // EPB + 1].repeat(T, 1)
    win = torch.randint(0, 1000, (T, W), device="cuda", generator=g, dtype=torch.int32)
    want = topk_pool_rows(sc[0], K, vl, bt, win, 0, EPB)
    assert want is not None
    ids = torch.empty((T, K), dtype=torch.int32, device="cuda")
    rows = torch.empty((T, W + K), dtype=torch.int32, device="cuda")

    def ids_then_map(mod: object, nw: int) -> Callable[[int], torch.Tensor]:
        def f(i: int) -> torch.Tensor:
            mod.launch_small(sc[i], vl, ids, None, None, K, lanes, 0, nw)  # type: ignore[attr-defined]
            return topk_rows(ids, bt, win, 0, EPB)
        return f

    def fused(nw: int) -> Callable[[int], torch.Tensor]:
        def f(i: int) -> torch.Tensor:
            topk_small.launch_small(sc[i], vl, rows, None, None, K, lanes, 0, nw, rows=(bt, win, 0, EPB))
            return rows
        return f

    forms = ([("prev ids+map w8", ids_then_map(prev, 8))] if prev is not None else []) + [
        ("ids+map w8", ids_then_map(topk_small, 8))] + [(f"rows w{nw}", fused(nw)) for nw in warps]
    out = []
    for name, fn in forms:
        ok = bool(torch.equal(fn(0), want))
        us = time_graph(fn, calls, calls)
        out.append(dict(case="topk_small", form=name, T=T, L=L, vlen=v, us=us, match=ok))
        print(f"T={T:2d} vlen={v:5d} {name:18s} {us:7.2f} us  match={ok}", flush=True)
    best = min((r for r in out if r["form"].startswith("rows")), key=lambda r: r["us"])
    print(f"PICK T={T} vlen={v} {best['form']} {best['us']:.2f} us", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", default="2048,4096,8192", help="valid lengths (L = the next power of two)")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--warps", default="4,8,16,32")
    ap.add_argument("--prev", default="", help="a former ds4f/kernels/topk_small.py to time beside")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    meta = run_meta(" ".join(sys.argv))
    prev = None
    if args.prev:
        spec = importlib.util.spec_from_file_location("prev_topk_small", args.prev)
        assert spec is not None and spec.loader is not None
        prev = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prev)
    g = torch.Generator(device="cuda").manual_seed(0)
    warps = [int(x) for x in args.warps.split(",")]
    recs = [dict(meta, **r) for T in (int(t) for t in args.tokens.split(","))
            for v in (int(x) for x in args.lens.split(",")) for r in run_case(T, v, warps, prev, args.calls, g)]
    if args.json:
        append_jsonl(args.json, recs)


if __name__ == "__main__":
    main()
