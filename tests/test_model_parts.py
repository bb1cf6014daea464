"""Model parts at Flash shapes vs HF: RoPE tables (main, compress + YaRN) and the indexer's tie-stable top-k."""

from __future__ import annotations

import torch
from hf_ref import hf_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding, apply_rotary_pos_emb

from ds4f.model.args import ModelArgs, flash_config, tiny_config
from ds4f.model.indexer import _topk_lowest_id_on_ties
from ds4f.model.layers import Rope


def test_flash_rope_tables_and_rotation_match_hf() -> None:
    args = ModelArgs.from_hf(flash_config())
    hf_rope = DeepseekV4RotaryEmbedding(hf_config(args))
    pos = torch.tensor([0, 1, 5, 127, 128, 4099, 65535, 65536, 300_001, 1_048_575])
    x = torch.randn(len(pos), 3, args.head_dim, generator=torch.Generator().manual_seed(0))
    for layer, kind in [(0, "main"), (2, "compress"), (3, "compress")]:
        ours = Rope.for_layer(args, layer)
        torch.testing.assert_close(ours.inv_freq, getattr(hf_rope, f"{kind}_inv_freq"), rtol=0, atol=0)
        cos, sin = hf_rope(x, pos[None], layer_type=kind)
        ref = apply_rotary_pos_emb(x[None].transpose(1, 2), cos, sin).transpose(1, 2)[0]
        got = ours(x, ours.cos_sin(pos))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(got, ours.cos_sin(pos), inverse=True), x, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[..., : args.nope_head_dim], x[..., : args.nope_head_dim])
    # YaRN on the compress table: dims 0..15 keep theta, 25.. are divided by the factor 16 (v4-architecture.md §2.4)
    ratio = Rope.compress(args).inv_freq / Rope.for_layer(args, 0).inv_freq * (160000.0 / 10000.0) ** (
        torch.arange(0, 64, 2) / 64)
    torch.testing.assert_close(ratio[:16], torch.ones(16), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio[25:], torch.full((7,), 1 / 16), rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-2, 2), min_size=9, max_size=9), min_size=1, max_size=5), st.integers(1, 9))
def test_topk_gives_ties_to_the_lower_id(rows: list[list[int]], k: int) -> None:
    scores = torch.tensor(rows, dtype=torch.float32)
    scores[scores == -2] = float("-inf")
    got = _topk_lowest_id_on_ties(scores, k)
    # oracle: stable sort by descending score keeps the original (id) order among equals
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].sort(dim=-1).values
    assert torch.equal(got, want)


def test_indexer_select_is_independent_of_score_pass_size(monkeypatch) -> None:
    from ds4f.model import indexer as ix

    args = ModelArgs.from_hf(tiny_config())
    idx = ix.Indexer(args, 4, torch.float32)
    g = torch.Generator().manual_seed(0)
    q, w = torch.randn(37, 2, 32, generator=g), torch.randn(37, 2, generator=g)
    keys, pos = torch.randn(40, 32, generator=g), torch.arange(123, 160)
    whole = idx.select(q, w, keys, pos)
    monkeypatch.setattr(ix, "SCORE_BUDGET", 1)  # one query per pass
    torch.testing.assert_close(idx.select(q, w, keys, pos), whole, rtol=0, atol=0)
    # causality: a query at t only gets entries j < (t+1)//4, and -1 fills what it cannot have
    assert ((whole < ((pos + 1) // 4)[:, None]) | (whole == -1)).all()
    early = idx.select(q[:3], w[:3], keys, torch.tensor([3, 7, 11]))  # 1, 2 and 3 visible entries
    assert [sorted(r) for r in early.tolist()] == [[-1, -1, -1, 0], [-1, -1, 0, 1], [-1, 0, 1, 2]]
