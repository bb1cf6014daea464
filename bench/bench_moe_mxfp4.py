"""⑥ kernels, MXFP4 MoE benchmark: V4-Flash routed experts (D=4096, I=2048, 256 experts, top-6, random routing) in,
one line per (variant, config, M) with µs, effective GB/s of the packed expert bytes touched and TFLOP/s as
fractions of a copy / bf16-matmul ceiling measured in the same run, plus JSON records appended to --out.

    PYTHONPATH=$PWD python3 bench/bench_moe_mxfp4.py --out bench/results/moe_mxfp4.jsonl [--budget 110]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels.moe_mxfp4 import (  # noqa: E402
    default_config,
    fused_moe_mxfp4,
    fused_moe_mxfp4_ref,
    mxfp4_moe_bytes,
)

E, D, I, K = 256, 4096, 2048, 6
LIMIT = 10.0
VARIANTS = [dict(ASM=1, SPLIT=0), dict(ASM=1, SPLIT=1), dict(ASM=0, SPLIT=0), dict(ASM=0, SPLIT=1)]
GEMV_VARIANTS = [dict(ASM=1, GEMV=1, PER_PICK=1), dict(ASM=0, GEMV=1, PER_PICK=1)]  # decode only
DECODE_CFGS = [
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=512, num_warps=4, num_stages=2),
]
PREFILL_CFGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3),
]

def packed_experts(e: int, d: int, inter: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random MXFP4 experts on CUDA in fused_moe_mxfp4's layouts: (w13_q, w13_s, w2_q, w2_s), scales near 2^-7."""
    def rnd(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, dtype=torch.uint8, device="cuda", generator=g)

    return (rnd(0, 256, e, 2 * inter, d // 2), rnd(119, 122, e, 2 * inter, d // 32), rnd(0, 256, e, d, inter // 2),
            rnd(119, 122, e, d, inter // 32))


class Recorder:
    def __init__(self, out: Path, command: str):
        self.out = out
        self.meta = run_meta(command)
        self.copy_gbps = self.mm_tflops = 0.0

    def ceilings(self) -> None:
        self.copy_gbps, self.mm_tflops = measure_ceilings(iters=10)
        self.emit("ceiling_copy", "4GiB d2d, read+write", 0.0, gbps=self.copy_gbps)
        self.emit("ceiling_mm_bf16", "8192^3", 0.0, tflops=self.mm_tflops)

    def emit(self, case: str, shape: str, t_us: float, gbps: float | None = None, tflops: float | None = None,
             **extra: object) -> None:
        rec: dict[str, object] = dict(case=case, shape=shape, time_us=round(t_us, 2))
        parts = [f"{case:<18} {shape:<58} {t_us:>9.1f} us"]
        if gbps is not None:
            f = gbps / self.copy_gbps if self.copy_gbps else 0.0
            rec.update(gbps=round(gbps, 1), copy_gbps=round(self.copy_gbps, 1), frac_copy=round(f, 3))
            parts.append(f"{gbps:>7.0f} GB/s ({f:4.2f} copy)")
        if tflops is not None:
            f = tflops / self.mm_tflops if self.mm_tflops else 0.0
            rec.update(tflops=round(tflops, 1), mm_tflops=round(self.mm_tflops, 1), frac_mm=round(f, 3))
            parts.append(f"{tflops:>6.1f} TFLOP/s ({f:4.2f} mm)")
        rec.update(extra)
        rec.update(self.meta)
        print("  ".join(parts), flush=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _name(cfg: dict[str, int]) -> str:
    short = dict(BLOCK_M="bm", BLOCK_N="bn", BLOCK_K="bk", num_warps="nw", num_stages="ns", ASM="asm", SPLIT="split")
    return " ".join(f"{short.get(k, k)}={v}" for k, v in cfg.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/moe_mxfp4.jsonl"))
    ap.add_argument("--budget", type=float, default=110.0, help="seconds; later sweeps are skipped past it")
    ap.add_argument("--bf16", action="store_true", help="also time ds4f.kernels.moe.fused_moe on bf16 experts")
    args = ap.parse_args()
    t0 = time.time()

    def left() -> float:
        return args.budget - (time.time() - t0)

    r = Recorder(Path(args.out), "python3 bench/bench_moe_mxfp4.py " + " ".join(sys.argv[1:]))
    r.ceilings()
    g = torch.Generator(device="cuda").manual_seed(0)
    w13q, w13s, w2q, w2s = packed_experts(E, D, I, g)
    cases = {}
    for T in (1, 4, 16, 8192):
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices.int()
        wts = torch.softmax(torch.randn(T, K, device="cuda", generator=g), 1)
        cases[T] = (x, ids, wts)

    def call(T: int, cfg: dict[str, int]) -> torch.Tensor:
        x, ids, wts = cases[T]
        return fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, LIMIT, config=cfg)

    def check(T: int, cfg: dict[str, int]) -> float:
        x, ids, wts = cases[T]
        ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, LIMIT).double()
        out = call(T, cfg).double()
        return ((out - ref).norm() / ref.norm()).item()

    def timed(case: str, T: int, cfg: dict[str, int]) -> float | None:
        try:
            t = time_us(lambda: call(T, cfg), iters=10 if T > 64 else 30)
        except Exception as ex:  # a variant that does not compile here: say so and go on
            print(f"# {case} T={T} {_name(cfg)} FAILED: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
            return None
        _, ids, _ = cases[T]
        r.emit(case, f"T={T} {_name(cfg)}", t, gbps=mxfp4_moe_bytes(ids, D, I) / t / 1e3,
               tflops=2.0 * T * K * 3 * I * D / t / 1e6, T=T, config=cfg)
        return t

    # 1) nibble-decode variants at the default tiles: decode (per-pick and sorted) and prefill
    best: dict[str, tuple[float, dict[str, int]]] = {}
    for regime, Ts in (("decode", (4, 16)), ("prefill", (8192,))):
        for v in VARIANTS + (GEMV_VARIANTS if regime == "decode" else []):
            if left() < 0:
                break
            ts = [timed("variant", T, {**default_config(T * K / E), **v}) for T in Ts]
            if all(t is not None for t in ts):
                tot = sum(ts)  # type: ignore[arg-type]
                if regime not in best or tot < best[regime][0]:
                    best[regime] = (tot, v)
    print(f"# best variants: { {k: v[1] for k, v in best.items()} }", flush=True)
    # 2) correctness of the best variants on the full V4 shapes against the per-expert dequant reference
    for regime, T in (("decode", 4), ("decode", 16), ("prefill", 8192)):
        if regime in best and left() > 0:
            cfg = {**default_config(T * K / E), **best[regime][1]}
            try:
                r.emit("check", f"T={T} {_name(cfg)}", 0.0, rel_err=check(T, cfg))
            except Exception as ex:
                print(f"# check T={T} FAILED: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
    # 3) tile sweeps with the best variant
    tuned: dict[str, tuple[float, dict[str, int]]] = {}
    for regime, Ts, cfgs in (("decode", (4, 16), DECODE_CFGS), ("prefill", (8192,), PREFILL_CFGS)):
        if regime not in best:
            continue
        for c in cfgs:
            if left() < 0:
                break
            cfg = {**c, **best[regime][1]}
            ts = [timed("tile", T, cfg) for T in Ts]
            if all(t is not None for t in ts):
                tot = sum(ts)  # type: ignore[arg-type]
                if regime not in tuned or tot < tuned[regime][0]:
                    tuned[regime] = (tot, cfg)
    print(f"# best tiles: { {k: v[1] for k, v in tuned.items()} }", flush=True)
    # 4) the final table at the best tiles
    for T in (1, 4, 16, 8192):
        regime = "prefill" if T * K / E > 16 else "decode"
        if regime in tuned and left() > -15:
            cfg = tuned[regime][1]
            timed("final", T, cfg)
            try:
                r.emit("check_final", f"T={T} {_name(cfg)}", 0.0, rel_err=check(T, cfg))
            except Exception as ex:
                print(f"# check_final T={T} FAILED: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
    if args.bf16 and left() > 0:
        bench_bf16(r, cases)


def bench_bf16(r: Recorder, cases: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """The bf16 grouped kernel on bf16 experts of the same shapes (4x the weight bytes), for comparison."""
    from ds4f.kernels.moe import fused_moe

    w13 = torch.empty(E, 2 * I, D, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    w2 = torch.empty(E, D, I, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
    for T, (x, ids, wts) in cases.items():
        t = time_us(lambda x=x, ids=ids, wts=wts: fused_moe(x, w13, w2, ids, wts, LIMIT), iters=10 if T > 64 else 30)
        hit = int(ids.unique().numel())
        r.emit("bf16_fused_moe", f"T={T}", t, gbps=(hit * 3 * I * D * 2 + T * D * 4) / t / 1e3,
               tflops=2.0 * T * K * 3 * I * D / t / 1e6, T=T)


if __name__ == "__main__":
    main()
