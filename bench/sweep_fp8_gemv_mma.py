"""The register-fed MMA decode GEMV (ds4f/kernels/fp8_gemv_mma.py) against today's default at each token count (one
token: the CUDA-core GEMV at its table tile; more: fp8_gemv's MMA kernel, a8 where its table says) at the per-rank
V4-Flash decode shapes (bench/sweep_fp8_gemv.v4_shapes), T = 1, 4, 8, UE8M0 scales. Timed as the other GEMV sweeps
(a CUDA graph cycling through >= --mb MB of weight copies, so the L2 never holds one), checked against
fp8_linear_ref (x in bf16: this form's math), recorded (--out, case fp8_gemv_mma) and summed up as
`PICK_MMA <NAME> T=<t> nw,tiles,split  # us vs default us`. Usage:
PYTHONPATH=$PWD python3 bench/sweep_fp8_gemv_mma.py [--shapes WO_B_TP2,...] [--tokens 1,4,8] [--out FILE.jsonl]"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_graph
from bench.sweep_fp8_gemv import rel
from bench.sweep_fp8_gemv_cc import recorder, split_toward, sweep_main
from ds4f.kernels import fp8_gemv, fp8_gemv_mma
from ds4f.kernels.fp8_gemm import grouped_ref


def tiles(nt: int, k: int, groups: int, sms: int) -> list[fp8_gemv_mma.Cfg]:
    """(warps, tiles) pairs x K splits toward 1, 2 and 4 programs per SM (valid, distinct)."""
    out: list[fp8_gemv_mma.Cfg] = []
    for nw, tl_ in ((4, 2), (4, 1), (2, 2), (8, 1), (2, 1), (1, 2)):
        for per_sm in (1, 2, 4):
            c = (nw, tl_, split_toward(nt // (16 * nw * tl_), k, per_sm, sms))
            if c not in out and fp8_gemv_mma.valid(c, nt, k, groups):
                out.append(c)
    return out


def sweep_case(name: str, shape: tuple[int, int, int], t: int, w: list, ctx: dict) -> str:
    nt, k, groups = shape
    ws, ss, sc = w
    rows = nt // groups
    copies, calls = len(ws), len(ws) * max(1, math.ceil(32 / len(ws)))
    x = torch.randn(t, groups, k, device="cuda").bfloat16()
    want = grouped_ref(x, ws[0], ss[0])

    def default(i: int) -> torch.Tensor:  # today's dispatch for this T (the register form off)
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        assert fp8_gemv.w8_gemv(x, ws[i], sc[i][0], sc[i][1], out, groups, True, force=True)
        return out

    def mma(i: int, cfg: fp8_gemv_mma.Cfg) -> torch.Tensor:
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        fp8_gemv_mma.launch_mma(x, ws[i], sc[i][0], sc[i][1], out, groups, cfg)
        return out

    record = recorder("fp8_gemv_mma", name, shape, t, ctx)

    fp8_gemv_mma.ENABLED = False
    base = time_graph(default, copies, calls)
    record("default", None, base, rel(default(0), want))  # a8 where the MMA table says: its error is the a8 one
    best: tuple[float, fp8_gemv_mma.Cfg | None] = (math.inf, None)
    for cfg in tiles(nt, k, groups, ctx["sms"]):
        if time.time() > ctx["deadline"]:
            print("  budget spent", flush=True)
            break
        try:
            err = rel(mma(0, cfg), want)
            us = time_graph(lambda i, c=cfg: mma(i, c), copies, calls)
        except Exception as ex:  # a tile the compiler or the device rejects
            print(f"  T={t} mma {cfg} FAILED {type(ex).__name__}: {str(ex)[:100]}", flush=True)
            continue
        record(f"mma {cfg}", list(cfg), us, err)
        if err < 5e-3:
            best = min(best, (us, cfg))
    pick = ",".join(map(str, best[1])) if best[1] else "none"
    line = f"PICK_MMA {name} T={t} {pick}  # {best[0]:.2f} us vs default {base:.2f} us"
    print(line, flush=True)
    return line


def main() -> None:
    sweep_main(sweep_case, "bench/sweep_fp8_gemv_mma.py", "1,4,8", depths=False)


if __name__ == "__main__":
    main()
