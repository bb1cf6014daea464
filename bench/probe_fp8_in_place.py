"""bench probe, the FP8 decode GEMVs of one TP=2 rank with the block scales folded into the widened weights and the
dot accumulating in place (fp8_gemv's IN_PLACE, BITS = 2) against what the model runs now (w8_gemv: the CUDA-core /
f16x2 forms at one token, the a8 form at four) and the a8 / widening forms at the same tiles: us per call, cold (a
CUDA graph of CALLS calls over weight copies past twice the L2), each variant's error against fp8_linear_ref.

The bench/probe_a8_up.py finding this tries on the dense GEMVs: a loop that scales each block's MMA partial waits for
every MMA (0.72 of copy for the four-token MXFP4 up loop), one whose MMAs add into the accumulator in place does not
(0.86); the FP8 blocks' UE8M0 scales are powers of two, so they fold into the bf16 widening exactly.

    PYTHONPATH=$PWD python3 bench/probe_fp8_in_place.py [--tokens 1,4] [--shapes WO_A_TP2,...] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_graph  # noqa: E402
from bench.sweep_fp8_gemv import v4_shapes  # noqa: E402
from ds4f.kernels import fp8_gemv, pdl  # noqa: E402
from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_ref  # noqa: E402

SHAPES = ("WQ_B_TP2", "WO_A_TP2", "WO_B_TP2", "IN_PROJ", "W13_TP2", "W2_TP2")
L2_BYTES = 50 * 2**20
CALLS = 24


def tiles(nt: int, k: int, groups: int, table: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The table tile, then 64- and 128-row tiles with K splits near 1 and 2 programs per SM."""
    out = [table]
    for bn, bk, nw, ns in ((64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 256, 8, 3)):
        if groups > 1 and (nt // groups) % bn:
            continue
        n_tiles = -(-nt // bn)
        for per_sm in (1, 2):
            split = max(1, min(k // bk // 2, -(-per_sm * 132 // n_tiles)))
            c = (bn, bk, split, nw, ns)
            if c not in out and fp8_gemv.valid(c, nt, groups):
                out.append(c)
    return out


def run_shape(name: str, tokens: list[int], copy_gbps: float, meta: dict, out_path: str) -> None:
    nt, k, groups = v4_shapes()[name]
    nbytes = nt * k + math.ceil(nt / 128) * math.ceil(k / 128)
    copies = max(2, math.ceil(2 * L2_BYTES / nbytes))
    g = torch.Generator(device="cuda").manual_seed(nt + k)
    ws = [(torch.randn(nt, k, device="cuda", generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
          for _ in range(copies)]
    raw = [torch.randint(118, 124, (math.ceil(nt / 128), math.ceil(k / 128)), device="cuda", dtype=torch.uint8,
                         generator=g) for _ in range(copies)]
    ss = [_scale_arg(r.view(torch.float8_e8m0fnu)) for r in raw]
    table = fp8_gemv.pick(nt, k, groups, torch.device("cuda"))
    for T in tokens:
        x = torch.randn(T, groups, k, device="cuda", generator=g).bfloat16()
        out = torch.empty(T, groups, nt // groups, dtype=torch.bfloat16, device="cuda")
        ref = torch.stack([fp8_linear_ref(x[:, j], ws[0][j * (nt // groups):(j + 1) * (nt // groups)],
                                          raw[0].view(torch.float8_e8m0fnu).float()[
                                              j * (nt // groups) // 128:(j + 1) * (nt // groups) // 128])
                           for j in range(groups)], 1).float() if groups > 1 else \
            fp8_linear_ref(x[:, 0], ws[0], raw[0].view(torch.float8_e8m0fnu).float())[:, None].float()

        variants = [("model (w8_gemv)", lambda i, x=x, out=out: fp8_gemv.w8_gemv(
            x, ws[i], ss[i][0], ss[i][1], out, groups, True, force=True))]
        for c in tiles(nt, k, groups, table or fp8_gemv.generic_config(nt, k, groups, 132)):
            for form, a8, ip in (("a8", True, False), ("widen", False, False), ("in_place", False, True)):
                variants.append((f"{form} {c}", lambda i, c=c, a8=a8, ip=ip, x=x, out=out: fp8_gemv.launch(
                    x, ws[i], ss[i][0], ss[i][1], out, groups, True, c, a8=a8, in_place=ip)))
        for vname, fn in variants:
            try:
                fn(0)
                err = ((out.float().view(T, groups, -1) - ref.view(T, groups, -1)).norm() / ref.norm()).item()
                us = time_graph(fn, copies, max(CALLS, copies), 5)
            except Exception as ex:  # a tile this shape cannot take: say so, go on
                print(f"{name} T={T} {vname}: {type(ex).__name__} {str(ex)[:120]}", flush=True)
                continue
            frac = nbytes / (us * 1e-6) / (copy_gbps * 1e9)
            print(f"{name:9s} T={T} {vname:36s} {us:7.2f} us  {frac:.3f} of copy  err {err:.1e}", flush=True)
            if out_path:
                with open(out_path, "a") as f:
                    f.write(json.dumps(dict(bench="probe_fp8_in_place", shape=name, t=T, variant=vname,
                                            us=round(us, 3), frac_copy=round(frac, 4), rel_err=err,
                                            copy_gbps=round(copy_gbps, 1), **meta)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    pdl.ENABLED = False  # each kernel's own time
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/probe_fp8_in_place.py " + " ".join(sys.argv[1:]))
    # a throwaway first timing: the first variant timed in a process reads high while the clocks ramp
    run_shape("W2_TP2", [1], copy_gbps, meta, "")
    for name in args.shapes.split(","):
        run_shape(name, [int(t) for t in args.tokens.split(",")], copy_gbps, meta, args.out)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
