"""Test oracle: a ds4f Transformer in, HF's DeepseekV4ForCausalLM (fp32, eager) with the same weights out."""

from __future__ import annotations

import re

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from ds4f.model.args import CSA, HCA, ModelArgs
from ds4f.model.deepseek_v4 import Transformer

# ds4f (= checkpoint) name fragment -> HF name fragment, applied in order (v4-architecture.md §4.4)
_RENAMES = [
    (r"^embed\.", "model.embed_tokens."),
    (r"^head\.", "lm_head."),
    (r"^norm\.", "model.norm."),
    (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"^layers\.", "model.layers."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.attn\.attn_sink$", ".self_attn.sinks"),
    (r"\.attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.attn\.", ".self_attn."),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"(compressor(\.indexer)?)\.norm\.", r"\1.kv_norm."),
    (r"\.ape$", ".position_bias"),
    (r"\.ffn\.", ".mlp."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]


def hf_name(name: str) -> str:
    for pat, rep in _RENAMES:
        name = re.sub(pat, rep, name)
    return name


def hf_config(args: ModelArgs) -> DeepseekV4Config:
    rates = {CSA: 4, HCA: 128}
    for t, r in zip(args.layer_types, args.compress_ratios):
        if t in rates:
            rates[t] = r
    rope: dict = {"rope_type": "default"}
    if args.yarn is not None:
        y = args.yarn
        rope = {"rope_type": "yarn", "factor": y.factor, "original_max_position_embeddings":
                y.original_max_position_embeddings, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow}
    cfg = DeepseekV4Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads, num_key_value_heads=1,
        head_dim=args.head_dim, q_lora_rank=args.q_lora_rank, qk_rope_head_dim=args.qk_rope_head_dim,
        num_experts_per_tok=args.num_experts_per_tok, n_routed_experts=args.n_routed_experts,
        n_shared_experts=args.n_shared_experts, scoring_func=args.scoring_func, norm_topk_prob=args.norm_topk_prob,
        routed_scaling_factor=args.routed_scaling_factor, max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta, layer_types=list(args.layer_types), compress_rates=rates,
        compress_rope_theta=args.compress_rope_theta, hc_mult=args.hc_mult, hc_sinkhorn_iters=args.hc_sinkhorn_iters,
        hc_eps=args.hc_eps, num_hash_layers=args.num_hash_layers, swiglu_limit=args.swiglu_limit,
        sliding_window=args.sliding_window, o_groups=args.o_groups, o_lora_rank=args.o_lora_rank,
        index_n_heads=args.index_n_heads, index_head_dim=args.index_head_dim, index_topk=args.index_topk,
        rms_norm_eps=args.rms_norm_eps, rope_parameters=rope, bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return cfg


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """ds4f state_dict -> HF names, routed experts stacked into gate_up_proj [E, 2I, D] / down_proj [E, D, I]."""
    sd = {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        if k.startswith("mtp."):
            continue
        m = re.match(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$", k)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = v
            continue
        out[hf_name(k)] = v
    for prefix, per in experts.items():
        hp = hf_name(prefix)
        ids = sorted(per)
        out[hp + ".gate_up_proj"] = torch.stack([torch.cat([per[e]["w1"], per[e]["w3"]]) for e in ids])
        out[hp + ".down_proj"] = torch.stack([per[e]["w2"] for e in ids])
    return out


def hf_model_like(model: Transformer) -> DeepseekV4ForCausalLM:
    """HF DeepseekV4ForCausalLM (fp32, eager, eval) carrying exactly `model`'s weights (MTP is not part of HF)."""
    hf = DeepseekV4ForCausalLM(hf_config(model.args)).float().eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if missing or unexpected:
        raise AssertionError(f"name mapping incomplete: missing {missing}, unexpected {unexpected}")
    for layer in hf.model.layers:
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            comp.indexer.scorer.register_forward_hook(_lower_id_wins_ties)
    return hf


def _lower_id_wins_ties(module: torch.nn.Module, inputs: tuple, scores: torch.Tensor) -> torch.Tensor:
    """HF picks the indexer's top-k with torch.topk, whose order among equal scores is unspecified; ds4f (like vLLM)
    gives ties to the lower entry id. Exact ties are common: a score is exactly 0 whenever ReLU clips every index
    head, which tiny configs (2 heads) hit often. Nudge each score by (E - id) * 1e-30 so HF breaks ties the same
    way; the nudge is far below the fp32 spacing of any score above ~1e-27, so it cannot reorder distinct scores."""
    e = scores.shape[-1]
    return scores + torch.arange(e, 0, -1, dtype=scores.dtype, device=scores.device) * 1e-30


@torch.no_grad()
def hf_logits(hf: DeepseekV4ForCausalLM, ids: list[int] | torch.Tensor) -> torch.Tensor:
    """One full prefill, logits [T, V] fp32."""
    ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
    return hf(input_ids=ids, use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(hf: DeepseekV4ForCausalLM, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation of n tokens; each step re-runs the whole sequence (no cache state to trust)."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(hf_logits(hf, ids)[-1].argmax()))
    return ids[len(prompt_ids):]
