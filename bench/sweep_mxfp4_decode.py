"""⑥ kernels, MXFP4 MoE decode sweep: the routed experts of one V4-Flash layer (D=4096, 256 experts, top-6) at the
TP=2 and TP=1 per-rank widths (I = 1024, 2048) and T = 1, 4 tokens in; per variant the µs per call and the fraction
of a copy ceiling measured in the same run, out (stdout, optional JSON records).

Variants: moe_mxfp4's CUDA-core GEMV (the old decode default), moe_mxfp4_decode's table entry, then its up tiles
(with the table's down tiles) and its down tiles (with the best up tiles): coordinate descent, every variant checked
against the per-expert dequant reference. Each variant is timed as a CUDA graph of CALLS calls, each with its own
random picks (~1.2 GB of distinct experts per graph at TP=2, so the 50 MB L2 never holds a pick's bytes), replayed.
Ends with `PICK ... DS4F_MXFP4_DEC=...` and `PICK ... DS4F_MXFP4_DEC_SUB=0|1` (the SUB decode at the best tiles) per
(I, T) and the CONFIGS lines to paste into ds4f/kernels/moe_mxfp4_decode.py.

    PYTHONPATH=$PWD python3 bench/sweep_mxfp4_decode.py [--tp 2,1] [--tokens 1,4] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_graph  # noqa: E402
from ds4f.kernels import moe_mxfp4_decode as md  # noqa: E402
from ds4f.kernels.moe_mxfp4 import GEMV_CONFIG, fused_moe_mxfp4, fused_moe_mxfp4_ref  # noqa: E402
from ds4f.model.quant import MXFP4_BLOCK  # noqa: E402

E, D, K, LIMIT, CALLS = 256, 4096, 6, 10.0, 32
# candidates (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages); 64x256 with 4 warps: ~156 registers (3 CTAs per SM)
UP = [(64, 256, 2, 4, 4), (64, 256, 4, 4, 4), (64, 256, 8, 4, 4), (64, 128, 8, 4, 4), (128, 256, 4, 8, 4),
      (128, 256, 8, 8, 3)]
DOWN = [(64, 256, 1, 4, 4), (64, 256, 2, 4, 4), (64, 256, 4, 4, 4), (64, 128, 4, 4, 5), (128, 256, 2, 8, 4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="2,1")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--out", default="", help="append JSON records (case mxfp4_dec_sweep) to this file")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/sweep_mxfp4_decode.py " + " ".join(sys.argv[1:]))
    print(f"device {meta['gpu']} copy ceiling {copy_gbps:.0f} GB/s, {CALLS} calls per graph", flush=True)
    picks, table = [], []
    for tp in (int(v) for v in args.tp.split(",")):
        inter, w, per_expert = rank_experts(tp)
        for T in (int(v) for v in args.tokens.split(",")):
            p, line = sweep_case(tp, inter, T, w, per_expert, copy_gbps, meta, args.out)
            picks.append(p)
            table.append(line)
        del w
        torch.cuda.empty_cache()
    print("\n".join(picks))
    print("CONFIGS lines for ds4f/kernels/moe_mxfp4_decode.py:\n" + "\n".join(table), flush=True)


def rank_experts(tp: int) -> tuple[int, tuple[torch.Tensor, ...], int]:
    """One layer's 256 packed experts at TP=tp's width (random bytes, UE8M0 scales 119..121) -> (I, (w13, w13
    scales, w2, w2 scales), bytes per expert)."""
    inter = 2048 // tp
    g = torch.Generator(device="cuda").manual_seed(tp)

    def rnd(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, dtype=torch.uint8, device="cuda", generator=g)

    w = (rnd(0, 256, E, 2 * inter, D // 2), rnd(119, 122, E, 2 * inter, D // 32), rnd(0, 256, E, D, inter // 2),
         rnd(119, 122, E, D, inter // 32))
    return inter, w, 3 * inter * D // 2 + 3 * inter * D // MXFP4_BLOCK


def case_inputs(tp: int, T: int, per_expert: int) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                           list[torch.Tensor], float]:
    """CALLS calls' x [T, D], top-K ids and weights, each with its own random picks -> (xs, ids, weights, distinct
    expert bytes per call)."""
    g = torch.Generator(device="cuda").manual_seed(100 * tp + T)
    xs = [torch.randn(T, D, device="cuda", generator=g).bfloat16() for _ in range(CALLS)]
    ids = [torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices.int() for _ in range(CALLS)]
    wts = [torch.softmax(torch.randn(T, K, device="cuda", generator=g), 1) for _ in range(CALLS)]
    return xs, ids, wts, sum(int(i.unique().numel()) for i in ids) / CALLS * per_expert


def sweep_case(tp: int, inter: int, T: int, w: tuple[torch.Tensor, ...], per_expert: int, copy_gbps: float,
               meta: dict, out_path: str) -> tuple[str, str]:
    """Old GEMV, the table entry and the coordinate descent over UP / DOWN at one (I, T) -> (PICK line, CONFIGS
    line)."""
    xs, ids, wts, nbytes = case_inputs(tp, T, per_expert)
    ref = fused_moe_mxfp4_ref(xs[0], *w, ids[0], wts[0], LIMIT).double()

    def run(cfg: dict | None) -> tuple[float, float]:
        out = fused_moe_mxfp4(xs[0], *w, ids[0], wts[0], LIMIT, config=cfg).double()
        err = ((out - ref).norm() / ref.norm()).item()
        return time_graph(lambda i: fused_moe_mxfp4(xs[i], *w, ids[i], wts[i], LIMIT, config=cfg), CALLS, CALLS, 5), err

    def report(name: str, cfg: dict | None) -> float:
        try:
            us, err = run(cfg)
        except Exception as ex:  # a tile the compiler or the device rejects
            print(f"  {name:44s} FAILED {type(ex).__name__}: {str(ex)[:120]}", flush=True)
            return float("inf")
        frac = nbytes / us / 1e3 / copy_gbps
        ok = err < 5e-3
        print(f"  {name:44s} {us:8.2f} us {frac:5.2f} copy err={err:.1e}{'' if ok else ' WRONG'}", flush=True)
        if out_path:
            rec = dict(case="mxfp4_dec_sweep", tp=tp, I=inter, T=T, variant=name, time_us=round(us, 2),
                       frac_copy=round(frac, 3), rel_err=err, copy_gbps=round(copy_gbps, 1), **meta)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return us if ok else float("inf")

    print(f"== TP={tp} I={inter} T={T}: {nbytes / 1e6:.1f} MB of distinct experts per call", flush=True)
    old = report("old: CUDA-core GEMV + moe_sum", dict(GEMV_CONFIG))
    up0, dn0 = md.CONFIGS.get((D, inter, md.bucket(T))) or md.generic_config(D, inter, T)  # type: ignore[misc]
    best = (report(f"table up={up0} down={dn0}", dict(DEC=(*up0, *dn0))), up0, dn0)
    for up in UP:
        if up != up0 and md.fits((up, dn0), D, inter):
            us = report(f"up={up}", dict(DEC=(*up, *dn0)))
            best = min(best, (us, up, dn0))
    up1 = best[1]
    for dn in DOWN:
        if dn != dn0 and md.fits((up1, dn), D, inter):  # (up1, dn0) ran above
            us = report(f"up={up1} down={dn}", dict(DEC=(*up1, *dn)))
            best = min(best, (us, up1, dn))
    us, up, dn = best
    print(f"  best {us:.2f} us ({nbytes / us / 1e3 / copy_gbps:.2f} copy) vs old {old:.2f} us: x{old / us:.2f}",
          flush=True)
    sub = report(f"up={up} down={dn} SUB", dict(DEC=(*up, *dn), SUB=1))  # inf when not exact
    sub_line = (f"PICK TP={tp} T={T} DS4F_MXFP4_DEC_SUB={int(sub < us)} (SUB decode {sub:.2f} us vs {us:.2f} us; "
                "moe_mxfp4_decode.sub_default: on for sm_90, where the GPU tests pass)")
    if old <= us:  # the old GEMV stays: a None table entry
        return (f"PICK TP={tp} T={T} DS4F_MXFP4_DEC=0 (old GEMV {old:.2f} us <= {us:.2f} us)\n{sub_line}",
                f"    ({D}, {inter}, {md.bucket(T)}): None,  # old GEMV {old:.1f} us vs {us:.1f}")
    env = ",".join(str(v) for v in (*up, *dn))
    return (f"PICK TP={tp} T={T} DS4F_MXFP4_DEC={env} ({us:.2f} us vs old GEMV {old:.2f} us)\n{sub_line}",
            f"    ({D}, {inter}, {md.bucket(T)}): ({up}, {dn}),  # {us:.1f} us vs {old:.1f} old")


if __name__ == "__main__":
    main()
