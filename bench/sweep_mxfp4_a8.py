"""⑥ kernels, MXFP4 MoE decode with FP8 activations (moe_mxfp4_a8) against the bf16-activation decode kernels: the
routed experts of one V4-Flash layer (D=4096, 256 experts, top-6) at the TP=2 / TP=1 per-rank widths, T = 1 and 4
tokens; per variant the µs per call, the fraction of a copy ceiling measured in the same run, and its error against
its own oracle (a8: fused_moe_mxfp4_a8_ref; bf16: fused_moe_mxfp4_ref) and against the bf16 oracle.

Timed as bench/sweep_mxfp4_decode.py does (a CUDA graph of CALLS calls with distinct random picks, ~1.2 GB of
experts at TP=2, so the L2 never holds a pick's bytes). Ends with `PICK_A8 TP= T= DS4F_MXFP4_DEC=...` per case.

--xb 0,1: every a8 tile without and with the up kernel's B operands built once per call (_a8_expand,
DS4F_MXFP4_A8_XB) instead of per program; --tiles N: only the first N of TILES (after the table's). --ppp 1,2,3,6:
instead, the table's up tile (XB) with each down tile of DOWN_TILES at each number of picks per down program
(DS4F_MXFP4_A8_DOWN_PICKS). --half: instead, each up tile of HALF_TILES (the table's first) with the table's down
tile, XB on, the two-half up program against one half per program (DS4F_MXFP4_A8_HALF; `PICK_HALF` lines).
--cc: instead, the CUDA-core form (moe_mxfp4_cc) at CC_TILES against the a8 kernels
at their table tiles (`PICK_CC TP= T=` lines; its error against the bf16 oracle).

    PYTHONPATH=$PWD python3 bench/sweep_mxfp4_a8.py [--tp 2] [--tokens 1,4] [--xb 0,1] [--out FILE.jsonl]
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
from bench.sweep_mxfp4_decode import CALLS, LIMIT, D, case_inputs, rank_experts  # noqa: E402
from ds4f.kernels import moe_mxfp4_a8 as a8  # noqa: E402
from ds4f.kernels import moe_mxfp4_cc as mcc  # noqa: E402
from ds4f.kernels import moe_mxfp4_decode as md  # noqa: E402
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4, fused_moe_mxfp4_ref  # noqa: E402
from ds4f.kernels.moe_mxfp4_a8 import fused_moe_mxfp4_a8_ref  # noqa: E402

# (up, down) tiles (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages); BLOCK_K in {128, 256, 512}
TILES = [((64, 256, 4, 4, 4), (64, 256, 4, 4, 4)), ((64, 512, 4, 4, 2), (64, 512, 1, 4, 3)),
         ((64, 512, 1, 4, 3), (64, 512, 1, 4, 3)), ((64, 256, 2, 4, 3), (64, 512, 1, 4, 3)),
         ((64, 256, 4, 4, 3), (64, 512, 1, 4, 3)), ((64, 256, 1, 4, 4), (64, 256, 1, 4, 4)),
         ((64, 256, 2, 4, 4), (64, 256, 2, 4, 4)), ((64, 512, 2, 4, 3), (64, 512, 1, 4, 3)),
         ((64, 512, 4, 4, 3), (64, 512, 2, 4, 3)), ((128, 256, 2, 8, 4), (128, 256, 1, 8, 4)),
         ((128, 256, 4, 8, 4), (64, 256, 2, 4, 4)), ((32, 256, 4, 4, 4), (32, 256, 2, 4, 4)),
         ((64, 128, 8, 4, 6), (64, 128, 4, 4, 6)), ((128, 512, 2, 8, 3), (128, 512, 1, 8, 3))]

HALF_TILES = [(64, 256, 4, 4, 3), (64, 256, 2, 4, 4), (64, 256, 4, 4, 4), (64, 256, 1, 4, 4), (64, 512, 2, 4, 3),
              (128, 256, 2, 8, 3), (64, 128, 8, 4, 6)]
DOWN_TILES = [(64, 512, 1, 4, 4), (32, 512, 1, 4, 3), (128, 512, 1, 8, 3)]  # --ppp: beside the table's
XB_DEFAULT = a8.XB  # report() sets a8.XB per variant
# --cc: the CUDA-core form's (up, down) tiles (BLOCK_N, 256, SPLIT, num_warps, DEPTH), the table's first; offline
# sm_90 builds: no spills (64-row up tiles need 8 warps), 9.6-10.7 loop instructions per weight byte
CC_TILES = [((32, 256, 8, 4, 2), (32, 256, 2, 4, 2)), ((32, 256, 4, 4, 2), (32, 256, 1, 4, 2)),
            ((16, 256, 4, 4, 2), (16, 256, 2, 4, 2)), ((64, 256, 4, 8, 2), (64, 256, 1, 4, 2)),
            ((32, 256, 2, 4, 2), (32, 256, 4, 4, 1)), ((32, 256, 4, 4, 1), (32, 256, 2, 4, 1)),
            ((64, 256, 8, 8, 2), (64, 256, 2, 8, 2)), ((16, 256, 8, 2, 2), (16, 256, 4, 2, 1)),
            ((32, 256, 16, 4, 1), (32, 256, 4, 4, 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", default="2")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--out", default="", help="append JSON records (case mxfp4_a8_sweep) to this file")
    ap.add_argument("--xb", default="0")
    ap.add_argument("--tiles", type=int, default=len(TILES))
    ap.add_argument("--ppp", default="")
    ap.add_argument("--half", action="store_true", help="one weight half per up program (DS4F_MXFP4_A8_HALF)")
    ap.add_argument("--cc", action="store_true", help="the CUDA-core form (moe_mxfp4_cc) at CC_TILES vs the a8 table")
    args = ap.parse_args()
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/sweep_mxfp4_a8.py " + " ".join(sys.argv[1:]))
    print(f"device {meta['gpu']} copy ceiling {copy_gbps:.0f} GB/s, {CALLS} calls per graph", flush=True)
    picks = []
    for tp in (int(v) for v in args.tp.split(",")):
        inter, w, per_expert = rank_experts(tp)
        for T in (int(v) for v in args.tokens.split(",")):
            picks.append(sweep_case(tp, inter, T, w, per_expert, copy_gbps, meta, args.out,
                                    [int(v) for v in args.xb.split(",")], TILES[:args.tiles],
                                    [int(v) for v in args.ppp.split(",") if v], args.cc, args.half))
        del w
        torch.cuda.empty_cache()
    print("\n".join(picks), flush=True)


def sweep_case(tp: int, inter: int, T: int, w: tuple[torch.Tensor, ...], per_expert: int, copy_gbps: float,
               meta: dict, out_path: str, xbs: list[int], tiles: list, ppps: list[int], cc: bool = False,
               half: bool = False) -> str:
    xs, ids, wts, nbytes = case_inputs(tp, T, per_expert)
    ref16 = fused_moe_mxfp4_ref(xs[0], *w, ids[0], wts[0], LIMIT).double()
    ref8 = fused_moe_mxfp4_a8_ref(xs[0], *w, ids[0], wts[0], LIMIT).double()
    # the CUDA-core form against its own roundings (bf16 products: ~5e-3 from the bf16 oracle at these widths)
    refcc = mcc.cc_ref(xs[0], *w, ids[0], wts[0], LIMIT).double() if cc else ref16

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    def report(name: str, cfg: dict, xb: int = 0) -> float:
        a8.XB = bool(xb)
        name += " XB=1" if xb else ""
        try:
            out = fused_moe_mxfp4(xs[0], *w, ids[0], wts[0], LIMIT, config=cfg)
            us = time_graph(lambda i: fused_moe_mxfp4(xs[i], *w, ids[i], wts[i], LIMIT, config=cfg), CALLS, CALLS, 5)
        except Exception as ex:  # a tile the compiler or the device rejects
            print(f"  {name:52s} FAILED {type(ex).__name__}: {str(ex)[:120]}", flush=True)
            return float("inf")
        err = rel(out, ref8 if cfg.get("A8") else refcc if cfg.get("CC") else ref16)
        err16 = rel(out, ref16)
        frac = nbytes / us / 1e3 / copy_gbps
        ok = err < 5e-3
        print(f"  {name:52s} {us:8.2f} us {frac:5.2f} copy err={err:.1e} vs bf16 {err16:.1e}"
              f"{'' if ok else ' WRONG'}", flush=True)
        if out_path:
            rec = dict(case="mxfp4_a8_sweep", tp=tp, I=inter, T=T, variant=name, time_us=round(us, 2),
                       frac_copy=round(frac, 3), rel_err=err, rel_err_bf16_ref=err16, copy_gbps=round(copy_gbps, 1),
                       **meta)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return us if ok else float("inf")

    print(f"== TP={tp} I={inter} T={T}: {nbytes / 1e6:.1f} MB of distinct experts per call", flush=True)
    up0, dn0 = md.pick(D, inter, T)  # type: ignore[misc]
    base = report(f"bf16 table up={up0} down={dn0} SUB={int(md.sub_default(xs[0].device))}",
                  dict(DEC=(*up0, *dn0), A8=0))
    up0, dn0 = a8.pick(D, inter, T, (up0, dn0))
    if cc:  # the CUDA-core form against the a8 kernels at their table tiles (XB as the defaults)
        a8_us = report(f"a8 up={up0} down={dn0}", dict(DEC=(*up0, *dn0), A8=1), int(XB_DEFAULT))
        best_cc = min((report(f"cc up={u} down={d}", dict(DEC=(*u, *d), CC=1)), u, d) for u, d in CC_TILES
                      if mcc.fits((u, d), D, inter))
        return (f"PICK_CC TP={tp} T={T} up={best_cc[1]} down={best_cc[2]} ({best_cc[0]:.2f} us vs a8 table "
                f"{a8_us:.2f} us)")
    if half:  # one weight half per up program against two, XB on, the table's down tile
        res = {}
        for up in [up0] + [u for u in HALF_TILES if u != up0 and md.fits((u, dn0), D, inter)]:
            for h in (0, 1):
                a8.HALF = (md.bucket(T),) if h else ()
                res[(up, h)] = report(f"a8 up={up} down={dn0} HALF={h}", dict(DEC=(*up, *dn0), A8=1), 1)
        a8.HALF = ()
        up, h = min(res, key=lambda k: res[k])
        us = res[(up, h)]
        return (f"PICK_HALF TP={tp} T={T} up={up} HALF={h} ({us:.2f} us; table two-half {res[(up0, 0)]:.2f}, "
                f"table HALF {res[(up0, 1)]:.2f})")
    if ppps:  # picks per down program (DS4F_MXFP4_A8_DOWN_PICKS) with the table's up tile and XB
        best = (float("inf"), 1, dn0)
        for dn in [dn0] + [d for d in DOWN_TILES if d != dn0 and md.fits((up0, d), D, inter)]:
            for ppp in ppps:
                a8.DOWN_PICKS = {md.bucket(T): ppp}
                best = min(best, (report(f"a8 up={up0} down={dn} PPP={ppp}", dict(DEC=(*up0, *dn), A8=1), 1), ppp,
                                  dn))
            if dn == dn0:
                table = best
        a8.DOWN_PICKS = {}
        return (f"PICK_PPP TP={tp} T={T} table_down_ppp={T}:{table[1]} ({table[0]:.2f} us) best down={best[2]} "
                f"ppp={best[1]} ({best[0]:.2f} us)")
    best = min((report(f"a8 up={up0} down={dn0}", dict(DEC=(*up0, *dn0), A8=1), xb), xb, up0, dn0) for xb in xbs)
    for up, dn in tiles:
        if (up, dn) != (up0, dn0) and md.fits((up, dn), D, inter):
            for xb in xbs:
                best = min(best, (report(f"a8 up={up} down={dn}", dict(DEC=(*up, *dn), A8=1), xb), xb, up, dn))
    us, xb, up, dn = best
    a8.XB = False
    print(f"  best a8 {us:.2f} us vs bf16 table {base:.2f} us: x{base / us:.2f}", flush=True)
    return (f"PICK_A8 TP={tp} T={T} DS4F_MXFP4_A8_XB={xb} DS4F_MXFP4_DEC={','.join(str(v) for v in (*up, *dn))} "
            f"({us:.2f} us vs bf16 "
            f"{base:.2f} us)")


if __name__ == "__main__":
    main()
