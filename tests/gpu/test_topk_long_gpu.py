"""Decode selection at long context on CUDA (ds4f.kernels.topk_long): the indexer over e4m3 keys adding its
first-digit histogram, then the two launches writing the attention rows (window rows, then pool rows through a
block table), captured once in a CUDA graph and replayed twice per valid length while the lengths change on the
device, as a 1M decode graph serves every depth: T in 1, 4, 16; L = 262,144; valid lengths from 0 to L across
the one-program bound (DS4F_TOPK_SMALL's lanes). Against torch.topk of the same scores (sets of values; the rows as
glue.topk_rows maps them), rows of tied scores included; the state's histograms and counters back at zero."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON, indexer_scores
from ds4f.kernels.fp8 import quantize_rows
from ds4f.kernels.indexer import SMALL_KNOBS, quant_heads_fp8
from ds4f.kernels.ref import topk_indices_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

K, W, L, EPB = 512, 128, 262144, 32


@pytest.mark.parametrize("T", [1, 4, 16])
def test_topk_long_graph(T: int) -> None:
    from ds4f.kernels import topk_long

    g = torch.Generator(device="cuda").manual_seed(T)
    q, qs = quant_heads_fp8(torch.randn(T, 64, 128, device="cuda", generator=g).bfloat16())
    w = torch.randn(T, 64, device="cuda", generator=g) * qs
    kp = torch.randn(L, 128, device="cuda", generator=g).bfloat16()
    kp[: L // 2: 3] = kp[0]  # every third key of the first half the same: tied scores
    k8, ks = quantize_rows(kp, 128)
    ks = ks.view(-1).contiguous()
    slots = torch.randperm(L, device="cuda", generator=g).int()[None]
    seq = torch.zeros(T, dtype=torch.int32, device="cuda")
    vl = torch.zeros(T, dtype=torch.int32, device="cuda")
    bt = torch.randperm(L // EPB, device="cuda", generator=g)[None].repeat(T, 1)
    win = torch.randint(0, 1000, (T, W), device="cuda", dtype=torch.int32, generator=g)
    rows = (bt, win, 7, EPB)
    assert topk_long.applies(T, L, W, q.device)
    st = topk_long.state(q.device)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        sc = indexer_scores(q, w, k8, slots, seq, vl, k_scale=ks, zero_rank=True, hist=st.hist0)
        return sc, topk_long.decode_rows(sc, K, vl, st, rows)

    step()  # compile and allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sc, out = step()
    small = SMALL_KNOBS[0]
    for v in (0, 100, small, small + 1, 65536, L):
        lens = torch.tensor([min(v + r * 7, L) for r in range(T)], dtype=torch.int32, device="cuda")
        vl.copy_(lens)
        for _ in range(2):
            out.fill_(-7)
            graph.replay()
            torch.cuda.synchronize()
            assert st.armed(), v
            ref = topk_indices_ref(sc, K)
            assert torch.equal(out[:, :W], win)
            for r in range(T):
                a = out[r, W:]
                n = min(int(lens[r]), K)
                assert (a[n:] == -1).all() and (a[:n] >= 0).all(), (v, r)
                ids = ref[r, :n].long()
                want = (7 + bt[r, ids // EPB] * EPB + ids % EPB).sort().values
                if torch.equal(a[:n].sort().values.long(), want):
                    continue
                # a tied k-th: another subset of the ties; the picks' scores are what must agree
                inv = torch.full((int(bt.max()) * EPB + EPB + 7,), -1, dtype=torch.long, device="cuda")
                allid = torch.arange(L, device="cuda")
                inv[7 + bt[r, allid // EPB] * EPB + allid % EPB] = allid
                got_ids = inv[a[:n].long()]
                assert (got_ids >= 0).all() and got_ids.unique().numel() == n, (v, r)
                assert torch.equal(sc[r, got_ids].sort().values, sc[r, ids].sort().values), (v, r)


@pytest.mark.parametrize("graphs", [False, True])
def test_fast_model_long_rows_match_multipass(graphs: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # FastModel's decode steps through topk_long (DS4F_TOPK_LONG=1) vs the multi-pass top-k + glue.topk_rows (=0):
    # the same picks, so the same logits up to the attention's key order. The one-program bound and the chunk are
    # shrunk (16 lanes, 16-entry chunks) so a tiny model's CSA pools (up to 28 entries) take both launches' paths
    import sys
    from pathlib import Path

    from ds4f.kernels import indexer, topk_long

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_fast_fp8_kv import FP8, no_flip_config, rel_errors, run_steps

    monkeypatch.setattr(indexer, "SMALL_KNOBS", (16, 4))
    monkeypatch.setattr(topk_long, "SMALL_KNOBS", (16, 4))
    monkeypatch.setattr(topk_long, "TOPK_KNOBS", (16, 2))
    took = []
    orig = topk_long.decode_rows

    def counted(*a: object, **kw: object) -> torch.Tensor:
        took.append(1)
        return orig(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(topk_long, "decode_rows", counted)
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DS4F_TOPK_LONG", flag)
        n = len(took)
        outs[flag] = run_steps(no_flip_config(), "cuda", prompt_lens=(90, 5, 61), first_chunk=13, decode_steps=20,
                               fast={"fp8": FP8["fp8"]}, ref=(), graphs=graphs)["fp8"]
        assert (len(took) > n) == (flag == "1")
    e = rel_errors(outs["1"], outs["0"])
    print(f"topk_long vs multi-pass: max rel {e.max():.2e}")
    assert e.max() < 2e-2
