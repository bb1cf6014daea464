"""FP8 decode GEMV sweep: fp8_gemm's _w8_kernel (its default tiles) against ds4f/kernels/fp8_gemv.py's swap-AB kernel
over tile configs, at the per-rank decode shapes of V4-Flash (flash_config sharded as ds4f/model/tp.py does, TP=2 and
TP=1), T = 1 and 4 tokens, UE8M0 scales (as the checkpoint ships them).

Each variant is timed as a CUDA graph of many calls cycling through distinct weight copies (>= --mb MB in all, so the
50 MB L2 never holds a weight), replayed; prints us per call, weight GB/s and the fraction of the copy ceiling measured
in the same run (bench/common.measure_ceilings), checks every variant against fp8_linear_ref, appends one JSON record
per (shape, T, variant) to --out, and ends each shape with `PICK <NAME> bn,bk,split,nw,ns` (or `PICK <NAME> w8`: the
_w8_kernel is at least as fast) plus the fp8_gemv.CONFIGS lines to paste. Stops starting new variants after --budget
seconds (the picks then come from what ran). --a8: the table config in the widening form, then every candidate with
x quantized per 128 columns and the e4m3 x e4m3 dot (fp8_gemv.launch a8=True, checked against fp8_linear_a8_ref),
ending each shape with `PICK_A8 <NAME> bn,bk,split,nw,ns` and the fp8_gemv.CONFIGS_A8 lines. Usage:
PYTHONPATH=$PWD python3 bench/sweep_fp8_gemv.py [--shapes IN_PROJ,WO_B_TP2] [--tokens 1,4] [--full] [--a8]
[--out bench/results/fp8_gemv.jsonl]"""

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

from bench.common import measure_ceilings, run_meta, time_graph  # noqa: E402,RUF100
from ds4f.kernels import fp8_gemv  # noqa: E402,RUF100
from ds4f.kernels.fp8_gemm import (  # noqa: E402,RUF100
    Opts,
    _scale_arg,
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_a8_ref,
    fp8_linear_ref,
    grouped_ref,
)
from ds4f.model.args import flash_config  # noqa: E402,RUF100

Cfg = tuple[int, int, int, int, int]
# (BLOCK_N, BLOCK_K, num_warps, num_stages) timed by default; --full adds the rest of the product
BASE = [(32, 128, 4, 6), (32, 256, 4, 3), (32, 256, 4, 4), (32, 256, 4, 6), (64, 128, 4, 4), (64, 128, 4, 6),
        (64, 256, 4, 3), (64, 256, 4, 4), (64, 256, 8, 4), (128, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3)]


