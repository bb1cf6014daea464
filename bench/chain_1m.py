"""⑥ a CSA layer's decode chain at 1M context as FastModel runs it for one token: the histogram buffer zeroed by
index_q's launch (DS4F_INDEXER_HIST), the keys-major indexer over 262,144 e4m3 keys counting the first radix digit,
then topk_pool_rows_long (the small kernel, the second digit pass, the gather launch with the fused pick writing
the attention rows).

Back to back: `calls` chains in one CUDA graph over `copies` separate key pools (no call finds its keys in L2, as
a decode step's 21 CSA layers), timed `rounds` times; rows checked equal across rounds. One JSON record with the
median and every round. Random keys: the full model's own after a 1M prompt can time otherwise (session 26's
gather variant: ~1 us faster here, ~5 us slower per CSA layer there), so kernel changes are judged in the model.

    PYTHONPATH=$PWD python3 bench/chain_1m.py [--rounds 3] [--out bench/results/decode_long.jsonl]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl, run_meta, time_graph  # noqa: E402
from ds4f.kernels.fp8 import quantize_rows  # noqa: E402
from ds4f.kernels.index_q import index_q  # noqa: E402
from ds4f.kernels.indexer import decode_hist_buffer, indexer_scores, topk_pool_rows_long  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=262144)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/decode_long.jsonl"))
    args = ap.parse_args()
    meta = run_meta(" ".join(["bench/chain_1m.py", *sys.argv[1:]]))
    L, HI, DI, K, epb, W, rd = args.entries, 64, 128, 512, 64, 128, 64
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    iq0 = torch.randn(1, HI, DI, device=dev, generator=g).bfloat16()
    w_in = torch.randn(1, HI, device=dev, generator=g).bfloat16()
    ang = torch.rand(1, rd // 2, device=dev, generator=g) * 6.28
    cos, sin = ang.cos(), ang.sin()
    pools = []
    for _ in range(args.copies):
        k8, ks = quantize_rows(torch.randn(L, DI, device=dev, generator=g).bfloat16(), DI)
        pools.append((k8, ks.view(-1).contiguous()))
    bt = torch.randperm(L // epb, device=dev, generator=g)[None]  # int64, as FastModel's bt_tok
    slots = (bt[:, :, None] * epb + torch.arange(epb, device=dev)).reshape(1, L).int()
    seq = torch.zeros(1, dtype=torch.int32, device=dev)
    vl = torch.full((1,), L, dtype=torch.int32, device=dev)
    win = torch.randint(0, 4096, (1, W), device=dev, generator=g, dtype=torch.int32)

    def chain(i: int) -> torch.Tensor:
        iq = iq0.clone()  # index_q rotates in place
        buf = decode_hist_buffer(iq, L, K, zeroed=False)
        assert buf is not None
        q8, w = index_q(iq, w_in, cos, sin, HI**-0.5, True, zero=buf)
        k8, ks = pools[i]
        sc = indexer_scores(q8, w, k8, slots, seq, vl, k_scale=ks, zero_rank=True, hist=buf)
        rows = topk_pool_rows_long(sc, K, vl, buf, bt, win, 1 << 20, epb)
        assert rows is not None
        return rows

    ref = None
    times: list[float] = []
    for _ in range(args.rounds):
        got = chain(0).sort(dim=1).values
        ref = got if ref is None else ref
        assert torch.equal(got, ref), "rows differ between rounds"
        times.append(time_graph(chain, args.copies, args.calls))
    med = statistics.median(times)
    print(f"chain_1m back-to-back {med:6.2f} us (rounds " + ", ".join(f"{t:.2f}" for t in times) + ")", flush=True)
    append_jsonl(args.out, [dict(meta, case="csa_decode_chain_1m", entries=L, b2b_us=round(med, 2),
                                 rounds_us=[round(t, 2) for t in times], same_rows=True)])

if __name__ == "__main__":
    main()
