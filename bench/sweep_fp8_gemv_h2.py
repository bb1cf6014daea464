"""The f16x2 FP8 decode GEMV (ds4f/kernels/fp8_gemv_h2.py) against today's default decode GEMV (fp8_gemv.w8_gemv's
dispatch: the CUDA-core kernel at one token, the a8 MMA kernel at two to four) at the per-rank decode shapes of
V4-Flash, T = 1 and 4, UE8M0 scales; timed and recorded as bench/sweep_fp8_gemv_cc.py does (case fp8_gemv_h2), each
variant checked against fp8_linear_ref (the default's a8 form against fp8_linear_a8_ref), and summed up as
`PICK_H2 <NAME> T=<t> bn,split,nw,depth  # us vs default us` (fp8_gemv_h2.CONFIGS_H2's form). Usage:
PYTHONPATH=$PWD python3 bench/sweep_fp8_gemv_h2.py [--shapes WO_B_TP2,...] [--tokens 4,1] [--depths 1,2]
[--out FILE.jsonl]"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_graph
from bench.sweep_fp8_gemv import rel
from bench.sweep_fp8_gemv_cc import recorder, sweep_main, tiles, time_tiles
from ds4f.kernels import fp8_gemv, fp8_gemv_cc, fp8_gemv_h2
from ds4f.kernels.fp8_gemm import fp8_linear_a8_ref, fp8_linear_ref, grouped_ref


def sweep_case(name: str, shape: tuple[int, int, int], t: int, w: list, ctx: dict) -> str:
    """Time the default and this form's tiles for one shape at t tokens; print, record -> the PICK_H2 line."""
    nt, k, groups = shape
    ws, ss, sc = w
    rows = nt // groups
    copies = len(ws)
    calls = copies * max(1, math.ceil(32 / copies))
    x = torch.randn(t, groups, k, device="cuda").bfloat16()
    want = grouped_ref(x, ws[0], ss[0], fp8_linear_ref)

    def default(i: int) -> torch.Tensor:
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        assert fp8_gemv.w8_gemv(x, ws[i], sc[i][0], sc[i][1], out, groups, True)
        return out

    def h2(i: int, cfg: fp8_gemv_cc.Cfg, depth: int) -> torch.Tensor:
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        fp8_gemv_h2.launch_h2(x, ws[i], sc[i][0], sc[i][1], out, groups, cfg, depth=depth)
        return out

    record = recorder("fp8_gemv_h2", name, shape, t, ctx)
    kind = ("h2" if fp8_gemv_h2.takes(x, nt, k, groups) else "cc" if fp8_gemv_cc.takes(x, nt, k, groups)
            else "mma")  # w8_gemv's order
    base = time_graph(default, copies, calls)
    base_ref = want if kind != "mma" else grouped_ref(x, ws[0], ss[0], fp8_linear_a8_ref)
    record(f"default {kind}", None, base, rel(default(0), base_ref))
    table = fp8_gemv_h2.config(nt, k, groups, t)
    cands = ([table] if table else []) + [(c, d) for d in ctx["depths"] for c in tiles(nt, k, groups, ctx["sms"])]
    best = time_tiles("h2", t, list(dict.fromkeys(cands)), h2, want, record, copies, calls, ctx)
    line = f"PICK_H2 {name} T={t} {','.join(map(str, best[1])) if best[1] else 'none'}  # {best[0]:.2f} us"
    print(line + f" vs default {base:.2f} us", flush=True)
    return line + f" vs default {base:.2f} us"


def main() -> None:
    sweep_main(sweep_case, "bench/sweep_fp8_gemv_h2.py", "4,1")


if __name__ == "__main__":
    main()
