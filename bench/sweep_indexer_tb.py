"""⑥ indexer scores at a long-prompt prefill chunk, one token per program (indexer_scores' kernel) against the
token-blocked kernel (ds4f/kernels/indexer_tb.py) over a few tile choices; each variant's scores checked against
the one-token kernel's. Prints one line per variant, appends JSON records, and ends with the line
`PICK DS4F_INDEXER_TB=<[k,]bt,block_l,num_warps,num_stages>` (or `=1`: no blocked variant was >= 5 % faster and
matching).

Default shape: the last 8K-token chunk of a 1M-token prompt on one TP=2 rank with the token-split indexer:
4096 tokens x 229,376 visible entries, 64 heads of 128, fp8 keys with row scales, e4m3 queries (DS4F_INDEX_FP8)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, sweep, time_us  # noqa: E402
from ds4f.kernels.fp8 import quantize_rows  # noqa: E402
from ds4f.kernels.indexer import indexer_flops, indexer_scores, quant_heads_fp8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--entries", type=int, default=229376)
    ap.add_argument("--bf16-q", action="store_true", help="bf16 queries instead of e4m3")
    ap.add_argument("--out", default=str(ROOT / "bench/results/indexer_tb.jsonl"))
    ap.add_argument("--command", default=" ".join(sys.argv))
    args = ap.parse_args()
    meta = run_meta(args.command)
    copy_gbps, mm_tflops = measure_ceilings(iters=5)
    T, L, HI, DI = args.tokens, args.entries, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, HI, DI, device="cuda", generator=g).bfloat16()
    w = torch.randn(T, HI, device="cuda", generator=g)
    k8, ks = quantize_rows(torch.randn(L, DI, device="cuda", generator=g).bfloat16(), DI)
    ks = ks.view(-1).contiguous()
    slots = torch.randperm(L, device="cuda", generator=g).int()[None]
    seq = torch.zeros(T, dtype=torch.int32, device="cuda")
    vl = (L - T // 4 + torch.arange(T, device="cuda") // 4).clamp(max=L).int()  # causal: ratio 4 within the chunk
    if not args.bf16_q:
        q, qs = quant_heads_fp8(q)
        w = w * qs
    flops = indexer_flops(T, HI, DI, L)

    def run(bt: int, bl: int, nw: int, ns: int, km: bool = False) -> torch.Tensor:
        return indexer_scores(q, w, k8, slots, seq, vl, k_scale=ks, token_block=bt, block_l=bl, num_warps=nw,
                              num_stages=ns, keys_major=km)

    # (token block, keys per tile, warps, stages, keys-major); the first (one token per program) is the baseline
    variants = [(1, 64, 4, 4, False), (2, 128, 4, 3, False), (32, 64, 4, 2, True), (32, 64, 4, 3, True),
                (32, 64, 4, 4, True), (64, 64, 4, 3, True), (128, 64, 4, 3, True), (32, 128, 4, 3, True),
                (64, 128, 8, 3, True), (16, 64, 4, 3, True)]

    def compare(out: torch.Tensor, base: torch.Tensor) -> tuple[bool, float]:
        fin = torch.isfinite(base)
        err = ((out[fin].double() - base[fin].double()).norm() / base[fin].double().norm()).item()
        return bool(torch.equal(torch.isfinite(out), fin)) and err < 1e-3, err

    def record(v: tuple, us: float, _: float, ok: bool, err: float) -> None:
        bt, bl, nw, ns, km = v
        tf = flops / us / 1e6
        rec = dict(meta, case="indexer_prefill_chunk", tokens=T, entries=L, q="bf16" if args.bf16_q else "e4m3",
                   token_block=bt, block_l=bl, num_warps=nw, num_stages=ns, keys_major=km, time_ms=round(us / 1e3, 3),
                   tflops=round(tf, 1), frac_bf16_mm=round(tf / mm_tflops, 3), rel_err_vs_one_token=err, match=ok,
                   copy_gbps=round(copy_gbps), bf16_mm_tflops=round(mm_tflops))
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    pick = sweep("variant", variants, run, compare, record, eligible=lambda v: v[0] > 1,
                 label=lambda v: f"bt={v[0]} block_l={v[1]} nw={v[2]} ns={v[3]} keys_major={v[4]}",
                 timer=lambda fn: time_us(fn, iters=5, flush=False, graph=False))
    best = "1" if pick is None else ("k," if pick[4] else "") + ",".join(map(str, pick[:4]))
    print(f"PICK DS4F_INDEXER_TB={best}", flush=True)


if __name__ == "__main__":
    main()
