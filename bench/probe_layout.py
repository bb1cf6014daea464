"""Weight-layout probe: does the decode kernels' access pattern (each program reads [BN rows, KB bytes] tiles of a
row-major [N, K] byte matrix, one tile per K step, so every step touches BN segments of KB bytes at the row stride)
cap HBM bandwidth below a copy, and does a tile-major layout ([N / BN, K / KB, BN, KB]: each step one contiguous
BN * KB bytes) lift it? A load-and-dot kernel over the same grid as the
MoE / FP8 GEMV decode kernels ((rows / BN) x SPLIT programs, K / KB / SPLIT steps each), 256 MB of weights so the
L2 never holds them (each step dotted as e4m3 against a [KB, 16] operand: the loads pipeline through shared
memory as in the decode kernels); GB/s and the fraction of a copy measured in the same run.

Then the MoE up kernel's reads alone: 6 / 24 random experts of a 1 GiB layer (256 x [2048 rows, 2048 bytes], the
V4-Flash TP=2 shape) on _a8_up's grid, against the same bytes as one block (are the scattered experts, not the
kernel's arithmetic, what holds the MoE decode at ~0.55 of copy?).

    PYTHONPATH=$PWD python3 bench/probe_layout.py [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402


@triton.jit
def _load_tiles(w_ptr, b_ptr, out_ptr, s_t, s_n, s_k, BN: tl.constexpr, KB: tl.constexpr, NS: tl.constexpr):
    # program (row tile n, K slice s): NS steps of [BN, KB] bytes at w + n * s_t + (s * NS + k) * s_k + r * s_n + c,
    # each dotted as e4m3 against b [KB, 16] (so the loads pipeline through shared memory as the decode kernels')
    n = tl.program_id(0)
    s = tl.program_id(1)
    p = w_ptr + n.to(tl.int64) * s_t + (s * NS).to(tl.int64) * s_k + tl.arange(0, BN)[:, None] * s_n \
        + tl.arange(0, KB)[None, :]
    b = tl.load(b_ptr + tl.arange(0, KB)[:, None] * 16 + tl.arange(0, 16)[None, :])
    acc = tl.zeros([BN, 16], tl.float32)
    for k in range(NS):
        acc = tl.dot(tl.load(p + k * s_k).to(tl.float8e4nv, bitcast=True), b, acc)
    tl.store(out_ptr + n * tl.num_programs(1) + s, tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _load_experts(w_ptr, ids_ptr, b_ptr, out_ptr, s_e, ROW: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                  NS: tl.constexpr):
    # program (pick m, row tile n, K slice s) over experts w [E, rows, ROW] bytes: the MoE up kernel's grid and
    # reads (expert ids[m]'s rows [n * BN, +BN), K slice s of NS steps of KB bytes), load-and-dot as _load_tiles
    m = tl.program_id(0)
    n = tl.program_id(1)
    s = tl.program_id(2)
    e = tl.load(ids_ptr + m).to(tl.int64)
    p = w_ptr + e * s_e + (n * BN + tl.arange(0, BN)).to(tl.int64)[:, None] * ROW + s * NS * KB \
        + tl.arange(0, KB)[None, :]
    b = tl.load(b_ptr + tl.arange(0, KB)[:, None] * 16 + tl.arange(0, 16)[None, :])
    acc = tl.zeros([BN, 16], tl.float32)
    for k in range(NS):
        acc = tl.dot(tl.load(p + k * KB).to(tl.float8e4nv, bitcast=True), b, acc)
    tl.store(out_ptr + (m * tl.num_programs(1) + n) * tl.num_programs(2) + s, tl.sum(tl.sum(acc, 1), 0))


def run_experts(w: torch.Tensor, picks: int, split: int, contiguous: bool, nw: int, ns: int) -> tuple[float, int]:
    """The MoE up reads at one layer's V4-Flash TP=2 shape (256 experts x [2048 rows, 2048 bytes]): `picks`
    distinct random experts (contiguous: experts 0..picks-1, one block of memory) -> (us, bytes read)."""
    e, rows, row = w.shape
    ids = (torch.arange(picks) if contiguous else torch.randperm(e)[:picks]).int().to(w.device)
    bn, kb = 64, 128
    grid = (picks, rows // bn, split)
    out = torch.empty(grid[0] * grid[1] * split, dtype=torch.float32, device=w.device)
    b = torch.zeros(kb, 16, device=w.device).to(torch.float8_e4m3fn)

    def fn() -> None:
        _load_experts[grid](w, ids, b, out, w.stride(0), ROW=row, BN=bn, KB=kb, NS=row // kb // split,
                            num_warps=nw, num_stages=ns)

    return time_us(fn, iters=30), picks * rows * row


def run(w: torch.Tensor, n_rows: int, k_bytes: int, bn: int, kb: int, split: int, tiled: bool, nw: int,
        ns: int) -> float:
    nkb = k_bytes // kb
    if tiled:  # [N / BN, K / KB, BN, KB]
        s_t, s_n, s_k = nkb * bn * kb, kb, bn * kb
    else:
        s_t, s_n, s_k = bn * k_bytes, k_bytes, kb
    grid = (n_rows // bn, split)
    out = torch.empty(grid[0] * split, dtype=torch.float32, device=w.device)
    b = torch.zeros(kb, 16, device=w.device).to(torch.float8_e4m3fn)

    def fn() -> None:
        _load_tiles[grid](w, b, out, s_t, s_n, s_k, BN=bn, KB=kb, NS=nkb // split, num_warps=nw, num_stages=ns)

    return time_us(fn, iters=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/probe_layout.py " + " ".join(sys.argv[1:]))
    print(f"device {meta['gpu']} copy {copy_gbps:.0f} GB/s", flush=True)
    total = 256 * 2**20
    w = torch.randint(-128, 127, (total,), dtype=torch.int8, device="cuda")
    # (name, K bytes per row, BN, KB, split): the MoE up (2 KB rows of packed nibbles, K = 4096) / down (512 B rows,
    # I = 1024 at TP=2) tiles and the FP8 GEMVs' (4 KB / 1 KB rows)
    cases = [("moe_up", 2048, 64, 128, 2), ("moe_up", 2048, 64, 128, 4), ("moe_up", 2048, 64, 256, 1),
             ("moe_down", 512, 64, 256, 1), ("moe_down", 512, 32, 256, 1), ("fp8_k4096", 4096, 32, 128, 3),
             ("fp8_k4096", 4096, 64, 128, 8), ("fp8_k1024", 1024, 64, 128, 1), ("fp8_k1024", 1024, 32, 128, 1)]
    for name, kbytes, bn, kb, split in cases:
        n_rows = total // kbytes
        for nw, ns in ((4, 3), (4, 5)):
            res = {}
            for tiled in (False, True):
                us = run(w, n_rows, kbytes, bn, kb, split, tiled, nw, ns)
                res[tiled] = us
                gbps = total / us / 1e3
                rec = dict(case="layout_probe", pattern=name, k_bytes=kbytes, bn=bn, kb=kb, split=split,
                           tiled=tiled, num_warps=nw, num_stages=ns, us=round(us, 2), gbps=round(gbps, 1),
                           frac_copy=round(gbps / copy_gbps, 3), copy_gbps=round(copy_gbps, 1), **meta)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            print(f"{name:10s} K={kbytes:5d} BN={bn:3d} KB={kb:3d} split={split} nw={nw} ns={ns}: row-major "
                  f"{total / res[False] / 1e3 / copy_gbps:.3f} tiled {total / res[True] / 1e3 / copy_gbps:.3f} "
                  "of copy", flush=True)
    del w
    # the routed experts' up reads: picks scattered over a 1 GiB layer vs the same bytes in one block
    experts = torch.randint(-128, 127, (256, 2048, 2048), dtype=torch.int8, device="cuda")
    for picks in (6, 24):
        for split in (1, 2, 4):
            res = {}
            for contiguous in (False, True):
                us, nbytes = run_experts(experts, picks, split, contiguous, 4, 3)
                res[contiguous] = nbytes / us / 1e3 / copy_gbps
                rec = dict(case="layout_probe_experts", picks=picks, split=split, contiguous=contiguous,
                           bn=64, kb=128, num_warps=4, num_stages=3, us=round(us, 2), mb=round(nbytes / 1e6, 1),
                           frac_copy=round(res[contiguous], 3), copy_gbps=round(copy_gbps, 1), **meta)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
            print(f"experts picks={picks:2d} split={split}: scattered {res[False]:.3f} contiguous {res[True]:.3f} "
                  "of copy", flush=True)


if __name__ == "__main__":
    main()
