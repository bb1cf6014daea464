"""Decode GEMV sweep: cuBLAS (F.linear, or the strided bmm for the grouped wo_a) against ds4f/kernels/gemv.py's Triton
kernel over tile configs, per projection shape of gemv.CONFIGS, at T = 1 and 4 tokens.

Each variant is timed as a CUDA graph of many calls cycling through distinct weight copies (> 200 MB in all, so L2
never holds a weight), replayed; prints us per call and weight GB/s, checks every variant against fp32 math, and
ends each shape with `PICK DS4F_GEMV_<NAME>=bn,bk,split,nw,ns` (or `=0`: cuBLAS is at least as fast) plus the
CONFIGS line to paste (all of them again at the end). Usage: PYTHONPATH=$PWD python3 bench/sweep_gemv.py
[--shapes WQ_B,WO_B] [--tokens 1,4] [--full: a wider grid] [--table-only: cuBLAS vs the table's config]."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_graph
from ds4f.kernels import gemv  # noqa: E402,RUF100

Cfg = tuple[int, int, int, int, int]


def candidates(n: int, k: int, groups: int, sms: int, full: bool) -> list[Cfg]:
    """(BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) worth timing for an [n, k] weight (r = n // groups rows per
    group for the grouped form); splits around two programs per SM."""
    r = n // groups
    out: list[Cfg] = []
    bns = (16, 32, 64, 128) if n < 65536 else (64, 128)
    for bn, bk in itertools.product(bns, (64, 128, 256) if full else (128, 256)):
        if bk > max(64, k) or (groups > 1 and r % bn):
            continue
        tiles, chunks = -(-n // bn), -(-k // bk)
        s0 = max(1, math.ceil(2 * sms / tiles))
        splits = sorted({s for s in (1, s0, 2 * s0, (s0 + 1) // 2) if s <= min(chunks, 16)})
        for split, ns in itertools.product(splits, (2, 3, 4, 5) if full else (3, 4, 5)):
            if tiles * split > 8 * sms and split > 1:
                continue
            if ns * (bn + gemv.BLOCK_T) * bk * 2 > 200 * 1024:
                continue
            for nw in (4, 8) if bn >= 64 else (4,):
                out.append((bn, bk, split, nw, ns))
    return out


def run_triton(x: torch.Tensor, w: torch.Tensor, cfg: Cfg, groups: int) -> torch.Tensor:
    """gemv.launch with an explicit config; w is [N, K] (grouped: wa.view(G*r, Kg), x [T, G*Kg])."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    if groups > 1:
        gemv.launch(x, w, out, cfg, gn=w.shape[0] // groups, s_xg=w.shape[1])
    else:
        gemv.launch(x, w, out, cfg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(gemv.CONFIGS), help="names from gemv.CONFIGS")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--full", action="store_true", help="a wider grid (BLOCK_K 64, 2 stages)")
    ap.add_argument("--table-only", action="store_true", help="time cuBLAS and the table's config only")
    ap.add_argument("--mb", type=int, default=256, help="weight copies per shape totalling at least this")
    args = ap.parse_args()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"device {torch.cuda.get_device_name()} SMs {sms} torch {torch.__version__}", flush=True)
    lines = []
    for name in args.shapes.split(","):
        lines.append(sweep_shape(name, tokens, sms, args.mb, args.full, args.table_only))
        torch.cuda.empty_cache()
    print("CONFIGS to paste into ds4f/kernels/gemv.py:\n" + "\n".join(lines), flush=True)


def sweep_shape(name: str, tokens: list[int], sms: int, mb: int, full: bool, table_only: bool = False) -> str:
    """Time cuBLAS and the candidate configs of CONFIGS[name] at each T; print the results and the PICK; return
    the CONFIGS line."""
    (n, k, groups), table = gemv.CONFIGS[name]
    nbytes = n * k * 2
    copies = max(1, math.ceil(mb * 2**20 / nbytes))
    calls = copies * max(1, math.ceil(24 / copies))
    ws = [(torch.randn(n, k, device="cuda") / math.sqrt(k)).bfloat16() for _ in range(copies)]
    xs = {t: torch.randn(t, k * groups, device="cuda").bfloat16() for t in tokens}
    r = n // groups
    want = {t: torch.cat([xs[t][:, i * k:(i + 1) * k].float() @ ws[0][i * r:(i + 1) * r].float().t()
                          for i in range(groups)], dim=1) for t in tokens}

    def cublas(t: int, i: int) -> torch.Tensor:
        return gemv.grouped_bmm(xs[t], ws[i].view(groups, r, k)) if groups > 1 else F.linear(xs[t], ws[i])

    def line(us: dict[int, float]) -> str:
        return "  ".join(f"T={t}: {us[t]:7.2f} us {nbytes / us[t] / 1e3:6.0f} GB/s" for t in tokens)

    print(f"== {name} N={n} K={k} G={groups} {nbytes / 2**20:.0f} MB x {copies} copies, {calls} calls/graph",
          flush=True)
    base = {t: time_graph(lambda i, t=t: cublas(t, i), copies, calls) for t in tokens}
    print(f"  {'cublas':22s}{line(base)}", flush=True)
    results: list[tuple[float, Cfg]] = []
    cands = [] if table_only else candidates(n, k, groups, sms, full)
    if table is not None and table not in cands:
        cands.insert(0, table)
    for cfg in cands:
        try:
            bad = [t for t in tokens
                   if (run_triton(xs[t], ws[0], cfg, groups).float() - want[t]).norm() > 1e-2 * want[t].norm()]
            us = {t: time_graph(lambda i, t=t, c=cfg: run_triton(xs[t], ws[i], c, groups), copies, calls)
                  for t in tokens}
        except Exception as ex:  # a config the compiler or the device rejects (e.g. shared memory)
            print(f"  {cfg} FAILED {type(ex).__name__}: {str(ex)[:100]}", flush=True)
            continue
        tag = " BAD" if bad else (" table" if cfg == table else "")
        print(f"  {str(cfg):22s}{line(us)}{tag}", flush=True)
        if not bad:
            results.append((sum(us.values()) / len(us), cfg))
    cb = sum(base.values()) / len(base)
    best_us, best = min(results) if results else (math.inf, None)
    if best is None or best_us >= 0.98 * cb:
        print(f"PICK DS4F_GEMV_{name}=0  # cuBLAS {cb:.2f} us <= Triton {best} {best_us:.2f} us", flush=True)
        return f'    "{name}": (({n}, {k}, {groups}), None),'
    print(f"PICK DS4F_GEMV_{name}={','.join(map(str, best))}  # {best_us:.2f} us "
          f"({nbytes / best_us / 1e3:.0f} GB/s) vs cuBLAS {cb:.2f} us ({nbytes / cb / 1e3:.0f} GB/s)", flush=True)
    return f'    "{name}": (({n}, {k}, {groups}), {best}),'


if __name__ == "__main__":
    main()
