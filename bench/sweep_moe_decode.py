"""⑥ fused_moe at decode (T = 1, 4, 16 tokens; V4-Flash widths D 4096, I 2048; random top-6 over 256 experts + the
shared expert as id 256) over tile configs: the up GEMM alone (with moe_align when the config sorts), then the down
GEMM with its pick sum (none when FUSE_SUM sums in registers; K split -> fp32 partials + moe_sum), then fused_moe end
to end for the current table vs the combined pick (also at the bucket's smallest T, which the pick must not slow by
> 2 %). Each timing is a CUDA graph of 2 * --layers calls cycling over --layers distinct layers' weights (12.9 GB
each, so L2 holds none), per call; GB/s counts each layer's distinct experts' bytes, against the copy ceiling measured
in the same run. Every variant is checked against the current config's result (rel err < 1e-2).

Prints one line per variant, appends JSON records (bench/results/moe_decode.jsonl), and ends with
`PICK DS4F_MOE_DECODE_T1=.. DS4F_MOE_DECODE_T4=.. DS4F_MOE_DECODE_T16=..` (a bucket is left out when its pick was not
>= 2 % faster end to end) and the DECODE_TABLE rows for ds4f/kernels/moe.py. Row layout: moe.DECODE_TABLE's."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels import moe  # noqa: E402

E, K_ROUTED, D, I = 256, 6, 4096, 2048
DEV = "cuda"
LIMIT = 10.0
Up = tuple[int, int, int, int, int, int, int]  # BLOCK_M, PER_PICK, BLOCK_N, BLOCK_K, GROUP_M, warps, stages
Down = tuple[int, int, int, int, int, int, int, int]  # PER_PICK, FUSE_SUM, SPLIT_K, BLOCK_N, BLOCK_K, GM, warps, st


def up_variants(T: int) -> list[Up]:
    pp = [1] if T == 1 else [0, 1]
    out: list[Up] = []
    for p in pp:
        gm = 64 if p and T > 1 else 1  # one block per pick, several tokens: N-major order (shared expert from L2)
        for bn in (16, 32, 64):
            for bk, ns in ((128, 3), (128, 4), (128, 6), (256, 3), (256, 4), (64, 6)):
                out.append((16, p, bn, bk, gm, 4, ns))
        out += [(16, p, 32, 256, gm, 8, 4), (16, p, 64, 256, gm, 8, 3), (16, p, 32, 128, gm, 2, 4)]
        if not p:
            out += [(16, 0, 32, 128, 8, 4, 4), (16, 0, 64, 128, 8, 4, 4)]
    return out


def down_variants(T: int) -> list[Down]:
    out: list[Down] = []
    for p in ([1] if T == 1 else [0, 1]):
        gm = 64 if p and T > 1 else 1
        fs_opts = (1, 0) if p else (0,)
        for fs in fs_opts:
            for sk in (1, 2, 4) if fs else (1, 2):
                for bn in (16, 32, 64):
                    for bk, ns in ((128, 4), (256, 3), (256, 4), (128, 6)):
                        if (fs or bn == 32) and (sk < 4 or (bn >= 32 and bk == 256)):
                            out.append((p, fs, sk, bn, bk, gm, 4, ns))
            out += [(p, fs, 1, 32, 256, gm, 8, 4), (p, fs, 2, 16, 256, gm, 2, 4)]
    return out


def up_of(cfg: dict[str, int]) -> Up:
    return (cfg["BLOCK_M"], cfg["PER_PICK"], cfg["up_BLOCK_N"], cfg["up_BLOCK_K"], cfg["up_GROUP_M"],
            cfg["up_num_warps"], cfg["up_num_stages"])


def down_of(cfg: dict[str, int]) -> Down:
    return (cfg["PER_PICK"], cfg["FUSE_SUM"], cfg["SPLIT_K"], cfg["down_BLOCK_N"], cfg["down_BLOCK_K"],
            cfg["down_GROUP_M"], cfg["down_num_warps"], cfg["down_num_stages"])


def row_of(u: Up, d: Down) -> moe.DecodeRow:
    return (u[0], u[1], d[1], d[2], *u[2:], *d[3:])  # type: ignore[return-value]


class Case:
    """T tokens' routing per layer over L layers' weights (each its own routing)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], T: int, seed: int) -> None:
        self.layers, self.T = layers, T
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.x, self.ids, self.tw = [], [], []
        for _ in layers:
            self.x.append(torch.randn(T, D, device=DEV, generator=g).bfloat16())
            ids = torch.rand(T, E, device=DEV, generator=g).topk(K_ROUTED, dim=1).indices.int()
            self.ids.append(torch.cat([ids, torch.full((T, 1), E, dtype=torch.int32, device=DEV)], 1))
            self.tw.append(torch.rand(self.ids[-1].shape, device=DEV, generator=g))
        self.k = self.ids[0].shape[1]
        self.M = T * self.k
        self.hit = sum(i.unique().numel() for i in self.ids) / len(layers)  # mean distinct experts per layer

    def cycle(self, one: Callable[[int], object], reps: int = 2) -> Callable[[], None]:
        def fn() -> None:
            for _ in range(reps):
                for li in range(len(self.layers)):
                    one(li)
        return fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def pick_rows(a: torch.Tensor, sid: torch.Tensor, M: int, cfg: dict[str, int]) -> torch.Tensor:
    """up's activation [slots, I] -> [M, I] by pick."""
    if cfg["PER_PICK"]:
        return a.view(M, cfg["BLOCK_M"], -1)[:, 0]
    real = (sid < M).nonzero().squeeze(1)
    out = torch.empty(M, a.shape[1], dtype=a.dtype, device=a.device)
    out[sid[real].long()] = a[real]
    return out


