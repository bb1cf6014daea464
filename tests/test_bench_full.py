"""bench_full's per-rank roofline bytes against a second code path: at TP=1 with 6 experts counted it is
ds4f.engine.roofline.weight_bytes (the engine's own formula, per tensor kind) plus the KV bytes; at TP=2 the
sharded parts halve while replicated ones do not. --tp-sim's SimComm: a rank alone computes its own partial sums
(the two ranks' partials add up to the unsharded sublayer) and counts its collectives."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
from bench_full import SimComm, decode_bytes, rank_weight_bytes  # noqa: E402

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


def test_sim_rank_partials_sum_to_the_unsharded_sublayer() -> None:
    from ds4f.model.loader import load_model

    full = load_model(None, dtype=torch.float32, device="cpu", load_format="dummy", seed=3)
    ranks = [load_model(None, dtype=torch.float32, device="cpu", load_format="dummy", seed=3, tp_rank=r, tp_world=2,
                        comm=SimComm(2)) for r in (0, 1)]
    x = torch.randn(5, full.args.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(5)
    with torch.no_grad():
        want = full.layers[1].ffn(x, ids)
        parts = [m.layers[1].ffn(x, ids) for m in ranks]  # each rank's all-reduce returns its own partial
    assert not torch.allclose(parts[0], want, atol=1e-3)  # a partial alone is not the sum
    torch.testing.assert_close(parts[0] + parts[1], want, atol=1e-4, rtol=1e-4)
    comm = ranks[0].tp_comm
    assert comm.counts["all_reduce"] == 1 and comm.nbytes["all_reduce"] == want.numel() * 4
    h = torch.randn(2, 3, 7)
    g = comm.all_gather_last(h, 12)  # shards of 7 columns, 12 real: the shape of the gathered vocab
    assert g.shape == (2, 3, 12) and torch.equal(g[..., :7], h) and comm.counts["all_gather"] == 1


def test_moe_split_bytes_sum_to_the_sweeps_expert_bytes() -> None:
    # bench/moe_kernel_split.py's per-kernel bytes (up: gate + up rows, down rows, each with its scales) add up to
    # the bytes per expert that the MXFP4 sweeps time against (sweep_mxfp4_decode.rank_experts' count)
    from moe_kernel_split import split_bytes

    for inter in (1024, 2048):
        parts = split_bytes(inter, 3.0)
        assert parts["up"] == 2 * parts["down"]
        assert sum(parts.values()) == 3.0 * (3 * inter * 4096 // 2 + 3 * inter * 4096 // 32)


def test_whatif_no_compressor_gemv_keeps_only_the_weights_proj_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/whatif.py's timing-only variant: a CSA-width dense run (its width % 128 == 64) gives zeros but for its
    last 64 columns (the indexer's weights_proj, as the real GEMV gives them); an HCA-width run gives zeros; an
    unknown name is refused naming the known ones."""
    import whatif

    from ds4f.model.linear import Linear
    from ds4f.runner.gpu import packed

    monkeypatch.setattr(packed.InProj, "dense_linear", packed.InProj.__dict__["dense_linear"])  # restored after
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, generator=g)

    def run(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lin = Linear(256, n)
        lin.weight.data = torch.randn(n, 256, generator=g)
        proj = packed.InProj([lin])
        return proj(x), x @ lin.weight.T

    real, want = run(2 * 128 + 64)
    torch.testing.assert_close(real, want, rtol=1e-4, atol=1e-4)
    assert whatif.apply("no-compressor-gemv") == ["no-compressor-gemv"]
    csa, want = run(2 * 128 + 64)
    assert torch.count_nonzero(csa[:, :256]) == 0
    torch.testing.assert_close(csa[:, 256:], want[:, 256:], rtol=1e-4, atol=1e-4)
    hca, _ = run(256)
    assert torch.count_nonzero(hca) == 0
    with pytest.raises(SystemExit, match="unknown nope; known: no-compressor-gemv"):
        whatif.apply("nope")
