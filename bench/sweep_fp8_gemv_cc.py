"""FP8 decode GEMV on the CUDA cores (ds4f/kernels/fp8_gemv_cc.py) against today's default (fp8_gemv's a8 MMA kernel
at its table tiles) at the per-rank decode shapes of V4-Flash (bench/sweep_fp8_gemv.v4_shapes), T = 1 and 4, UE8M0
scales. Each variant is timed as bench/sweep_fp8_gemv.py does (a CUDA graph cycling through >= --mb MB of weight
copies, so the L2 never holds one), checked against its oracle (fp8_linear_ref for this form, fp8_linear_a8_ref for
the a8 kernel), recorded (--out, case fp8_gemv_cc) and summed up as `PICK_CC <NAME> T=<t> bn,split,nw` with the
time against the a8 kernel's and the ACC16 form's (bf16x2 products) at the same tile; the PICK tiles are
"bn,split,nw,depth" (fp8_gemv_cc.CONFIGS_CC's form). Usage:
PYTHONPATH=$PWD python3 bench/sweep_fp8_gemv_cc.py [--shapes WO_B_TP2,...] [--tokens 1,4] [--depths 1,2]
[--out FILE.jsonl]"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import measure_ceilings, run_meta, time_graph
from bench.sweep_fp8_gemv import rel, v4_shapes
from ds4f.kernels import fp8_gemv, fp8_gemv_cc
from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_a8_ref, fp8_linear_ref, grouped_ref

TP2 = "IN_PROJ,IDX_WQ_B,WQ_B_TP2,WO_A_TP2,WO_B_TP2,W13_TP2,W2_TP2"


def split_toward(programs: int, k: int, per_sm: int, sms: int) -> int:
    """The largest power-of-two K split (dividing the k // 128 column blocks) that keeps `programs` per split at
    most per_sm programs per SM."""
    split, blocks = 1, k // 128
    while blocks % (split * 2) == 0 and programs * split * 2 <= per_sm * sms:
        split *= 2
    return split


def tiles(nt: int, k: int, groups: int, sms: int) -> list[fp8_gemv_cc.Cfg]:
    """(BLOCK_N, warps) pairs x K splits toward 2 and 4 programs per SM (valid, distinct)."""
    out: list[fp8_gemv_cc.Cfg] = []
    for bn, nw in ((8, 4), (16, 4), (32, 4), (32, 8), (64, 4)):
        for per_sm in (2, 4):
            c = (bn, split_toward(nt // bn, k, per_sm, sms), nw)
            if c not in out and fp8_gemv_cc.valid(c, nt, k, groups):
                out.append(c)
    return out


def sweep_case(name: str, shape: tuple[int, int, int], t: int, w: list, ctx: dict) -> str:
    """Time the table kernel and this form's tiles for one shape at t tokens; print, record -> the PICK_CC line."""
    nt, k, groups = shape
    ws, ss, sc = w
    rows = nt // groups
    copies = len(ws)
    calls = copies * max(1, math.ceil(32 / copies))
    x = torch.randn(t, groups, k, device="cuda").bfloat16()

    def ref(fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        return grouped_ref(x, ws[0], ss[0], fn)

    def table(i: int) -> torch.Tensor:
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        fp8_gemv.launch(x, ws[i], sc[i][0], sc[i][1], out, groups, True, fp8_gemv.pick(nt, k, groups, x.device))
        return out

    def cc(i: int, cfg: fp8_gemv_cc.Cfg, acc16: bool = False, depth: int = 1, a8: bool = False) -> torch.Tensor:
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        fp8_gemv_cc.launch_cc(x, ws[i], sc[i][0], sc[i][1], out, groups, cfg, acc16=acc16, depth=depth, a8=a8)
        return out

    record = recorder("fp8_gemv_cc", name, shape, t, ctx)

    want_cc = ref(fp8_linear_ref)
    a8 = fp8_gemv.use_a8(nt, k, groups)
    base = time_graph(table, copies, calls)
    record(f"table {'a8' if a8 else 'widen'} {fp8_gemv.pick(nt, k, groups, x.device)}", None, base,
           rel(table(0), ref(fp8_linear_a8_ref) if a8 else want_cc))
    cands = [(c, d) for d in ctx["depths"] for c in tiles(nt, k, groups, ctx["sms"])]
    best = time_tiles("cc", t, cands, lambda i, c, d: cc(i, c, depth=d), want_cc, record, copies, calls, ctx)
    line = f"PICK_CC {name} T={t} {','.join(map(str, best[1])) if best[1] else 'none'}  # {best[0]:.2f} us"
    if best[1] is not None:  # the bf16x2 products (DS4F_FP8_GEMV_CC_ACC16) at the best tile and depth
        c16, d16 = best[1][:3], best[1][3]
        us16 = time_graph(lambda i: cc(i, c16, True, d16), copies, calls)  # type: ignore[arg-type]
        record(f"cc acc16 {c16} d{d16}", list(best[1]), us16, rel(cc(0, c16, True, d16), want_cc))  # type: ignore[arg-type]
        line += f", acc16 {us16:.2f} us"
        # A8 (x quantized in the kernel, the reference's activation path) with bf16x2 products at that tile, against
        # the a8 oracle
        us8 = time_graph(lambda i: cc(i, c16, True, d16, True), copies, calls)  # type: ignore[arg-type]
        record(f"cc a8 acc16 {c16} d{d16}", list(best[1]), us8,
               rel(cc(0, c16, True, d16, True), ref(fp8_linear_a8_ref)))  # type: ignore[arg-type]
        line += f", a8 {us8:.2f} us"
    print(line + f" vs table {base:.2f} us", flush=True)
    return line + f" vs table {base:.2f} us"


def time_tiles(label: str, t: int, cands: list[tuple[fp8_gemv_cc.Cfg, int]],
               run: Callable[[int, fp8_gemv_cc.Cfg, int], torch.Tensor], want: torch.Tensor,
               record: Callable[[str, object, float, float], None], copies: int, calls: int,
               ctx: dict) -> tuple[float, tuple[int, ...] | None]:
    """Time run(copy, tiles, depth) at each (tiles, depth) of cands until ctx's deadline, each checked against want
    and recorded as "<label> <tiles> d<depth>" -> (us, (*tiles, depth)) of the fastest within 1e-2 (inf, None:
    none)."""
    best: tuple[float, tuple[int, ...] | None] = (math.inf, None)
    for cfg, depth in cands:
        if time.time() > ctx["deadline"]:
            print("  budget spent", flush=True)
            break
        try:
            err = rel(run(0, cfg, depth), want)
            us = time_graph(lambda i, c=cfg, d=depth: run(i, c, d), copies, calls)
        except Exception as ex:  # a tile the compiler or the device rejects
            print(f"  T={t} {label} {cfg} d{depth} FAILED {type(ex).__name__}: {str(ex)[:100]}", flush=True)
            continue
        record(f"{label} {cfg} d{depth}", [*cfg, depth], us, err)
        if err < 1e-2:
            best = min(best, (us, (*cfg, depth)))
    return best


def weights(shape: tuple[int, int, int], mb: int) -> list:
    """Weight copies (>= mb MB in all) of one shape: (e4m3 [N, K], UE8M0 scales, their kernel arguments)."""
    nt, k, _ = shape
    copies = max(2, math.ceil(mb * 2**20 / (nt * k)))
    ws = [(torch.randn(nt, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(copies)]
    ss = [torch.randint(118, 124, (-(-nt // 128), k // 128), device="cuda", dtype=torch.uint8)
          .view(torch.float8_e8m0fnu) for _ in range(copies)]
    return [ws, ss, [_scale_arg(s) for s in ss]]


def main() -> None:
    sweep_main(sweep_case, "bench/sweep_fp8_gemv_cc.py", "1,4")


def sweep_main(case: Callable[[str, tuple[int, int, int], int, list, dict], str], script: str, tokens: str,
               depths: bool = True) -> None:
    """A GEMV sweep's command line (--shapes, --tokens (default `tokens`), --depths where the form has them, --mb,
    --budget, --out), then drive()."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=TP2)
    ap.add_argument("--tokens", default=tokens)
    if depths:
        ap.add_argument("--depths", default="1,2", help="weight blocks in flight per program (the kernel's DEPTH)")
    ap.add_argument("--mb", type=int, default=96)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which no new variant starts")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    extra = dict(depths=[int(d) for d in args.depths.split(",")]) if depths else {}
    drive(args, case, script, **extra)


def recorder(case: str, name: str, shape: tuple[int, int, int], t: int, ctx: dict
             ) -> Callable[[str, object, float, float], None]:
    """A sweep case's record(variant, cfg, us, err): one printed line (fraction of ctx's copy GB/s over the weight
    bytes) and one JSON record appended to ctx["out"]."""
    nt, k, groups = shape
    wbytes = nt * k + (-(-nt // 128)) * (k // 128)

    def record(variant: str, cfg: object, us: float, err: float) -> None:
        gbps = wbytes / us / 1e3
        print(f"  T={t} {variant:28s} {us:8.2f} us {gbps / ctx['copy']:5.2f} of copy err={err:.1e}", flush=True)
        if ctx["out"]:
            with open(ctx["out"], "a") as f:
                f.write(json.dumps(dict(case=case, shape=name, n=nt, k=k, groups=groups, t=t, variant=variant,
                                        cfg=cfg, us=round(us, 3), gbps=round(gbps, 1),
                                        frac_copy=round(gbps / ctx["copy"], 4), rel_err=err,
                                        copy_gbps=round(ctx["copy"], 1), **ctx["meta"])) + "\n")

    return record


def drive(args: argparse.Namespace, case: Callable[[str, tuple[int, int, int], int, list, dict], str], script: str,
          **extra: object) -> None:
    """A GEMV sweep's main loop: the copy ceiling, then case(name, shape, t, weights, ctx) per shape of --shapes and
    token count of --tokens (ctx: copy GB/s, --out, the --budget deadline, SMs, run metadata, extra), its PICK lines
    printed again at the end."""
    shapes = v4_shapes()
    copy_gbps, _ = measure_ceilings(5)
    ctx = dict(copy=copy_gbps, out=args.out, deadline=time.time() + args.budget,
               sms=torch.cuda.get_device_properties(0).multi_processor_count,
               meta=run_meta(f"python3 {script} " + " ".join(sys.argv[1:])), **extra)
    print(f"device {ctx['meta']['gpu']} SMs {ctx['sms']} copy {copy_gbps:.0f} GB/s", flush=True)
    picks = []
    for name in args.shapes.split(","):
        w = weights(shapes[name], args.mb)
        print(f"== {name} {shapes[name]}", flush=True)
        picks += [case(name, shapes[name], int(t), w, ctx) for t in args.tokens.split(",")]
        del w
        torch.cuda.empty_cache()
    print("\n".join(picks), flush=True)


if __name__ == "__main__":
    main()
