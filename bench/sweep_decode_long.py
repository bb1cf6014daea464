"""⑥ one decode token at 1M context, the three calls whose cost grows with depth, over tile choices: indexer
scores over 262,144 CSA entries (e4m3 q and keys), sparse attention over an HCA layer's 8,192 entries + 128 window
rows (32 heads: one TP=2 rank; also timed with --short-live keys, default 192), radix top-512
of 262,144 scores. Each variant is checked against the default's result; L2 flushed before each run (a decode step
streams ~1 GB of weights between two such calls). Prints one line per variant, appends JSON records, and ends with
`PICK DS4F_INDEXER_DECODE=.. DS4F_ATTN_DECODE=.. num_splits=.. DS4F_TOPK_DECODE=..` (a knob is left out when no
variant was >= 5 % faster and matching; attention must also not be slower by > 2 % at the short live count;
num_splits is the split count asked of sparse_attn, which DS4F_ATTN_MAX_SPLITS and sparse_attn.SPLIT_PROGRAMS cap).
--parts picks the calls."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import run_meta, sweep, time_us  # noqa: E402
from ds4f.kernels.fp8 import quantize_kv_rows, quantize_rows  # noqa: E402
from ds4f.kernels.indexer import indexer_scores, quant_heads_fp8, topk_indices  # noqa: E402
from ds4f.kernels.sparse_attn import sparse_attn  # noqa: E402

sa = importlib.import_module("ds4f.kernels.sparse_attn")  # the module (the package re-exports the function)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/decode_long.jsonl"))
    ap.add_argument("--command", default=" ".join(sys.argv))
    # the second attention timing's live keys: 192 = depth 64 under the full-length graphs; with the 32768-token
    # context class (the default) those graphs serve contexts past 32768, >= 384 HCA rows
    ap.add_argument("--short-live", type=int, default=192)
    ap.add_argument("--parts", default="indexer,attn,topk", help="comma list of indexer, attn, topk")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    meta = run_meta(args.command)
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"

    def rec(case: str) -> Callable[[tuple, float, float, bool, float], None]:
        def write(v: tuple, us: float, us2: float, ok: bool, err: float) -> None:
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(meta, case=f"decode_1m_{case}", variant=list(v), time_us=round(us, 2),
                                        time_us_192_live=round(us2, 2) or None, match=ok)) + "\n")
        return write

    # indexer: one token over 262,144 entries
    L, HI, DI = 262144, 64, 128
    q8, qs = quant_heads_fp8(torch.randn(1, HI, DI, device=dev, generator=g).bfloat16())
    w = torch.randn(1, HI, device=dev, generator=g) * qs
    k8, ks = quantize_rows(torch.randn(L, DI, device=dev, generator=g).bfloat16(), DI)
    ks = ks.view(-1).contiguous()
    slots = torch.randperm(L, device=dev, generator=g).int()[None]
    seq = torch.zeros(1, dtype=torch.int32, device=dev)
    vl = torch.full((1,), L, dtype=torch.int32, device=dev)

    def run_ix(bl: int, ni: int, nw: int, ns: int) -> torch.Tensor:
        return indexer_scores(q8, w, k8, slots, seq, vl, k_scale=ks, block_l=bl, n_inner=ni or None, num_warps=nw,
                              num_stages=ns, token_block=1, zero_rank=True)

    ix = None if "indexer" not in parts else sweep("indexer", [
        (64, 0, 4, 4), (128, 0, 4, 3), (128, 4, 4, 3), (128, 2, 4, 3), (256, 2, 8, 3), (256, 1, 8, 3),
        (64, 4, 4, 4), (128, 8, 4, 3), (256, 4, 8, 2), (128, 1, 4, 3),
        # session 18: deeper pipelines and more / fewer key blocks per program around the default (128, 4, 4, 3)
        (128, 4, 4, 2), (128, 4, 4, 4), (128, 2, 4, 4), (128, 8, 4, 4), (128, 4, 8, 3), (128, 8, 8, 4),
        (64, 8, 4, 3), (64, 8, 4, 4), (64, 16, 4, 4), (32, 16, 4, 4), (256, 2, 8, 4),
        (64, 8, 2, 4)],  # 2 warps: mismatched on an H200 (session 18); DS4F_INDEXER_DECODE refuses it
        run_ix, lambda a, b: (bool(torch.equal(a, b)), 0.0), rec("indexer"))

    # HCA attention: 8192 entries + 128 window rows, 32 heads
    H, D, K = 32, 512, 8320
    nope, exp, rope = quantize_kv_rows(torch.randn(16384, D, device=dev, generator=g), 64)
    idx = torch.randperm(16384, device=dev, generator=g)[:K].int()[None].contiguous()
    qa = torch.randn(1, H, D, device=dev, generator=g).bfloat16()
    sink = torch.randn(H, device=dev, generator=g)
    full, short = (torch.full((1,), n, dtype=torch.int32, device=dev) for n in (K, args.short_live))
    idx_short = idx.clone()
    idx_short[:, args.short_live:] = -1

    def run_at(bh: int, bk: int, nw: int, ns: int, sp: int, cu: int = 0, rs: int = 0, live: torch.Tensor = full,
               ids: torch.Tensor = idx) -> torch.Tensor:
        # cu: _attn_combine's splits per round (sparse_attn.COMBINE_UNROLL; 0 = all at once, the default); rs:
        # sparse_attn.ROPE_SPLIT (DS4F_ATTN_ROPE_SPLIT)
        kw = {} if not bh else dict(block_h=bh, block_k=bk, num_warps=nw, num_stages=ns)
        prev = sa.COMBINE_UNROLL, sa.ROPE_SPLIT
        sa.COMBINE_UNROLL, sa.ROPE_SPLIT = cu, bool(rs)
        try:
            return sparse_attn(qa, nope, ids, sink, D**-0.5, exp, kv_rope=rope, live=live, num_splits=sp or None,
                               **kw)
        finally:
            sa.COMBINE_UNROLL, sa.ROPE_SPLIT = prev

    def short_us(v: tuple) -> float:
        return time_us(lambda: run_at(*v, live=short, ids=idx_short), iters=30)  # type: ignore[misc]

    def close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        return err < 1e-2, err

    # (block_h, block_k, warps, stages, splits asked, combine unroll, ROPE_SPLIT); the first: the defaults (since
    # session 15: 16, 64, 8, 1, 65 splits of 128 keys over 2 head blocks); splits asked n give ceil(ceil(8320 / n) /
    # block_k) * block_k keys each. With ROPE_SPLIT the 64- and 128-key tiles pipeline (2-3 stages fit)
    at = None if "attn" not in parts else sweep("attn", [
        (0, 0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 1), (16, 64, 8, 2, 128, 0, 1), (16, 64, 8, 3, 128, 0, 1),
        (16, 64, 4, 2, 128, 0, 1), (16, 128, 8, 2, 65, 0, 1), (16, 64, 8, 2, 65, 0, 1), (16, 32, 8, 2, 128, 0, 1),
        (16, 32, 4, 3, 128, 0, 1), (16, 32, 8, 3, 260, 0, 1), (32, 64, 8, 2, 128, 0, 1), (32, 128, 8, 2, 65, 0, 1),
        (16, 64, 8, 2, 256, 0, 1)],
        run_at, close, rec("attn"), extra=short_us)

    # radix top-512 of 262,144 scores
    sc = torch.randn(1, L, device=dev, generator=g)

    def run_tk(block: int, progs: int) -> torch.Tensor:
        return topk_indices(sc, 512, valid_len=vl, block=block, programs=progs or None)

    def same_set(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
        return bool(torch.equal(a.sort(1).values, b.sort(1).values)), 0.0

    tk = None if "topk" not in parts else sweep("topk", [
        (2048, 0), (1024, 0), (2048, 128), (4096, 64), (1024, 128), (2048, 64), (512, 264), (4096, 32), (8192, 32),
        (512, 0), (256, 0), (512, 132), (512, 528), (256, 528)],  # the first: DS4F_TOPK_DECODE's default
        run_tk, same_set, rec("topk"))

    picks = []
    if ix:
        picks.append("DS4F_INDEXER_DECODE=" + ",".join(map(str, ix)))
    if at:
        if at[0]:
            picks.append("DS4F_ATTN_DECODE=" + ",".join(map(str, at[:4])))
        if at[4]:
            picks.append(f"num_splits={at[4]}")
        if len(at) > 6 and at[6]:
            picks.append("DS4F_ATTN_ROPE_SPLIT=1")
        picks.append(f"DS4F_ATTN_COMBINE_UNROLL={at[5]}")
    if tk:
        picks.append("DS4F_TOPK_DECODE=" + ",".join(map(str, (tk[0], tk[1]))))
    print("PICK " + " ".join(picks), flush=True)


if __name__ == "__main__":
    main()
