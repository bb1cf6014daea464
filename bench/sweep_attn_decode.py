"""⑥ decode sparse attention over launch policies, at the fast runner's decode shapes: H heads of 512 (32: one TP=2
rank, 64: one GPU), T tokens, fp8_ds_mla pool rows (e4m3 nope + UE8M0 exponents + bf16 rope, as FastCache stores
them), the inverse RoPE epilogue, per layer kind: SWA (128 window rows), CSA (window + 512 top-k rows, no live
bound: unpicked slots are -1), HCA (window + max_ctx / 128 entry rows with a live bound = window + depth / 128),
depths 64 .. 1M, captured max context 8K and 1M (the HCA list's capacity; the graphs of a 1M server run a depth-64
step over 8320 columns with 128 live).

Each variant: one CUDA graph of --calls calls rotating over distinct q / index copies (rows drawn from a 300 MB pool),
each after an L2 flush (a decode step streams ~1 GB of weights between two attention calls), replayed; us per call =
(median replay - median replay of the flushes alone) / calls: kernel time plus the launch gaps, as in a step.
Variants: "old" (the policy before this sweep, DS4F_ATTN_POLICY=old), "new" (the current defaults, env overrides
included), one knob changed each. Output: a line per case, the attention time of one decode step (2 SWA + 21 CSA +
20 HCA layers) per variant, JSON records, and `PICK ...` lines: the env of the policy variant with the least step
time summed over every (max_ctx, depth) that is not > 2 % slower than "old" at 128K and 1M depth, and the tile knobs
for short (< LONG_K) and long lists picked the same way (DS4F_ATTN_SHORT / DS4F_ATTN_DECODE).
--quick: H=32, T=1 only."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_meta  # noqa: E402
from ds4f.kernels.fp8 import quantize_kv_rows  # noqa: E402

sa = importlib.import_module("ds4f.kernels.sparse_attn")
W, D, ENT = 128, 512, 512  # window, head dim, CSA top-k
LAYERS = {"SWA": 2, "CSA": 21, "HCA": 20}  # flash_config's main layers
DEPTHS = {"8K": (64, 8192), "1M": (64, 8192, 131072, 1048576)}
CAP = {"8K": 8192, "1M": 1048576}


def variants() -> dict[str, dict[str, Any]]:
    """name -> policy and explicit tile knobs (None: the built-in choice)."""
    new = sa.POLICY
    return {
        "old": dict(pol=sa.OLD_POLICY, tile=None),
        "new": dict(pol=new, tile=None),
        "fuse0": dict(pol=replace(new, fuse_max=0), tile=None),
        "fuse16": dict(pol=replace(new, fuse_max=16), tile=None),
        "b2fuse16": dict(pol=replace(new, split_blocks=2, fuse_max=16), tile=None),
        "blocks2": dict(pol=replace(new, split_blocks=2), tile=None),
        "skip0": dict(pol=replace(new, skip=False), tile=None),
        "nosplit": dict(pol=replace(new, nosplit_k=sa.LONG_K - 1), tile=None),  # every short list
        "w8": dict(pol=new, tile=(16, 32, 8, 2)),
        "w8fuse0": dict(pol=replace(new, fuse_max=0), tile=(16, 32, 8, 2)),
        "bk16": dict(pol=new, tile=(16, 16, 4, 2)),
        "bk64w8": dict(pol=new, tile=(16, 64, 8, 2)),
        # DS4F_ATTN_ROPE_SPLIT (rs): the rope columns as a tile of their own, so these tiles pipeline
        "rs": dict(pol=new, tile=None, rs=True),
        "rs32p": dict(pol=new, tile=(16, 32, 8, 2), rs=True),
        "rs32w4": dict(pol=new, tile=(16, 32, 4, 3), rs=True),
        "rs64p": dict(pol=new, tile=(16, 64, 8, 2), rs=True),
        "rs128p": dict(pol=new, tile=(16, 128, 8, 2), rs=True),
    }


QUICK_VARIANTS = ("old", "new", "fuse0", "w8", "rs32p", "rs64p")


def cases(cap: str) -> list[tuple[str, int, int, int]]:
    """(kind, depth, K columns, valid window rows) for one captured max context."""
    out = []
    for depth in DEPTHS[cap]:
        out.append(("HCA", depth, W + CAP[cap] // 128, min(depth + 1, W)))
        if cap == "8K" or depth > 8192:  # SWA / CSA lists do not depend on the capacity: measured once per depth
            out += [("SWA", depth, W, min(depth + 1, W)), ("CSA", depth, W + ENT, min(depth + 1, W))]
    return out


def inputs(kind: str, depth: int, K: int, wv: int, T: int, H: int, n_rows: int, copies: int,
           g: torch.Generator) -> list[dict[str, Any]]:
    ev = min(depth // 4, ENT) if kind == "CSA" else min(depth // 128, K - W) if kind == "HCA" else 0
    out = []
    for _ in range(copies):
        idx = torch.full((T, K), -1, dtype=torch.int32, device="cuda")
        idx[:, :wv] = torch.randint(0, n_rows, (T, wv), device="cuda", generator=g, dtype=torch.int32)
        if ev:
            idx[:, W: W + ev] = torch.randint(0, n_rows, (T, ev), device="cuda", generator=g, dtype=torch.int32)
        live = torch.full((T,), W + ev, dtype=torch.int32, device="cuda") if kind == "HCA" else None
        out.append(dict(q=torch.randn(T, H, D, device="cuda", generator=g).bfloat16(), idx=idx, live=live,
                        cos=torch.randn(T, 32, device="cuda", generator=g),
                        sin=torch.randn(T, 32, device="cuda", generator=g)))
    return out


_FLUSH: list[float] = []  # us of one L2 flush inside a graph (measured once)


def _graph_us(fns: list[Any], calls: int, flush: torch.Tensor, reps: int) -> float:
    """Median us of one replay of a graph of `calls` x (L2 flush, fns[i % len(fns)]) (no fns: flushes only)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for i in range(calls):
            flush.zero_()
            if fns:
                fns[i % len(fns)]()
    gr.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


