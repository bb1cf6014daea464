"""⑧ sampler kernels at decode sizes (V4-Flash vocab 129280, batch 1 / 4 / 16) in; µs per call out: torch.argmax vs
sampler.argmax (two stages), and Sampler.tokens for greedy rows and for temperature rows (the exponential race over
logits - log E; the softmax form it replaced is timed beside it). Each timed as a CUDA graph of 32 calls.

    PYTHONPATH=$PWD python3 bench/bench_sampler.py [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_meta, time_graph  # noqa: E402
from ds4f.sample.params import SamplingParams  # noqa: E402
from ds4f.sample.sampler import Sampler, SamplingRequest, argmax  # noqa: E402

V, CALLS = 129280, 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    meta = run_meta("python3 bench/bench_sampler.py " + " ".join(sys.argv[1:]))
    for B in (1, 4, 16):
        run_batch(B, Sampler(), args.out, meta)


def run_batch(B: int, sampler: Sampler, out: str, meta: dict) -> None:
    xs = [torch.randn(B, V, device="cuda") * 4 for _ in range(4)]
    assert all(torch.equal(argmax(x), x.argmax(-1)) for x in xs)
    greedy = [SamplingRequest(SamplingParams(temperature=0.0), [], [])] * B
    temp = [SamplingRequest(SamplingParams(temperature=0.8), [], [])] * B

    def softmax_race(x: torch.Tensor) -> torch.Tensor:  # the former _exponential_race
        p = (x / 0.8).softmax(-1)
        return p.div_(torch.empty_like(p).exponential_()).argmax(-1)

    cases = {"torch.argmax": lambda i: xs[i].argmax(-1), "sampler.argmax": lambda i: argmax(xs[i]),
             "tokens greedy": lambda i: sampler.tokens(xs[i].clone(), greedy),
             "tokens temperature 0.8": lambda i: sampler.tokens(xs[i].clone(), temp),
             "former softmax race": lambda i: softmax_race(xs[i])}
    for name, fn in cases.items():
        us = time_graph(fn, len(xs), CALLS)
        print(f"B={B:2d} {name:24s} {us:8.2f} us", flush=True)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(dict(case="sampler", batch=B, vocab=V, variant=name, time_us=round(us, 2),
                                        **meta)) + "\n")

if __name__ == "__main__":
    main()
