"""⑤ GPU fast path on CPU: eager steps score only glue.index_len indexer columns (the entries their tokens can see),
with logits bit-identical to scoring every entry of the cache (StepMeta.max_len = None, as decode graphs do)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ds4f.model.args import CSA, ModelArgs, tiny_config
from ds4f.model.deepseek_v4 import Transformer, init_random_
from ds4f.runner.gpu import glue
from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache, slice_meta

BLOCK = 32


def test_index_len_rule() -> None:
    assert glue.index_len(None, 4, 1000, 8) == 1000
    assert glue.index_len(0, 4, 1000, 8) == 256  # nothing visible yet: one bucket
    assert glue.index_len(1024, 4, 1000, 8) == 256  # 256 visible
    assert glue.index_len(1028, 4, 1000, 8) == 512
    assert glue.index_len(4000, 4, 1000, 8) == 1000  # clipped to the cache's entries
    assert glue.index_len(40, 4, 1000, 24, bucket=8) == 24  # at least top-k: 10 visible
    assert glue.index_len(100, 4, 1000, 4, bucket=8) == 32


class Recorder(FastCache):
    """A FastCache that records the indexer's column count (slots.shape[1]) of every index_scores call."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cols: list[int] = []

    def index_scores(self, layer: int, q: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, seq_of: torch.Tensor,
                     valid_len: torch.Tensor, hist: torch.Tensor | None = None) -> torch.Tensor:
        self.cols.append(slots.shape[1])
        return super().index_scores(layer, q, w, slots, seq_of, valid_len, hist)


@pytest.mark.parametrize(("bucket", "index_topk", "max_ctx"), [(256, 4, 2048), (8, 6, 512)])
@torch.no_grad()
def test_trimmed_indexer_is_bit_identical(bucket: int, index_topk: int, max_ctx: int) -> None:
    cfg = tiny_config()
    cfg["index_topk"] = index_topk
    args = ModelArgs.from_hf(cfg)
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=0)
    fm = FastModel(model, max_pos=max_ctx + BLOCK)
    fm.index_bucket = bucket
    n_ent = max_ctx // 4  # CSA ratio 4
    caches = {k: Recorder(args, max_seqs=4, num_blocks=2 * (max_ctx // BLOCK), block_size=BLOCK, max_ctx=max_ctx,
                          max_tokens=128, device="cpu") for k in ("trim", "full")}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (150, 61)]
    # (slot, start, ids): a mixed step (seq 0's first chunk + seq 1 whole), seq 0's later chunks, then decode steps
    steps = [[(0, 0, prompts[0][:40]), (2, 0, prompts[1])], [(0, 40, prompts[0][40:100])],
             [(0, 100, prompts[0][100:])]]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in caches}
    want_cols: list[int] = []
    for st in steps + [None] * 3:
        if st is None:  # greedy decode of both sequences from the trimmed path's tokens
            lg = out["trim"][-1]
            at = [150 + len(out["trim"]) - 3, 61 + len(out["trim"]) - 3]
            st = [(0, at[0], [int(lg[0].argmax())]), (2, at[1], [int(lg[-1].argmax())])]
        max_len = max(s + len(c) for _, s, c in st)
        want_cols.append(min(n_ent, -(-max(max_len // 4, index_topk) // bucket) * bucket))
        for k, cache in caches.items():
            meta = cache.build_meta(st, fm.ratios)
            assert meta.max_len == max_len
            if k == "full":
                meta.max_len = None
            out[k].append(fm.logits(fm.forward(meta, cache), meta))
    n_csa = sum(1 for i in range(args.num_hidden_layers) if args.layer_type(i) == CSA)
    for a, b in zip(out["trim"], out["full"]):
        assert torch.equal(a, b)
    # every CSA layer of every step: the trimmed path passes the step's bucketed column count, the other all n_ent
    assert n_csa >= 1 and len(caches["full"].cols) == n_csa * len(want_cols)
    assert caches["trim"].cols == [c for c in want_cols for _ in range(n_csa)]
    assert caches["full"].cols == [n_ent] * len(caches["full"].cols)
    assert min(want_cols) < n_ent  # the trimmed path did score fewer columns

    # static decode buffers (what DecodeGraphs captures): the full class (max_len None) scores every column; a
    # context class (max_len = its cap, positions + 1 <= cap) only index_len(cap) of them, with the same logits
    cap = 160
    want = glue.index_len(cap, 4, n_ent, index_topk, bucket)
    assert want < n_ent
    for k, cache in caches.items():
        buf = cache.decode_buffers(2, fm.ratios)
        meta = slice_meta(buf, 2)
        assert meta.max_len is None
        if k == "trim":
            meta.max_len = cap
        cache.fill_decode(meta, [(0, 153, 7), (2, 64, 9)])
        cache.cols.clear()
        out["dec"] = out.get("dec", []) + [fm.logits(fm.forward(meta, cache), meta)]
        assert cache.cols == [want if k == "trim" else n_ent] * n_csa
    assert torch.equal(out["dec"][0], out["dec"][1])


@torch.no_grad()
def test_direct_attention_rows_and_live_bound() -> None:
    # the rows of every "direct" ratio (HCA: window + every entry): eager steps keep glue.index_len columns, and
    # live[t] (DS4F_ATTN_LIVE, what sparse_attn's kernel stops at) leaves only -1 at and past it, with the token's
    # last visible entry just before it
    args = ModelArgs.from_hf(tiny_config())
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=0)
    max_ctx = 1024
    fm = FastModel(model, max_pos=max_ctx + BLOCK)
    fm.attn_live = True
    cache = FastCache(args, max_seqs=4, num_blocks=2 * (max_ctx // BLOCK), block_size=BLOCK, max_ctx=max_ctx,
                      max_tokens=256, device="cpu")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab_size, (200,), generator=g).tolist()
    checked = 0
    for trim in (True, False):
        meta = cache.build_meta([(0, 0, ids), (2, 0, ids[:37])], fm.ratios)
        if not trim:
            meta.max_len = None
        d = fm._derive(meta, cache)
        assert d.attn_idx and set(d.live) == set(d.attn_idx)
        for m, idx in d.attn_idx.items():
            n_ent = cache.max_entries(m)
            want_cols = fm.W + (glue.index_len(200, m, n_ent, 0, fm.index_bucket) if trim else n_ent)
            assert idx.shape[1] == want_cols
            live = d.live[m].long()
            vis = (meta.positions + 1) // m
            assert torch.equal(live, fm.W + vis.clamp(max=n_ent))
            cols = torch.arange(idx.shape[1])[None, :]
            assert (idx[cols >= live[:, None]] == -1).all()
            has = vis > 0
            assert (idx[has, live[has] - 1] >= 0).all()
            checked += int(has.sum())
    assert checked > 0
