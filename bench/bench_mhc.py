"""⑥ mHC step at decode shapes (D = 4096, hc = 4, bf16): the multi-launch path (post/mix, weights/collapse, RMS)
vs the one-launch decode kernel (ds4f/kernels/mhc_decode.py), us per call from a CUDA graph of 16 chained calls with
16 distinct fn / scale / base / norm_w sets, replayed after an L2 flush (the decode step's fn reads come from HBM).
Also a small sweep of the decode kernel's (block_d, num_warps), with each variant's max error against the old path.

    PYTHONPATH=$PWD python3 bench/bench_mhc.py [--tokens 1,4,15] [--sweep]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import time_us  # noqa: E402
from ds4f.kernels import mhc  # noqa: E402
from ds4f.kernels.mhc_decode import hc_step_decode  # noqa: E402

D, HC, NM, CALLS, ITERS, EPS = 4096, 4, 24, 16, 20, 1e-6


def _inputs(t: int) -> tuple[tuple, list[tuple]]:
    g = torch.Generator(device="cuda").manual_seed(t)
    first = (torch.randn(t, D, device="cuda", generator=g).bfloat16(),
             torch.randn(t, HC, D, device="cuda", generator=g).bfloat16(),
             2 * torch.rand(t, HC, device="cuda", generator=g),
             torch.softmax(torch.randn(t, HC, HC, device="cuda", generator=g), -1))
    weights = [(torch.randn(NM, HC * D, device="cuda", generator=g) / (HC * D) ** 0.5,
                torch.rand(3, device="cuda", generator=g) + 0.5, torch.randn(NM, device="cuda", generator=g) * 0.5,
                torch.rand(D, device="cuda", generator=g) + 0.5) for _ in range(CALLS)]
    return first, weights


def _chain(step: Callable[..., tuple], first: tuple, weights: list[tuple],
           iters: int = ITERS) -> Callable[[], torch.Tensor]:
    """16 sublayer steps: each next y is the previous xn (a stand-in for the sublayer between them)."""
    def run() -> torch.Tensor:
        y, x, post, comb = first
        for w in weights:
            x, y, post, comb = step(y, x, post, comb, *w, iters, EPS, EPS, EPS)
        return x
    return run


def _old(*args: object) -> tuple:
    prev, mhc.DECODE_MAX_T = mhc.DECODE_MAX_T, 0
    try:
        return mhc.hc_step(*args)
    finally:
        mhc.DECODE_MAX_T = prev


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,15")
    ap.add_argument("--sweep", action="store_true", help="also time the decode kernel's (block_d, num_warps)")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}; us per hc_step call, graph of {CALLS} chained calls, L2 flushed")
    for t in (int(v) for v in a.tokens.split(",")):
        first, weights = _inputs(t)
        old, new = _chain(_old, first, weights), _chain(mhc.hc_step, first, weights)
        ref = old()
        err = ((new().float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
        t_old, t_new = time_us(old) / CALLS, time_us(new) / CALLS
        print(f"T={t:<3} old {t_old:7.2f} us  new {t_new:7.2f} us  ({t_old / t_new:4.2f}x)  "
              f"max rel err of X' after {CALLS} steps {err:.1e}", flush=True)
        if not a.sweep:
            continue
        t1 = time_us(_chain(mhc.hc_step, first, weights, 1)) / CALLS  # what the 19 more Sinkhorn rounds cost
        print(f"T={t:<3} new with 1 Sinkhorn iteration {t1:7.2f} us", flush=True)
        for bd in (32, 64, 128):
            for nw in (4, 8, 16):
                def step(*args: object, bd: int = bd, nw: int = nw) -> tuple:
                    return hc_step_decode(*args, block_d=bd, num_warps=nw)
                run = _chain(step, first, weights)
                try:
                    e = ((run().float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()
                    us = time_us(run) / CALLS
                except Exception as ex:  # e.g. too many registers
                    print(f"    block_d {bd:<4} warps {nw:<3} failed: {str(ex)[:80]}")
                    continue
                print(f"    block_d {bd:<4} warps {nw:<3} {us:7.2f} us  err {e:.1e}", flush=True)


if __name__ == "__main__":
    main()
