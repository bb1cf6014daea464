"""⑥ sparse attention at a long prompt's prefill chunk: the CSA layer's call (8192 tokens, each 128 window + 512
selected rows of a ~262K-row fp8 pool) over tile choices; each variant's output checked against the default's.
Prints one line per variant, appends JSON records, ends with `PICK DS4F_ATTN_PREFILL=<block_k,num_warps,stages>`
(or `=default`: none was >= 5 % faster and matching).

Shapes: H=32 (one TP=2 rank of V4-Flash's 64 heads) and H=64 (one GPU), D=512 (448 e4m3 + 64 bf16 rope columns)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, sweep, time_us  # noqa: E402
from ds4f.kernels.fp8 import quantize_kv_rows  # noqa: E402
from ds4f.kernels.sparse_attn import attn_flops, sparse_attn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--heads", default="32,64")
    ap.add_argument("--out", default=str(ROOT / "bench/results/attn_prefill.jsonl"))
    ap.add_argument("--command", default=" ".join(sys.argv))
    args = ap.parse_args()
    meta = run_meta(args.command)
    copy_gbps, mm_tflops = measure_ceilings(iters=5)
    T, N, D, K = args.tokens, args.rows, 512, 640
    g = torch.Generator(device="cuda").manual_seed(0)
    nope, exp, rope = quantize_kv_rows(torch.randn(N, D, device="cuda", generator=g), 64)
    win = (torch.arange(T, device="cuda")[:, None] + torch.arange(128, device="cuda")[None, :]) % N
    sel = torch.randint(0, N, (T, K - 128), device="cuda", generator=g)
    idx = torch.cat([sel, win], 1).int().contiguous()
    picks = []
    for H in (int(h) for h in args.heads.split(",")):
        q = torch.randn(T, H, D, device="cuda", generator=g).bfloat16()
        sink = torch.randn(H, device="cuda", generator=g)

        def run(bk: int, nw: int, ns: int, q: torch.Tensor = q, sink: torch.Tensor = sink) -> torch.Tensor:
            kw = dict(block_k=bk, num_warps=nw, num_stages=ns) if bk else {}  # (0, 0, 0): the built-in choice
            return sparse_attn(q, nope, idx, sink, D**-0.5, exp, kv_rope=rope, **kw)

        def compare(out: torch.Tensor, base: torch.Tensor) -> tuple[bool, float]:
            err = ((out.float() - base.float()).norm() / base.float().norm()).item()
            return err < 1e-2, err

        default_us: list[float] = []  # the baseline's time (recorded first)

        def record(v: tuple, us: float, _: float, ok: bool, err: float, H: int = H,
                   default_us: list[float] = default_us) -> None:
            if not default_us:
                default_us.append(us)
            tf = attn_flops(T, H, D, K) / us / 1e6
            rec = dict(meta, case="attn_prefill_chunk", tokens=T, heads=H, rows=N, keys=K, block_k=v[0],
                       num_warps=v[1], num_stages=v[2], time_ms=round(us / 1e3, 3),
                       default_ms=round(default_us[0] / 1e3, 3), tflops=round(tf, 1),
                       frac_bf16_mm=round(tf / mm_tflops, 3), rel_err_vs_default=err, match=ok,
                       copy_gbps=round(copy_gbps), bf16_mm_tflops=round(mm_tflops))
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

        # (block_k, num_warps, num_stages); the first is the built-in choice (the baseline)
        pick = sweep(f"H={H}", [(0, 0, 0), (32, 4, 2), (16, 4, 1), (32, 4, 1), (64, 4, 1), (32, 8, 1), (64, 8, 1),
                                (64, 8, 2), (16, 8, 1)], run, compare, record,
                     label=lambda v: "default" if not v[0] else f"bk={v[0]} nw={v[1]} ns={v[2]}",
                     timer=lambda fn: time_us(fn, iters=5, flush=False, graph=False))
        best = "default" if pick is None else ",".join(map(str, pick))
        picks.append(f"H{H}:{best}")
    print(f"PICK DS4F_ATTN_PREFILL={' '.join(picks)}", flush=True)


if __name__ == "__main__":
    main()
