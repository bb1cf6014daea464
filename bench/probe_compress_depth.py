"""bench (GPU): does the decode compressor's one launch (ds4f.kernels.compress) cost more deep in a context? One token,
the two CSA compressors of V4-Flash (the attention's: hd 512 with overlap; the indexer's: hd 128), at positions near
64 and near 1M, on a step that completes an entry ((p + 1) % 4 == 0) and one that does not, with the block-table row
as wide as a 1M context (4096 blocks of 256) or a short one. Prints us per launch (CUDA-graph replays, L2 flushed
or not); --json appends one record per case.

    PYTHONPATH=$PWD python3 bench/probe_compress_depth.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_meta, time_us  # noqa: E402
from ds4f.kernels.compress import compress_fused  # noqa: E402

M, BS, HALF, RING = 4, 256, 32, 8


def case(hd: int, p: int, blocks: int, max_pos: int, flush: bool, pool_rows: int) -> float:
    dev = "cuda"
    cd = 2 * hd
    g = torch.Generator(device=dev).manual_seed(0)
    kvz = torch.randn(1, 2 * cd, device=dev, generator=g).to(torch.bfloat16)
    ape = torch.randn(M, cd, device=dev, generator=g) * 0.1
    ring = torch.randn(2 * RING, 2 * cd, device=dev, generator=g)
    norm_w = torch.ones(hd, device=dev)
    ang = torch.arange(max_pos, device=dev, dtype=torch.float32)[:, None] * 1e-4
    cos, sin = ang.cos().expand(-1, HALF).contiguous(), ang.sin().expand(-1, HALF).contiguous()
    bt = torch.randperm(blocks, device=dev, generator=g)[None, :].to(torch.int64)
    pos = torch.tensor([p], device=dev)
    et = torch.zeros(1, dtype=torch.int64, device=dev)
    slot = torch.zeros(1, dtype=torch.int64, device=dev)
    rows = torch.tensor([p % RING], dtype=torch.int64, device=dev)
    epb = BS // M
    pool = torch.zeros(pool_rows, hd, dtype=torch.bfloat16, device=dev)

    def fn() -> None:
        compress_fused(kvz, ape, ring, norm_w, et, pos, pos, slot, bt, cos, sin, M, RING, True, 1e-6, 0, blocks - 1,
                       epb, ring_rows=rows, pool=pool)

    return time_us(fn, iters=50, flush=flush)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    big = 1 << 20
    for hd in (512, 128):
        for base, blocks in ((64, 64), (64, 4096), (big, 4096)):
            for emit in (False, True):
                p = base + (3 if emit else 1)
                pool_rows = blocks * BS // M
                for flush in (True, False):
                    us = case(hd, p, blocks, big + 1024, flush, pool_rows)
                    print(f"hd {hd:4d} p {p:8d} blocks {blocks:5d} emit {emit!s:5} flush {flush!s:5} {us:7.2f} us")
                    if a.json:
                        rec = {**run_meta("bench/probe_compress_depth.py"), "case": "compress_depth", "hd": hd,
                               "p": p, "blocks": blocks, "emit": emit, "flush": flush, "us": round(us, 2)}
                        with open(a.json, "a") as f:
                            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
