"""Model-side TP: the tiny model sharded over 2 gloo ranks gives TP=1's logits and greedy tokens, with 2 all-reduces
per layer and 1 all-gather per logits call; bad sizes are refused naming the flag."""

from __future__ import annotations

import datetime as dt
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ds4f.distributed.comm import Comm, gloo_group
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.cache import AttnBatch, DenseCache
from ds4f.model.deepseek_v4 import Transformer, init_random_
from ds4f.model.tp import ShardError, shard_model
from tests.ranks import spawn_ranks

PROMPTS = [list(range(100, 130)), list(range(5000, 5045))]  # 30 and 45 tokens: CSA layers select (topk 4 < entries)
DECODE_STEPS = 4


def _run(model: Transformer) -> dict[str, Any]:
    """Batched prefill of PROMPTS, DECODE_STEPS greedy decode steps, one MTP forward; logits and counts per phase."""
    torch.manual_seed(0)
    cache = DenseCache().bind([0, 1])
    ids = torch.tensor(PROMPTS[0] + PROMPTS[1])
    pos = torch.cat([torch.arange(len(p)) for p in PROMPTS])
    qsl = [0, len(PROMPTS[0]), ids.numel()]
    comm: Comm = model.tp_comm
    comm.reset_counts()
    with torch.inference_mode():
        streams = prefill = model(ids, pos, AttnBatch(qsl, [0, 0], cache))
        prefill_counts = dict(comm.counts)
        logits = [model.compute_logits(streams[[qsl[1] - 1, qsl[2] - 1]])]
        starts = [len(p) for p in PROMPTS]
        for _ in range(DECODE_STEPS):
            nxt = logits[-1].argmax(-1)
            comm.reset_counts()
            streams = model(nxt, torch.tensor(starts), AttnBatch([0, 1, 2], starts, cache))
            logits.append(model.compute_logits(streams))
            step_counts = dict(comm.counts)
            starts = [s + 1 for s in starts]
        comm.reset_counts()
        shifted = torch.cat([ids[1:], ids[:1]])  # token i+1 at position i (the wrap-around row is never compared)
        mtp = model.mtp[0](prefill, shifted, pos, AttnBatch(qsl, [0, 0], DenseCache().bind([0, 1])))
        mtp_logits = model.mtp[0].compute_logits(mtp, model.head)
        mtp_counts = dict(comm.counts)
    return {"logits": torch.stack(logits), "mtp": mtp_logits, "prefill": prefill_counts, "step": step_counts,
            "mtp_counts": mtp_counts}


def _tiny() -> Transformer:
    return init_random_(Transformer(ModelArgs.from_hf(tiny_config())), seed=0)


def _rank_main(rank: int, port: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=30))
    comm = Comm(rank, world, gloo_group(dist.PrefixStore("model", store), rank, world, 30.0, "127.0.0.1"))
    model = shard_model(_tiny(), rank, world, comm)
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(_run(model)))


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _run(shard_model(_tiny(), 0, 1, Comm(0, 1)))


def test_tp2_matches_tp1_logits_tokens_and_collective_count(reference: dict[str, Any], tmp_path: Path) -> None:
    world = 2
    codes = spawn_ranks(_rank_main, world, world, str(tmp_path))
    assert codes == [0, 0], f"rank exit codes {codes}"
    ref = reference
    n_layers = ModelArgs.from_hf(tiny_config()).num_hidden_layers
    for r in range(world):
        got = pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes())
        assert torch.equal(got["logits"].argmax(-1), ref["logits"].argmax(-1)), f"rank {r} greedy tokens differ"
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got["mtp"], ref["mtp"], rtol=1e-4, atol=1e-4)
        assert got["prefill"] == {"all_reduce": 2 * n_layers}, got["prefill"]
        assert got["step"] == {"all_reduce": 2 * n_layers, "all_gather": 1}, got["step"]
        assert got["mtp_counts"] == {"all_reduce": 2, "all_gather": 1}, got["mtp_counts"]


def test_shard_shapes_and_refusals() -> None:
    model = shard_model(_tiny(), 1, 2, Comm(1, 2, pg=object()))
    attn, a = model.layers[1].attn, model.args
    assert attn.n_heads == a.num_attention_heads // 2 and attn.o_groups == a.o_groups // 2
    assert attn.wq_b.weight.shape == (a.num_attention_heads // 2 * a.head_dim, a.q_lora_rank)
    assert attn.wo_b.weight.shape == (a.hidden_size, a.o_groups // 2 * a.o_lora_rank)
    assert attn.wkv.weight.shape == (a.head_dim, a.hidden_size)  # the KV head stays whole
    assert attn.indexer.wq_b.weight.shape[0] == a.index_n_heads * a.index_head_dim  # indexer replicated
    assert model.layers[0].ffn.experts[0].w2.weight.shape == (a.hidden_size, a.moe_intermediate_size // 2)
    assert model.head.weight.shape == (a.vocab_size // 2, a.hidden_size)
    with pytest.raises(ShardError, match=r"--tensor-parallel-size 8: 4 attention heads"):
        shard_model(_tiny(), 0, 8, Comm(0, 8, pg=object()))
    with pytest.raises(ShardError, match=r"--tensor-parallel-size 4: 2 output groups"):
        shard_model(_tiny(), 0, 4, Comm(0, 4, pg=object()))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("dim", [0, 1])
def test_packed_slices_dequantize_to_the_sliced_weight(fmt: str, dim: int) -> None:
    from ds4f.model.linear import Linear
    from ds4f.model.quant import dequantize, quant_fp8_block, quant_mxfp4
    from ds4f.model.tp import _slice_linear

    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    packed, scale = (quant_fp8_block if fmt == "fp8" else quant_mxfp4)(w)

    def linear() -> Linear:
        lin = Linear(256, 512, fmt, torch.float32)
        lin.weight.data = dequantize(fmt, packed, scale, torch.float32)
        lin.packed_weight, lin.packed_scale = packed, scale
        return lin

    lin, full = linear(), dequantize(fmt, packed, scale, torch.float32)
    _slice_linear(lin, dim, 128, 256)
    assert torch.equal(lin.weight, full.narrow(dim, 128, 128))
    assert lin.packed_weight is not None
    assert torch.equal(dequantize(fmt, lin.packed_weight, lin.packed_scale, torch.float32), lin.weight)
    lin, lo = linear(), (64 if fmt == "fp8" else 16)
    _slice_linear(lin, dim, lo, 256)  # off the block grid (MXFP4 rows have no grid): packed dropped, weight exact
    assert torch.equal(lin.weight, full.narrow(dim, lo, 256 - lo))
    assert (lin.packed_weight is None) == (fmt == "fp8" or dim == 1)
