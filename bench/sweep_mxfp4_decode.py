"""⑥ kernels, MXFP4 MoE decode sweep: the routed experts of one V4-Flash layer at a TP shard (D=4096, I=2048/tp,
256 experts, top-6) at T=1 and T=4 in; µs, GB/s of the packed bytes touched (fraction of the copy ceiling measured in
the same run) and the relative error against the per-expert dequant reference, per config, out (stdout + --out).

    PYTHONPATH=$PWD python3 bench/sweep_mxfp4_decode.py --tp 2 --out bench/results/moe_mxfp4.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_moe_mxfp4 import packed_experts  # noqa: E402

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels.moe_mxfp4 import default_config, fused_moe_mxfp4, fused_moe_mxfp4_ref, mxfp4_moe_bytes  # noqa: E402

E, D, K, LIMIT = 256, 4096, 6, 10.0


def configs() -> list[dict[str, int]]:
    out = [dict(default_config(0.1))]
    for bn, bk, nw in itertools.product((8, 16, 32, 64), (128, 256, 512), (2, 4, 8)):
        out.append(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=3, GEMV=1, PER_PICK=1))
    for bn, bk in ((16, 256), (32, 128), (64, 128), (64, 256)):
        out.append(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=3, SPLIT=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/moe_mxfp4.jsonl"))
    args = ap.parse_args()
    inter = 2048 // args.tp
    copy_gbps, _ = measure_ceilings(iters=10)
    meta = run_meta("python3 bench/sweep_mxfp4_decode.py " + " ".join(sys.argv[1:]))
    g = torch.Generator(device="cuda").manual_seed(0)
    w13q, w13s, w2q, w2s = packed_experts(E, D, inter, g)
    rows = []
    for T in (1, 4):
        x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
        ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices.int()
        wts = torch.softmax(torch.randn(T, K, device="cuda", generator=g), 1)
        ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, LIMIT).double()
        nbytes = mxfp4_moe_bytes(ids, D, inter)
        for cfg in configs():
            try:
                out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, LIMIT, config=dict(cfg)).double()
                err = ((out - ref).norm() / ref.norm()).item()
                t = time_us(lambda x=x, ids=ids, wts=wts, cfg=cfg: fused_moe_mxfp4(
                    x, w13q, w13s, w2q, w2s, ids, wts, LIMIT, config=dict(cfg)), iters=30)
            except Exception as ex:
                print(f"# T={T} {cfg} FAILED {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                continue
            gbps = nbytes / t / 1e3
            rec = dict(case="mxfp4_decode_sweep", T=T, tp=args.tp, I=inter, config=cfg, time_us=round(t, 2),
                       gbps=round(gbps, 1), frac_copy=round(gbps / copy_gbps, 3), rel_err=round(err, 5),
                       copy_gbps=round(copy_gbps, 1), **meta)
            rows.append(rec)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    for T in (1, 4):
        best = sorted((r for r in rows if r["T"] == T and r["rel_err"] < 1e-2), key=lambda r: r["time_us"])[:6]
        for r in best:
            print(f"T={T} {r['time_us']:8.1f} us {r['frac_copy']:.2f} copy err={r['rel_err']:.1e} {r['config']}")
        dflt = [r for r in rows if r["T"] == T and r["config"] == default_config(0.1)]
        if dflt:
            print(f"T={T} default {dflt[0]['time_us']:.1f} us {dflt[0]['frac_copy']:.2f} copy")


if __name__ == "__main__":
    main()
