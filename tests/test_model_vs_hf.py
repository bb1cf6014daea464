"""ds4f Transformer vs HF transformers' DeepseekV4ForCausalLM (the oracle): logits, greedy text, names and dtypes."""

from __future__ import annotations

import re

import pytest
import torch
from hf_ref import hf_greedy, hf_logits, hf_model_like

from ds4f.model.args import CSA, HCA, SWA, ModelArgs, tiny_config
from ds4f.model.cache import AttnBatch, DenseCache
from ds4f.model.deepseek_v4 import Transformer, init_random_


def variant_config() -> dict:
    """Another shape: CSA first (with hash routing), HCA ratio 8, more heads / groups / experts, window 12, top-6."""
    cfg = tiny_config()
    cfg.update({
        "num_hidden_layers": 5, "layer_types": [CSA, HCA, SWA, CSA, HCA], "compress_ratios": [4, 8, 0, 4, 8, 0],
        "compress_rates": {CSA: 4, HCA: 8}, "num_hash_layers": 2, "sliding_window": 12, "index_topk": 6,
        "index_n_heads": 4, "num_attention_heads": 8, "o_groups": 4, "n_routed_experts": 12,
        "num_experts_per_tok": 3, "hc_sinkhorn_iters": 7, "hidden_size": 48, "qk_rope_head_dim": 32,
        "index_head_dim": 48, "routed_scaling_factor": 2.5,
    })
    return cfg


CONFIGS = {"tiny": tiny_config, "variant": variant_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest) -> tuple[Transformer, torch.nn.Module]:
    model = init_random_(Transformer(ModelArgs.from_hf(CONFIGS[request.param]())), seed=1)
    return model, hf_model_like(model)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(2, 129280, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def ds4f_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    t = torch.tensor(ids)
    return model.compute_logits(model(t, torch.arange(len(ids)), AttnBatch([0, len(ids)], [0], DenseCache())))


@torch.no_grad()
def ds4f_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Prefill, then one-token decode steps through the cache."""
    cache, out = DenseCache(), []
    ids, pos = torch.tensor(prompt), 0
    for _ in range(n):
        streams = model(ids, torch.arange(pos, pos + len(ids)), AttnBatch([0, len(ids)], [pos], cache))
        pos += len(ids)
        ids = model.compute_logits(streams[-1:]).argmax(-1)
        out.append(int(ids))
    return out


@pytest.mark.parametrize("length", [90, 200])
def test_logits_match_hf(pair: tuple[Transformer, torch.nn.Module], length: int) -> None:
    model, hf = pair
    a = model.args
    csa = [i for i, t in enumerate(a.layer_types) if t == CSA]
    hca = [i for i, t in enumerate(a.layer_types) if t == HCA]
    # the prompt is long enough that the indexer really drops entries and HCA attends to several
    assert min(length // a.compress_ratios[i] for i in csa) > 2 * a.index_topk
    assert min(length // a.compress_ratios[i] for i in hca) >= 5
    ids = _ids(length, seed=length)
    ref, got = hf_logits(hf, ids), ds4f_logits(model, ids)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, f"max relative deviation {err:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_matches_hf(pair: tuple[Transformer, torch.nn.Module]) -> None:
    model, hf = pair
    prompt = _ids(83, seed=5)
    assert ds4f_greedy(model, prompt, 16) == hf_greedy(hf, prompt, 16)


def test_state_dict_names_are_checkpoint_names() -> None:
    args = ModelArgs.from_hf(tiny_config())
    model = Transformer(args, dtype=torch.bfloat16)
    sd = model.state_dict()
    d, hd, h = args.hidden_size, args.head_dim, args.num_attention_heads
    expect = {
        "embed.weight": ((args.vocab_size, d), torch.bfloat16),
        "head.weight": ((args.vocab_size, d), torch.bfloat16),
        "hc_head_fn": ((4, 4 * d), torch.float32),
        "layers.0.hc_attn_fn": ((24, 4 * d), torch.float32),
        "layers.0.hc_ffn_scale": ((3,), torch.float32),
        "layers.0.attn.wq_b.weight": ((h * hd, args.q_lora_rank), torch.bfloat16),
        "layers.0.attn.wo_a.weight": ((args.o_groups * args.o_lora_rank, h * hd // args.o_groups), torch.bfloat16),
        "layers.0.attn.attn_sink": ((h,), torch.float32),
        "layers.0.ffn.gate.tid2eid": ((args.vocab_size, args.num_experts_per_tok), torch.int64),
        "layers.1.attn.compressor.wkv.weight": ((2 * hd, d), torch.bfloat16),
        "layers.1.attn.compressor.ape": ((4, 2 * hd), torch.float32),
        "layers.1.attn.indexer.compressor.ape": ((4, 2 * args.index_head_dim), torch.float32),
        "layers.1.attn.indexer.weights_proj.weight": ((args.index_n_heads, d), torch.bfloat16),
        "layers.2.attn.compressor.wgate.weight": ((hd, d), torch.bfloat16),
        "layers.2.attn.compressor.ape": ((16, hd), torch.float32),
        "layers.2.ffn.gate.bias": ((args.n_routed_experts,), torch.float32),
        "layers.3.ffn.experts.7.w2.weight": ((d, args.moe_intermediate_size), torch.bfloat16),
        "mtp.0.e_proj.weight": ((d, d), torch.bfloat16),
        "mtp.0.hc_head_base": ((4,), torch.float32),
        "mtp.0.ffn.gate.bias": ((args.n_routed_experts,), torch.float32),
    }
    for k, (shape, dtype) in expect.items():
        assert tuple(sd[k].shape) == shape and sd[k].dtype == dtype, k
    assert "layers.0.ffn.gate.bias" not in sd and "layers.0.attn.compressor.wkv.weight" not in sd
    assert not any("indexer" in k for k in sd if k.startswith(("layers.2.", "mtp.")))
    assert not any(re.search(r"rope|inv_freq|_embed", k) for k in sd)  # no derived tensors in the checkpoint
    assert all(re.fullmatch(r"[a-z_0-9.]+", k) for k in sd)