def sweep_t(T: int, layers: list[tuple[torch.Tensor, torch.Tensor]], timer: Callable[[Callable[[], None]], float],
            report: Callable[..., None], deadline: float) -> moe.DecodeRow | None:
    """Up tiles, then down tiles (+ sum), then the combined row end to end -> the row when >= 2 % faster."""
    c = Case(layers, T, seed=T)
    cur = moe.resolve_config(c.M, E + 1, T)
    b_up, b_down = c.hit * 2 * I * D * 2 + T * D * 2, c.hit * I * D * 2 + T * D * 2
    ref = moe.fused_moe(c.x[0], *layers[0], c.ids[0], c.tw[0], LIMIT, config=cur)
    print(f"# T={T}: {c.hit:.1f} distinct experts per layer; current {up_of(cur)} / {down_of(cur)}", flush=True)

    def up_run(u: Up, li: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        cfg = moe.resolve_config(c.M, E + 1, T, dict(BLOCK_M=u[0], PER_PICK=u[1], FUSE_SUM=0, up_BLOCK_N=u[2],
                                                     up_BLOCK_K=u[3], up_GROUP_M=u[4], up_num_warps=u[5],
                                                     up_num_stages=u[6]))
        (sid, be, nb, cc), = moe.moe_plan(c.ids[li], E + 1, cfg)
        return moe.moe_up(c.x[li], layers[li][0], sid, be, nb, c.k, LIMIT, cc), sid, cfg

    best_up: dict[int, tuple[float, Up]] = {}
    a_ref = pick_rows(*up_run(up_of(cur), 0)[:2], c.M, cur)
    for u in [up_of(cur)] + up_variants(T):
        if time.time() > deadline:
            print("# budget reached: rest skipped", flush=True)
            break
        try:
            a, sid, cfg = up_run(u, 0)
            err = rel(pick_rows(a, sid, c.M, cfg), a_ref)
            us = timer(c.cycle(lambda li, u=u: up_run(u, li)))
        except Exception as ex:  # a tile that does not fit: say so, keep going
            print(f"T={T} up {u} FAILED {type(ex).__name__}: {str(ex)[:120]}", flush=True)
            continue
        report("up", T, u, us, b_up, err, err < 1e-2)
        if err < 1e-2 and us < best_up.get(u[1], (1e30,))[0]:
            best_up[u[1]] = (us, u)

    plans: dict[int, list] = {}  # PER_PICK -> per layer (sid, be, nb, a), from the current up tiles

    def plan(p: int) -> list:
        if p not in plans:
            u = (16, p, *up_of(cur)[2:])
            plans[p] = []
            for li in range(len(layers)):
                a, sid, cfg = up_run(u, li)
                (s2, be, nb, _), = moe.moe_plan(c.ids[li], E + 1, cfg)
                plans[p].append((s2, be, nb, a))
        return plans[p]

    def down_run(d: Down, li: int) -> torch.Tensor:
        p, fs, sk = d[:3]
        cfg = moe.resolve_config(c.M, E + 1, T, dict(BLOCK_M=16, PER_PICK=p, FUSE_SUM=fs, SPLIT_K=sk,
                                                     down_BLOCK_N=d[3], down_BLOCK_K=d[4], down_GROUP_M=d[5],
                                                     down_num_warps=d[6], down_num_stages=d[7]))
        sid, be, nb, a = plan(p)[li]
        tw = c.tw[li].view(-1)
        part = moe.moe_down(a, layers[li][1], sid, be, nb, tw, c.M, cfg, topk_ids=c.ids[li] if fs else None)
        n = sk if fs else c.k * sk
        return moe.moe_sum(part, T, n) if n > 1 and part.dtype == torch.float32 else part  # bf16: summed in-kernel

    best_down: dict[int, tuple[float, Down]] = {}
    for d in [down_of(cur)] + down_variants(T):
        if time.time() > deadline:
            print("# budget reached: rest skipped", flush=True)
            break
        try:
            err = rel(down_run(d, 0), ref)
            us = timer(c.cycle(lambda li, d=d: down_run(d, li)))
        except Exception as ex:
            print(f"T={T} down {d} FAILED {type(ex).__name__}: {str(ex)[:120]}", flush=True)
            continue
        report("down", T, d, us, b_down, err, err < 1e-2)  # includes moe_sum when the variant needs it
        if err < 1e-2 and us < best_down.get(d[0], (1e30,))[0]:
            best_down[d[0]] = (us, d)

    both = [(best_up[p][0] + best_down[p][0], p) for p in best_up if p in best_down]
    if not both:
        return None
    row = row_of(best_up[min(both)[1]][1], best_down[min(both)[1]][1])
    new = moe.decode_row_config(row)
    faster = True
    for tt in sorted({T, 1 if T == 1 else 2 if T <= 4 else 5}):
        ce = c if tt == T else Case(layers, tt, seed=tt)
        now = moe.resolve_config(ce.M, E + 1, tt)
        r = moe.fused_moe(ce.x[0], *layers[0], ce.ids[0], ce.tw[0], LIMIT, config=now)
        err = rel(moe.fused_moe(ce.x[0], *layers[0], ce.ids[0], ce.tw[0], LIMIT, config=new), r)
        nb_all = ce.hit * 3 * I * D * 2 + 2 * tt * D * 2
        ts = []
        for name, cfg in (("cur", now), ("pick", new)):
            us = timer(ce.cycle(lambda li, cfg=cfg, ce=ce: moe.fused_moe(
                ce.x[li], *layers[li], ce.ids[li], ce.tw[li], LIMIT, config=cfg)))
            report(f"e2e_{name}", tt, row if name == "pick" else up_of(now) + down_of(now), us, nb_all, err,
                   err < 1e-2)
            ts.append(us)
        faster &= err < 1e-2 and (ts[1] < 0.98 * ts[0] if tt == T else ts[1] <= 1.02 * ts[0])
    print(f"# T={T} combined row {row}: {'PICKED' if faster else 'not >= 2 % faster end to end'}", flush=True)
    return row if faster else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--layers", type=int, default=4, help="distinct layers' weights the timed graphs cycle over")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--budget", type=float, default=560.0, help="seconds; later variants are skipped past it")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "moe_decode.jsonl")
    ap.add_argument("--command", default="python3 bench/sweep_moe_decode.py " + " ".join(sys.argv[1:]))
    args = ap.parse_args()
    t0 = time.time()
    meta = run_meta(args.command)
    copy_gbps, _ = measure_ceilings(iters=10)
    print(f"ceiling: copy {copy_gbps:.0f} GB/s (read + write of 4 GiB)", flush=True)
    layers = []
    for _ in range(args.layers):
        w13 = torch.empty(E + 1, 2 * I, D, dtype=torch.bfloat16, device=DEV).normal_(0, 3 * D**-0.5)
        w2 = torch.empty(E + 1, D, I, dtype=torch.bfloat16, device=DEV).normal_(0, I**-0.5)
        layers.append((w13, w2))
    n_calls = 2 * args.layers
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def timer(fn: Callable[[], None]) -> float:
        return time_us(fn, iters=args.iters, flush=False, graph=True, warmup=1) / n_calls

    def report(stage: str, T: int, v: tuple, us: float, nbytes: float, err: float, ok: bool) -> None:
        gb = nbytes / us / 1e3
        print(f"T={T:<3} {stage:<5} {','.join(map(str, v)):<34} {us:8.1f} us {gb:6.0f} GB/s "
              f"{gb / copy_gbps:.3f} of copy  err={err:.1e}{'' if ok else ' MISMATCH'}", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(dict(meta, case=f"moe_decode_T{T}_{stage}", variant=list(v), time_us=round(us, 2),
                                    gbps=round(gb, 1), frac=round(gb / copy_gbps, 4), copy_gbps=round(copy_gbps),
                                    match=ok, rel_err=err)) + "\n")

    picks: dict[int, moe.DecodeRow] = {}
    for T in (int(t) for t in args.tokens.split(",")):
        assert moe.DECODE_BUCKETS[-1] >= T, f"T={T}: decode buckets end at {moe.DECODE_BUCKETS[-1]}"
        row = sweep_t(T, layers, timer, report, t0 + args.budget)
        if row is not None:
            picks[min(b for b in moe.DECODE_BUCKETS if b >= T)] = row
    print("PICK " + " ".join(f"DS4F_MOE_DECODE_T{b}=" + ",".join(map(str, r)) for b, r in picks.items()), flush=True)
    print("# DECODE_TABLE = {" + ", ".join(f"{b}: {picks.get(b)}" for b in moe.DECODE_BUCKETS) + "}", flush=True)
    print(f"# done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
