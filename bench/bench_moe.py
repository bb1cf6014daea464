"""⑥ kernels, fused_moe microbenchmark: V4-Flash MoE widths (D=4096, I=2048, 256 routed experts top-6 + the shared
expert as id 256, as fast_model calls it) in, one line per case + JSON records (bench/results/moe.jsonl) out.

Measures its own ceilings in the same run (bf16 torch.matmul 8192^3 for FLOP/s, a 4 GiB device copy for bytes/s)
and reports each case as a fraction of them: prefill (T=8192) per GEMM in TFLOP/s, decode (T=1..16) in GB/s of the
distinct experts' weights. --sweep times tile configs per GEMM (the table in ds4f/kernels/moe.py comes from it)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels import moe  # noqa: E402
from ds4f.kernels.ref import fused_moe_ref  # noqa: E402

E, K_ROUTED, D, I = 256, 6, 4096, 2048
DEV = "cuda"
timed = partial(time_us, graph=False, warmup=1)  # events around each run, L2 flushed before each (flush=False: not)
graphed = partial(time_us, graph=True, warmup=1)  # replayed from a CUDA graph, as the server runs decode steps


class Recorder:
    def __init__(self, out: Path | None, command: str) -> None:
        self.out, self.mm, self.bw = out, 0.0, 0.0
        self.meta = run_meta(command)

    def emit(self, case: str, shape: str, t_us: float, flops: float = 0.0, nbytes: float = 0.0, **extra) -> None:
        tf, gb = flops / t_us / 1e6, nbytes / t_us / 1e3
        frac = tf / self.mm if flops else gb / self.bw
        rec = dict(case=case, shape=shape, time_us=round(t_us, 2), tflops=round(tf, 1), gbps=round(gb, 1),
                   frac=round(frac, 3), ceiling=f"mm {self.mm:.0f} TFLOP/s, copy {self.bw:.0f} GB/s", **extra,
                   **self.meta)
        print(f"{case:<14} {shape:<44} {t_us:>9.1f} us {tf:>6.1f} TF/s {gb:>5.0f} GB/s frac {frac:.3f} "
              + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(json.dumps(rec) + "\n")


def ceilings(r: Recorder) -> None:
    r.bw, r.mm = measure_ceilings(iters=10)
    print(f"ceilings: matmul 8192^3 bf16 {r.mm:.0f} TFLOP/s, copy {r.bw:.0f} GB/s", flush=True)
    r.emit("ceil_mm", "8192^3 bf16", t_us=2 * 8192**3 / r.mm / 1e6, flops=2 * 8192**3)


def weights(n_exp: int) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.empty(n_exp, 2 * I, D, dtype=torch.bfloat16, device=DEV).normal_(0, 3 * D**-0.5)
    w2 = torch.empty(n_exp, D, I, dtype=torch.bfloat16, device=DEV).normal_(0, I**-0.5)
    return w13, w2


def routing(T: int, shared: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, D, device=DEV, generator=g).bfloat16()
    ids = torch.rand(T, E, device=DEV, generator=g).topk(K_ROUTED, dim=1).indices.int()
    if shared:
        ids = torch.cat([ids, torch.full((T, 1), E, dtype=torch.int32, device=DEV)], 1)
    return x, ids, torch.rand(ids.shape, device=DEV, generator=g)


def expert_bytes(ids: torch.Tensor, T: int) -> float:
    return ids.unique().numel() * 3 * I * D * 2 + T * D * 2 * 2


def _cfg_str(c: dict[str, int]) -> str:
    return " ".join(f"{k.replace('_BLOCK', '').replace('_num', '')}={v}" for k, v in c.items())


PRE = [  # (BLOCK_M, which, BLOCK_N, BLOCK_K, GROUP_M, warps, stages): one tier, T=8192
    (128, "up", 128, 64, 8, 8, 4), (128, "down", 256, 64, 16, 8, 4), (128, "up", 128, 64, 4, 8, 4),
    (128, "down", 256, 64, 8, 8, 4), (128, "up", 128, 32, 8, 8, 6), (128, "down", 256, 32, 16, 8, 6),
    (128, "up", 128, 64, 64, 8, 4), (128, "down", 256, 64, 64, 8, 4), (128, "down", 256, 128, 16, 8, 2),
    (64, "up", 256, 64, 16, 8, 3), (64, "down", 256, 64, 32, 8, 4), (64, "up", 256, 64, 16, 8, 4),
]
DEC = [  # (which, BLOCK_N, BLOCK_K, warps, stages): T=1 and T=4 (the same table row)
    ("up", 64, 128, 4, 3), ("down", 32, 256, 4, 3), ("up", 64, 128, 4, 2), ("down", 32, 256, 4, 2),
    ("up", 32, 128, 4, 3), ("down", 32, 128, 4, 2), ("up", 32, 128, 4, 2), ("down", 64, 128, 4, 2),
    ("up", 64, 256, 4, 2), ("down", 64, 256, 4, 2), ("up", 32, 256, 4, 2), ("down", 16, 256, 4, 2),
    ("up", 64, 64, 4, 4), ("down", 32, 128, 4, 3), ("up", 128, 128, 4, 2), ("down", 64, 128, 4, 3),
    ("up", 64, 128, 4, 4), ("down", 32, 256, 8, 3), ("up", 32, 128, 4, 4), ("down", 32, 128, 4, 4),
]


def sweep(r: Recorder, w13: torch.Tensor, w2: torch.Tensor, deadline: float) -> dict[int, dict[str, int]]:
    """Each GEMM alone over tile configs (same routing, same one-tier plan per BLOCK_M); stops at the deadline.
    Returns the fastest GEMM settings per T as fused_moe config overrides."""
    n_exp = w13.shape[0]
    jobs = [(8192, bm, wh, bn, bk, gm, nw, ns) for bm, wh, bn, bk, gm, nw, ns in PRE]
    for T in (1, 4):
        jobs += [(T, 16, wh, bn, bk, 1, nw, ns) for wh, bn, bk, nw, ns in DEC]
    plans: dict[tuple[int, int], tuple] = {}
    best: dict[tuple[int, str], tuple[float, dict[str, int]]] = {}
    for T, bm, wh, bn, bk, gm, nw, ns in jobs:
        if time.time() > deadline:
            print("# sweep: deadline reached, rest skipped", flush=True)
            break
        if (T, bm) not in plans:
            x, ids, wt = routing(T, shared=True)
            base = moe.resolve_config(ids.numel(), n_exp, T, dict(BLOCK_M=bm, TAIL_M=0))
            (sid, be, nb, _), = moe.moe_plan(ids, n_exp, base)
            a = moe.moe_up(x, w13, sid, be, nb, ids.shape[1], 10.0, base)
            plans[(T, bm)] = (x, ids, wt.view(-1), base, sid, be, nb, a)
        x, ids, tw, base, sid, be, nb, a = plans[(T, bm)]
        knobs = {f"{wh}_BLOCK_N": bn, f"{wh}_BLOCK_K": bk, f"{wh}_GROUP_M": gm, f"{wh}_num_warps": nw,
                 f"{wh}_num_stages": ns}
        cfg = dict(base, **knobs)
        M = ids.numel()
        if wh == "up":
            fn = partial(moe.moe_up, x, w13, sid, be, nb, ids.shape[1], 10.0, cfg)
            flops, nbytes = 2.0 * M * 2 * I * D, ids.unique().numel() * 2 * I * D * 2
        else:
            fn = partial(moe.moe_down, a, w2, sid, be, nb, tw, M, cfg)
            flops, nbytes = 2.0 * M * I * D, ids.unique().numel() * I * D * 2
        try:
            t = timed(fn, 10 if T > 64 else 30)
        except Exception as ex:  # a config that does not fit: report, keep going
            print(f"# {wh} T={T} bm={bm} bn={bn} bk={bk} nw={nw} ns={ns} failed: {str(ex)[:120]}", flush=True)
            continue
        shape = f"T={T} bm={bm} gm={gm} bn={bn} bk={bk} nw={nw} ns={ns}"
        r.emit(f"sweep_{wh}", shape, t, **(dict(flops=flops) if T > 64 else dict(nbytes=nbytes)))
        if bm == base["BLOCK_M"] == moe.resolve_config(M, n_exp, T)["BLOCK_M"] and t < best.get((T, wh), (1e30,))[0]:
            best[(T, wh)] = (t, knobs)
    out: dict[int, dict[str, int]] = {}
    for (T, _), (_, knobs) in best.items():
        out.setdefault(T, {}).update(knobs)
    for T, knobs in out.items():
        print(f"# sweep best T={T}: {knobs}", flush=True)
    return out


def parts(r: Recorder, w13: torch.Tensor, w2: torch.Tensor, T: int, shared: bool, tag: str,
          config: dict[str, int] | None = None) -> None:
    """fused_moe end to end, then its pieces (align, up, down, sum) one by one."""
    n_exp = w13.shape[0]
    x, ids, wt = routing(T, shared)
    k = ids.shape[1]
    M, nbytes, flops = ids.numel(), expert_bytes(ids, T), 2.0 * ids.numel() * 3 * I * D
    out = moe.fused_moe(x, w13, w2, ids, wt, 10.0, config=config)
    ref = fused_moe_ref(x, w13, w2, ids, wt, 10.0)
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    cfg = moe.resolve_config(M, n_exp, T, config)
    shape = f"T={T} E={n_exp} k={k} D={D} I={I}"
    big = T > 64
    it = 10 if big else 50
    fm = partial(moe.fused_moe, x, w13, w2, ids, wt, 10.0, config=config)
    r.emit(f"{tag}_total", shape, (timed if big else graphed)(fm, it),
           **(dict(flops=flops) if big else dict(nbytes=nbytes)), rel_err=rel, config=_cfg_str(cfg))
    if cfg["TAIL_M"]:
        one = dict(config or {}, TAIL_M=0)
        r.emit(f"{tag}_total_1tier", shape, timed(partial(moe.fused_moe, x, w13, w2, ids, wt, 10.0, config=one), it),
               flops=flops)
    if cfg["FUSE_SUM"] or cfg["SPLIT_K"] > 1:  # the pieces below time per-pick bf16 rows + a sum; such decode rows
        return  # are timed piece by piece in bench/sweep_moe_decode.py
    tiers = moe.moe_plan(ids, n_exp, cfg)
    acts = [moe.moe_up(x, w13, s, b, n, k, 10.0, c) for s, b, n, c in tiers]
    rows = torch.empty(M, D, dtype=torch.bfloat16, device=DEV)
    tw = wt.view(-1)

    def up() -> None:
        for s, b, n, c in tiers:
            moe.moe_up(x, w13, s, b, n, k, 10.0, c)

    def down() -> None:
        for (s, b, n, c), a in zip(tiers, acts, strict=True):
            moe.moe_down(a, w2, s, b, n, tw, M, c, rows)

    n_up = ids.unique().numel() * 2 * I * D * 2
    if not cfg["PER_PICK"]:
        r.emit(f"{tag}_align", shape, timed(lambda: moe.moe_plan(ids, n_exp, cfg), it), nbytes=M * 4)
    r.emit(f"{tag}_up", shape, timed(up, it), **(dict(flops=2.0 * M * 2 * I * D) if big else dict(nbytes=n_up)),
           tiers=len(tiers))
    r.emit(f"{tag}_down", shape, timed(down, it), **(dict(flops=2.0 * M * I * D) if big else dict(nbytes=n_up / 2)))
    r.emit(f"{tag}_sum", shape, timed(lambda: moe.moe_sum(rows, T, k), it), nbytes=M * D * 2 + T * D * 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "moe.jsonl")
    ap.add_argument("--sweep", action="store_true", help="time tile configs per GEMM first")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds for the sweep")
    ap.add_argument("--tokens", default="1,2,4,8,16,64,512,2048,8192", help="T values for end-to-end cases")
    a = ap.parse_args()
    t0 = time.time()
    r = Recorder(a.out, "python3 bench/bench_moe.py " + " ".join(sys.argv[1:]))
    ceilings(r)
    w13, w2 = weights(E + 1)
    best = sweep(r, w13, w2, t0 + a.budget) if a.sweep else {}
    for T in [int(v) for v in a.tokens.split(",")]:
        tag = "prefill" if T > 64 else "decode"
        parts(r, w13, w2, T, shared=True, tag=tag)
        if T in best:  # the sweep's fastest GEMM settings, when they differ from the table's
            cfg = moe.resolve_config(T * (K_ROUTED + 1), E + 1, T)
            if any(cfg[key] != v for key, v in best[T].items()):
                parts(r, w13, w2, T, shared=True, tag=tag + "_swept", config=best[T])
    # routed only (E=256, k=6): the shape of bench_kernels.py's earlier "moe" records
    for T in (1, 8192):
        parts(r, w13[:E], w2[:E], T, shared=False, tag="routed")
    print(f"# done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
