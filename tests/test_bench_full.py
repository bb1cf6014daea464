"""bench_full's per-rank roofline bytes against a second code path: at TP=1 with 6 experts counted it is
ds4f.engine.roofline.weight_bytes (the engine's own formula, per tensor kind) plus the KV bytes; at TP=2 the
sharded parts halve while replicated ones do not."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_full import decode_bytes, rank_weight_bytes  # noqa: E402

from ds4f.engine.roofline import kv_bytes, weight_bytes  # noqa: E402
from ds4f.model.args import ModelArgs, flash_config  # noqa: E402


def test_rank_bytes_match_the_engine_roofline_at_tp1() -> None:
    a = ModelArgs.from_hf(flash_config())
    dense, per_expert = rank_weight_bytes(a, 1)
    # roofline.weight_bytes counts min(E, batch * k) experts and one embedding row; bench_full the expected distinct
    want = weight_bytes(a, 1) - a.hidden_size * 2
    got = dense + a.num_hidden_layers * a.num_experts_per_tok * per_expert
    assert abs(got - want) / want < 1e-3, (got, want)
    hit = a.n_routed_experts * (1 - (1 - 1 / a.n_routed_experts) ** a.num_experts_per_tok)
    d = 131072
    assert decode_bytes(a, 1, d, 1) == dense + a.num_hidden_layers * hit * per_expert + sum(kv_bytes(a, d, 584, 132))


def test_tp2_shards_what_splits() -> None:
    a = ModelArgs.from_hf(flash_config())
    d1, e1 = rank_weight_bytes(a, 1)
    d2, e2 = rank_weight_bytes(a, 2)
    assert e2 == e1 / 2  # each expert's intermediate dim is split
    assert d1 / 2 < d2 < d1  # attention heads and the head split; norms, mHC, router, wq_a, wkv are replicated
