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
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl, run_meta, time_graph  # noqa: E402
from ds4f.kernels.fp8 import quantize_rows  # noqa: E402
from ds4f.kernels.index_q import index_q  # noqa: E402
from ds4f.kernels.indexer import decode_hist_buffer, indexer_scores, topk_pool_rows_long  # noqa: E402

HI, DI, K, EPB, W, RD = 64, 128, 512, 64, 128, 64  # indexer heads / dim, top-k, entries per block, window, rope


@dataclass
class ChainInputs:
    """One token's indexer query, head weights and RoPE angles, `copies` key pools of L e4m3 rows (+ row scales),
    a shuffled block table and its slots, the window rows."""

    iq0: torch.Tensor
    w_in: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    pools: list[tuple[torch.Tensor, torch.Tensor]]
    bt: torch.Tensor
    slots: torch.Tensor
    seq: torch.Tensor
    vl: torch.Tensor
    win: torch.Tensor


def chain_inputs(L: int, copies: int, dev: str = "cuda") -> ChainInputs:
    g = torch.Generator(device=dev).manual_seed(0)
    iq0 = torch.randn(1, HI, DI, device=dev, generator=g).bfloat16()
    w_in = torch.randn(1, HI, device=dev, generator=g).bfloat16()
    ang = torch.rand(1, RD // 2, device=dev, generator=g) * 6.28
    pools = []
    for _ in range(copies):
        k8, ks = quantize_rows(torch.randn(L, DI, device=dev, generator=g).bfloat16(), DI)
        pools.append((k8, ks.view(-1).contiguous()))
    bt = torch.randperm(L // EPB, device=dev, generator=g)[None]  # int64, as FastModel's bt_tok
    slots = (bt[:, :, None] * EPB + torch.arange(EPB, device=dev)).reshape(1, L).int()
    seq = torch.zeros(1, dtype=torch.int32, device=dev)
    vl = torch.full((1,), L, dtype=torch.int32, device=dev)
    return ChainInputs(iq0, w_in, ang.cos(), ang.sin(), pools, bt, slots, seq, vl,
                       torch.randint(0, 4096, (1, W), device=dev, generator=g, dtype=torch.int32))


def run_chain(c: ChainInputs, i: int) -> torch.Tensor:
    """The chain over pool i -> its attention rows [1, W + K]."""
    L = c.slots.shape[1]
    iq = c.iq0.clone()  # index_q rotates in place
    buf = decode_hist_buffer(iq, L, K, zeroed=False)
    assert buf is not None
    q8, w = index_q(iq, c.w_in, c.cos, c.sin, HI**-0.5, True, zero=buf)
    k8, ks = c.pools[i]
    sc = indexer_scores(q8, w, k8, c.slots, c.seq, c.vl, k_scale=ks, zero_rank=True, hist=buf)
    rows = topk_pool_rows_long(sc, K, c.vl, buf, c.bt, c.win, 1 << 20, EPB)
    assert rows is not None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=262144)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/results/decode_long.jsonl"))
    args = ap.parse_args()
    meta = run_meta(" ".join(["bench/chain_1m.py", *sys.argv[1:]]))
    L = args.entries
    c = chain_inputs(L, args.copies)

    def chain(i: int) -> torch.Tensor:
        return run_chain(c, i)

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