def v4_shapes() -> dict[str, tuple[int, int, int]]:
    """name -> (G*N, K, G) of each FP8 decode projection per rank at TP=2 and TP=1 (the fp8_gemv.CONFIGS names)."""
    a = flash_config()
    d, h, hd, og = a["hidden_size"], a["num_attention_heads"], a["head_dim"], a["o_groups"]
    qr, olr, inter = a["q_lora_rank"], a["o_lora_rank"], a["moe_intermediate_size"] * a["n_shared_experts"]
    out: dict[str, tuple[int, int, int]] = {"IN_PROJ": (qr + hd, d, 1),  # [wq_a; wkv]: replicated
                                            "IDX_WQ_B": (a["index_n_heads"] * a["index_head_dim"], qr, 1)}
    for world in (2, 1):
        tp = f"TP{world}"
        out[f"WQ_B_{tp}"] = (h * hd // world, qr, 1)
        out[f"WO_A_{tp}"] = (og // world * olr, h * hd // og, og // world)
        out[f"WO_B_{tp}"] = (d, og * olr // world, 1)
        out[f"W13_{tp}"] = (2 * inter // world, d, 1)  # the shared expert's [w1; w3]
        out[f"W2_{tp}"] = (d, inter // world, 1)
    del out["W13_TP1"]  # = WO_B_TP2's shape
    return out


def candidates(nt: int, k: int, groups: int, sms: int, full: bool, grid: str = "") -> list[Cfg]:
    """Configs worth timing: K splits around 1, 2 and 4 programs per SM (distinct effective splits only). grid
    "BNs:BKs:NWs:NSs" (comma lists) replaces the default tiles; full: every BLOCK_N x BLOCK_K x warps x stages."""
    base = BASE if not full else [(bn, bk, nw, ns) for bn in (32, 64, 128) for bk in (128, 256, 512)
                                  for nw in (4, 8) for ns in (3, 4, 5, 6)]
    if grid:
        bns, bks, nws, nss = ([int(v) for v in part.split(",")] for part in grid.split(":"))
        base = [(bn, bk, nw, ns) for bn in bns for bk in bks for nw in nws for ns in nss]
    out: list[Cfg] = []
    for bn, bk, nw, ns in base:
        c0: Cfg = (bn, bk, 1, nw, ns)
        if not fp8_gemv.valid(c0, nt, groups) or ns * (bn + 32) * bk > 220 * 1024:
            continue
        tiles, chunks = -(-nt // bn), -(-k // bk)
        seen = set()
        for target in (0, sms, 2 * sms, 4 * sms):
            split = max(1, min(chunks, -(-target // tiles))) if target else 1
            eff = -(-chunks // -(-chunks // split))
            if eff not in seen and tiles * eff <= 8 * sms:
                seen.add(eff)
                out.append((bn, bk, eff, nw, ns))
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def sweep_shape(name: str, shape: tuple[int, int, int], tokens: list[int], sms: int, ctx: dict) -> str:
    """Time the _w8_kernel and the candidates for one shape at each T; print, record, PICK; -> the CONFIGS line."""
    nt, k, groups = shape
    wbytes = nt * k + (-(-nt // 128)) * (-(-k // 128))
    copies = max(2, math.ceil(ctx["mb"] * 2**20 / wbytes))
    calls = copies * max(1, math.ceil(32 / copies))
    ws = [(torch.randn(nt, k, device="cuda") * 100).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(copies)]
    ss = [torch.randint(118, 124, (-(-nt // 128), -(-k // 128)), device="cuda", dtype=torch.uint8)
          .view(torch.float8_e8m0fnu) for _ in range(copies)]
    xs = {t: torch.randn(t, groups, k, device="cuda").bfloat16() for t in tokens}
    rows = nt // groups
    def reference(ref: Callable[..., torch.Tensor]) -> dict[int, torch.Tensor]:
        return {t: grouped_ref(xs[t], ws[0], ss[0], ref) for t in tokens}

    exact = reference(fp8_linear_ref)  # the w8 kernel and the widening form
    want = reference(fp8_linear_a8_ref) if ctx["a8"] else exact
    scale = {i: _scale_arg(ss[i]) for i in range(copies)}

    def old(t: int, i: int) -> torch.Tensor:
        o = Opts("w8", gemv=False)
        return fp8_grouped_linear(xs[t], ws[i], ss[i], opts=o) if groups > 1 else fp8_linear(xs[t][:, 0], ws[i],
                                                                                             ss[i], opts=o)

    def new(t: int, i: int, cfg: Cfg, bits: bool = True, a8: bool = ctx["a8"]) -> torch.Tensor:
        out = torch.empty(t, groups, rows, dtype=torch.bfloat16, device="cuda")
        fp8_gemv.launch(xs[t], ws[i], scale[i][0], scale[i][1], out, groups, True, cfg, bits=bits, a8=a8)
        return out

    def report(label: str, us: dict[int, float], ok: bool, cfg: Cfg | None) -> None:
        cells = []
        for t in tokens:
            gbps = wbytes / us[t] / 1e3
            cells.append(f"T={t}: {us[t]:7.2f} us {gbps:5.0f} GB/s {gbps / ctx['copy']:.2f}")
            rec = dict(bench="sweep_fp8_gemv", shape=name, n=nt, k=k, groups=groups, t=t, variant=label,
                       cfg=list(cfg) if cfg else None, us=round(us[t], 3), gbps=round(gbps, 1),
                       frac_copy=round(gbps / ctx["copy"], 4), ok=ok, copy_gbps=round(ctx["copy"], 1), **ctx["meta"])
            if ctx["out"]:
                with open(ctx["out"], "a") as f:
                    f.write(json.dumps(rec) + "\n")
        print(f"  {label:24s}" + "  ".join(cells) + ("" if ok else " BAD"), flush=True)

    print(f"== {name} N={nt} K={k} G={groups} {wbytes / 2**20:.1f} MB x {copies} copies, {calls} calls/graph",
          flush=True)
    base = {t: time_graph(lambda i, t=t: old(t, i), copies, calls) for t in tokens}
    base_ok = all(rel(old(t, 0), exact[t]) < 5e-3 for t in tokens)
    report("w8_kernel", base, base_ok, None)
    table = fp8_gemv.CONFIGS.get(name, (shape, None))[1]
    if ctx["a8"] and table is not None:  # today's widening kernel at its table config, then the a8 candidates
        us = {t: time_graph(lambda i, t=t: new(t, i, table, a8=False), copies, calls) for t in tokens}
        report(f"{table} table widen", us, all(rel(new(t, 0, table, a8=False), exact[t]) < 5e-3 for t in tokens),
               table)
        base = us
        table = fp8_gemv.CONFIGS_A8.get(name)
    cands = candidates(nt, k, groups, sms, ctx["full"], ctx["grid"])
    if table is not None and table not in cands:
        cands.insert(0, table)
    results: list[tuple[float, Cfg]] = []
    for j, cfg in enumerate(cands):
        if time.time() > ctx["deadline"]:
            print(f"  budget spent: {len(cands) - j} of {len(cands)} configs not timed", flush=True)
            break
        try:
            ok = all(rel(new(t, 0, cfg), want[t]) < 5e-3 for t in tokens)
            us = {t: time_graph(lambda i, t=t, c=cfg: new(t, i, c), copies, calls) for t in tokens}
        except Exception as ex:  # a config the compiler or the device rejects (e.g. shared memory)
            print(f"  {cfg} FAILED {type(ex).__name__}: {str(ex)[:100]}", flush=True)
            continue
        report(str(cfg) + (" table" if cfg == table else ""), us, ok, cfg)
        if ok:
            results.append((sum(us.values()) / len(us), cfg))
    b_us = sum(base.values()) / len(base)
    best_us, best = min(results) if results else (math.inf, None)
    if ctx["a8"]:
        if best is None:
            return f'    # {name}: no a8 config ran'
        print(f"PICK_A8 {name} {','.join(map(str, best))}  # {best_us:.2f} us ({wbytes / best_us / 1e3:.0f} GB/s, "
              f"{wbytes / best_us / 1e3 / ctx['copy']:.2f} of copy) vs widening {b_us:.2f} us", flush=True)
        return f'    "{name}": {best},  # {best_us:.2f} vs widening {b_us:.2f} us'
    if best is not None:  # the same tiles with Triton's e4m3 -> bf16 conversions (DS4F_FP8_GEMV_WIDEN=cvt)
        us = {t: time_graph(lambda i, t=t: new(t, i, best, False), copies, calls) for t in tokens}
        report(f"{best} cvt", us, all(rel(new(t, 0, best, False), want[t]) < 5e-3 for t in tokens), best)
    if best is None or best_us >= 0.98 * b_us:
        print(f"PICK {name} w8  # _w8_kernel {b_us:.2f} us <= fp8_gemv {best} {best_us:.2f} us", flush=True)
        return f'    "{name}": (({nt}, {k}, {groups}), None),'
    print(f"PICK {name} {','.join(map(str, best))}  # {best_us:.2f} us ({wbytes / best_us / 1e3:.0f} GB/s, "
          f"{wbytes / best_us / 1e3 / ctx['copy']:.2f} of copy) vs _w8_kernel {b_us:.2f} us", flush=True)
    return f'    "{name}": (({nt}, {k}, {groups}), {best}),  # {best_us:.2f} vs w8 {b_us:.2f} us'


def main() -> None:
    shapes = v4_shapes()
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(shapes), help="names from " + ",".join(shapes))
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--full", action="store_true", help="every BLOCK_N x BLOCK_K (+512) x warps x stages")
    ap.add_argument("--mb", type=int, default=96, help="weight copies per shape totalling at least this many MB")
    ap.add_argument("--budget", type=float, default=140.0, help="seconds after which no new variant starts")
    ap.add_argument("--grid", default="", help="BNs:BKs:NWs:NSs, e.g. 64,128:128,256:4,8:3,4,6 (replaces the tiles)")
    ap.add_argument("--a8", action="store_true", help="sweep the a8 form (x quantized, e4m3 x e4m3 dot)")
    ap.add_argument("--out", default="", help="append JSON records here")
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_gbps, mm = measure_ceilings(5)
    for name, shape in shapes.items():  # the table must describe the same shapes as the model
        assert fp8_gemv.CONFIGS.get(name, (shape,))[0] == shape, (name, shape)
    ctx = dict(copy=copy_gbps, mb=args.mb, full=args.full, out=args.out, deadline=t0 + args.budget, a8=args.a8,
               grid=args.grid,
               meta=run_meta(" ".join(sys.argv)))
    print(f"device {torch.cuda.get_device_name()} SMs {sms} torch {torch.__version__} copy {copy_gbps:.0f} GB/s "
          f"(read+write) bf16 mm {mm:.0f} TFLOP/s; GB/s columns: weight bytes / us, then the fraction of copy",
          flush=True)
    tokens = [int(t) for t in args.tokens.split(",")]
    lines = []
    for name in args.shapes.split(","):
        lines.append(sweep_shape(name, shapes[name], tokens, sms, ctx))
        torch.cuda.empty_cache()
    table = "CONFIGS_A8" if args.a8 else "CONFIGS"
    print(f"{table} to paste into ds4f/kernels/fp8_gemv.py ({time.time() - t0:.0f} s):\n" + "\n".join(lines),
          flush=True)


if __name__ == "__main__":
    main()