def time_calls(fns: list[Any], calls: int, flush: torch.Tensor, reps: int = 7) -> float:
    """us per call, each after an L2 flush (a decode step streams ~1 GB of weights between two attention calls: the
    rows come from HBM): a graph of `calls` (flush, call) pairs minus one of the flushes alone, / calls."""
    if not _FLUSH:
        _FLUSH.append(_graph_us([], calls, flush, 15) / calls)
    return _graph_us(fns, calls, flush, reps) / calls - _FLUSH[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/attn_decode.jsonl"))
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--flush-mb", type=int, default=96, help="L2 flush before each call (0: a 1-byte memset)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", default="", help="comma-separated subset (old and new always run)")
    ap.add_argument("--command", default=" ".join(sys.argv))
    args = ap.parse_args()
    meta = run_meta(args.command)
    g = torch.Generator(device="cuda").manual_seed(0)
    base = quantize_kv_rows(torch.randn(65536, D, device="cuda", generator=g), 64)
    nope, exp, rope = (x.repeat(8, 1) for x in base)  # 524288 rows, ~300 MB
    n_rows = nope.shape[0]
    flush = torch.empty(max(args.flush_mb << 20, 1), dtype=torch.int8, device="cuda")
    vs = variants()
    shapes = [(32, 1)] if args.quick else [(32, 1), (32, 4), (64, 1), (64, 4)]
    res: dict[tuple, dict[str, float]] = {}  # (H, T, cap, kind, depth) -> variant -> us
    new_pol = sa.POLICY
    for H, T in shapes:
        names = list(vs) if (H, T) == (32, 1) else [n for n in vs if n in QUICK_VARIANTS]
        if args.variants:
            names = [n for n in names if n in ("old", "new", *args.variants.split(","))]
        sink = torch.randn(H, device="cuda", generator=g)
        for cap in DEPTHS:
            for kind, depth, K, wv in cases(cap):
                ins = inputs(kind, depth, K, wv, T, H, n_rows, 6, g)
                row: dict[str, float] = {}
                ref = None
                for name in names:
                    v = vs[name]
                    kw = {} if v["tile"] is None else dict(zip(("block_h", "block_k", "num_warps", "num_stages"),
                                                               v["tile"]))
                    sa.POLICY = v["pol"]
                    sa.ROPE_SPLIT = v.get("rs", False)

                    def call(x: dict[str, Any], kw: dict[str, Any] = kw, sk: torch.Tensor = sink) -> torch.Tensor:
                        return sa.sparse_attn(x["q"], nope, x["idx"], sk, D**-0.5, exp, kv_rope=rope,
                                              live=x["live"], inv_rope=(x["cos"], x["sin"]), **kw)

                    try:
                        out = call(ins[0]).float()
                        ref = out if ref is None else ref
                        err = ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
                        us = time_calls([lambda x=x: call(x) for x in ins], args.calls, flush)
                    except Exception as ex:  # a tile that does not build here: reported, skipped
                        print(f"# {name} {kind} failed: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
                        continue
                    finally:
                        sa.POLICY, sa.ROPE_SPLIT = new_pol, False
                    if err > 1e-2:
                        print(f"# {name} {kind} H={H} T={T} depth={depth}: rel err {err:.1e} vs old", flush=True)
                        continue
                    row[name] = us
                    with open(args.out, "a") as f:
                        f.write(json.dumps(dict(meta, case=f"attn_decode_{kind}", H=H, T=T, max_ctx=cap, depth=depth,
                                                K=K, variant=name, time_us=round(us, 2), rel_err=err)) + "\n")
                res[(H, T, cap, kind, depth)] = row
                print(f"{kind} H={H} T={T} max_ctx={cap} depth={depth} K={K} | "
                      + " ".join(f"{n} {u:.1f}" for n, u in row.items()), flush=True)
    for fn in (sa._attn_fwd, sa._attn_combine):  # registers / spills of every build this run made
        for cache in fn.device_caches.values():
            for key, k in cache[0].items():
                print(f"# diag {fn.__name__} regs {k.n_regs} spills {k.n_spills} smem {k.metadata.shared} warps "
                      f"{k.metadata.num_warps} stages {k.metadata.num_stages} {str(key)[-160:]}")
    report(res, shapes)


def step_us(res: dict[tuple, dict[str, float]], H: int, T: int, cap: str, depth: int, name: str,
            kinds: tuple[str, ...] = tuple(LAYERS)) -> float | None:
    """One decode step's attention us (LAYERS of each kind) for a variant; None where a case lacks it."""
    tot = 0.0
    for kind in kinds:
        key = (H, T, cap if kind == "HCA" else ("8K" if depth <= 8192 else "1M"), kind, depth)
        us = res.get(key, {}).get(name)
        if us is None:
            return None
        tot += LAYERS[kind] * us
    return tot


def report(res: dict[tuple, dict[str, float]], shapes: list[tuple[int, int]]) -> None:
    steps = [(cap, d) for cap in DEPTHS for d in DEPTHS[cap]]
    long_steps = [("1M", 131072), ("1M", 1048576)]
    for H, T in shapes:
        names = sorted({n for k, r in res.items() if k[:2] == (H, T) for n in r})
        print(f"# step attention us, H={H} T={T} (2 SWA + 21 CSA + 20 HCA): " + " ".join(f"{c}/{d}" for c, d in steps))
        for n in names:
            vals = [step_us(res, H, T, c, d, n) for c, d in steps]
            print(f"  {n:10s} " + " ".join("-" if v is None else f"{v:.0f}" for v in vals))
    H, T = shapes[0]

    def ok_long(n: str) -> bool:  # no slower than old at long depth (the 1M measurements of decode_long)
        return all((a := step_us(res, H, T, c, d, n)) is not None and (b := step_us(res, H, T, c, d, "old"))
                   is not None and a <= 1.02 * b for c, d in long_steps)

    def total(n: str, kinds: tuple[str, ...] = tuple(LAYERS)) -> float:
        vals = [step_us(res, H, T, c, d, n, kinds) for c, d in steps]
        return float("inf") if any(v is None for v in vals) else sum(vals)  # type: ignore[arg-type]

    pols = [n for n in ("new", "fuse0", "fuse16", "b2fuse16", "blocks2", "skip0", "nosplit") if ok_long(n)]
    best = min(pols, key=total) if pols else "new"
    if not pols:
        print("# WARNING: every policy variant is > 2 % slower than old at 128K / 1M depth (DS4F_ATTN_POLICY=old?)")
    pol = variants()[best]["pol"]
    print("# policy totals: " + " ".join(f"{n} {total(n):.0f}" for n in ("old", *pols)))
    print(f"PICK DS4F_ATTN_DYN={int(pol.dyn)} DS4F_ATTN_FUSE_MAX={pol.fuse_max} DS4F_ATTN_SKIP={int(pol.skip)} "
          f"DS4F_ATTN_SPLIT_BLOCKS={pol.split_blocks} DS4F_ATTN_NOSPLIT_K={pol.nosplit_k}  # policy {best}")
    tiles = {"new": None, "w8": (16, 32, 8, 2), "bk16": (16, 16, 4, 2), "bk64w8": (16, 64, 8, 2)}
    # short lists (SWA, CSA, HCA at an 8K max_ctx) and long ones (HCA at 1M) take separate tile knobs
    short = {n: total(n, ("SWA", "CSA")) + sum(res.get((H, T, "8K", "HCA", d), {}).get(n, float("inf"))
                                                for d in DEPTHS["8K"]) * LAYERS["HCA"] for n in tiles}
    long = {n: sum(res.get((H, T, "1M", "HCA", d), {}).get(n, float("inf")) for d in DEPTHS["1M"]) for n in tiles}
    pick_s, pick_l = min(short, key=short.get), min(long, key=long.get)  # type: ignore[arg-type]
    full = res.get((H, T, "1M", "HCA", 1048576), {})  # a long tile must not slow the 1M-depth call (decode_long)
    if long[pick_l] > 0.98 * long["new"] or full.get(pick_l, 1e9) > 1.02 * full.get("old", 0.0):
        pick_l = "new"
    if short[pick_s] > 0.98 * short["new"]:
        pick_s = "new"
    print("# tile totals short: " + " ".join(f"{n} {u:.0f}" for n, u in short.items())
          + " | long: " + " ".join(f"{n} {u:.0f}" for n, u in long.items()))
    parts = [f"DS4F_ATTN_SHORT={','.join(map(str, tiles[pick_s]))}" if tiles[pick_s] else "",
             f"DS4F_ATTN_DECODE={','.join(map(str, tiles[pick_l]))}" if tiles[pick_l] else ""]
    print("PICK " + (" ".join(p for p in parts if p) or "tiles as built in"))


if __name__ == "__main__":
    main()
