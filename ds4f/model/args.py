"""⑥ model config: a checkpoint's config.json in, a validated frozen ModelArgs out."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_RATIO_TO_TYPE = {0: SWA, 1: SWA, 4: CSA, 128: HCA}


class ConfigError(ValueError):
    """A config.json that ds4f cannot run; the message names the field."""


@dataclass(frozen=True)
class YarnArgs:
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # one ratio per main layer (MTP entries stripped into mtp_compress_ratios); 0 = sliding window only
    compress_ratios: tuple[int, ...] = ()
    layer_types: tuple[str, ...] = ()
    mtp_compress_ratios: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnArgs | None = field(default_factory=YarnArgs)
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    # checkpoint storage formats: "bf16" | "fp8" for the block-scaled linears, "bf16" | "fp8" | "fp4" for routed experts
    linear_format: str = "bf16"
    expert_format: str = "bf16"
    # "ue8m0" (float8_e8m0fnu bytes) or "float32" for stored FP8 block scales
    scale_format: str = "ue8m0"

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived values ----
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    def layer_type(self, layer: int) -> str:
        """Attention type of main layer `layer`; MTP layers (index >= num_hidden_layers) are sliding-window only."""
        return self.layer_types[layer] if layer < self.num_hidden_layers else SWA

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer] if layer < self.num_hidden_layers else 0

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def num_csa_layers(self) -> int:
        return sum(t == CSA for t in self.layer_types)

    @property
    def num_hca_layers(self) -> int:
        return sum(t == HCA for t in self.layer_types)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- construction ----
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Build from a DeepSeek-V4 config.json dict (the keys DeepSeek ships; HF-style aliases accepted)."""
        get = cfg.get
        n_layers = _int(cfg, "num_hidden_layers", 43)
        n_mtp = _int(cfg, "num_nextn_predict_layers", 1)
        ratios = get("compress_ratios")
        if ratios is None:
            raise ConfigError("config.json: 'compress_ratios' is missing (one attention ratio per layer incl. MTP)")
        if not isinstance(ratios, list) or not all(isinstance(r, int) for r in ratios):
            raise ConfigError(f"config.json: 'compress_ratios' must be a list of ints, got {ratios!r}")
        if len(ratios) not in (n_layers, n_layers + n_mtp):
            raise ConfigError(
                f"config.json: 'compress_ratios' has {len(ratios)} entries; expected num_hidden_layers ({n_layers})"
                f" or num_hidden_layers + num_nextn_predict_layers ({n_layers + n_mtp})"
            )
        main_ratios = tuple(ratios[:n_layers])
        mtp_ratios = tuple(ratios[n_layers:])
        layer_types = get("layer_types")
        if layer_types is None:
            bad = sorted({r for r in main_ratios if r not in _RATIO_TO_TYPE})
            if bad:
                raise ConfigError(
                    f"config.json: 'compress_ratios' holds {bad}; without an explicit 'layer_types' only 0 (sliding"
                    " window), 4 (CSA) and 128 (HCA) are understood"
                )
            layer_types = [_RATIO_TO_TYPE[r] for r in main_ratios]
        layer_types = tuple(layer_types[:n_layers])
        main_ratios = tuple(0 if t == SWA else r for t, r in zip(layer_types, main_ratios))

        rope_scaling = get("rope_scaling") or get("rope_parameters") or None
        yarn: YarnArgs | None = None
        if isinstance(rope_scaling, dict) and isinstance(rope_scaling.get("compress"), dict):
            rope_scaling = rope_scaling["compress"]  # HF-style nested rope_parameters
        if isinstance(rope_scaling, dict):
            kind = rope_scaling.get("type", rope_scaling.get("rope_type", "yarn"))
            if kind == "yarn":
                yarn = YarnArgs(
                    factor=float(rope_scaling.get("factor", 16.0)),
                    original_max_position_embeddings=int(rope_scaling.get("original_max_position_embeddings", 65536)),
                    beta_fast=float(rope_scaling.get("beta_fast", 32.0)),
                    beta_slow=float(rope_scaling.get("beta_slow", 1.0)),
                )
            elif kind not in ("default", None):
                raise ConfigError(f"config.json: 'rope_scaling.type' = {kind!r}; ds4f runs 'yarn' or none")

        qcfg = get("quantization_config") or {}
        linear_format = "bf16"
        scale_format = "ue8m0"
        if qcfg:
            if qcfg.get("quant_method", "fp8") != "fp8" or qcfg.get("fmt", "e4m3") != "e4m3":
                raise ConfigError(
                    f"config.json: 'quantization_config' = {qcfg!r}; ds4f reads fp8 e4m3 with 128x128 block scales"
                )
            if list(qcfg.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ConfigError("config.json: 'quantization_config.weight_block_size' must be [128, 128]")
            linear_format = "fp8"
            scale_format = "ue8m0" if qcfg.get("scale_fmt", "ue8m0") == "ue8m0" else "float32"
        expert_dtype = get("expert_dtype") or qcfg.get("expert_dtype")
        expert_format = {None: linear_format, "fp4": "fp4", "fp8": "fp8", "bf16": "bf16"}.get(expert_dtype)
        if expert_format is None:
            raise ConfigError(f"config.json: 'expert_dtype' = {expert_dtype!r}; expected 'fp4', 'fp8' or absent")

        n_kv = _int(cfg, "num_key_value_heads", 1)
        if n_kv != 1:
            raise ConfigError(
                f"config.json: 'num_key_value_heads' = {n_kv}; DeepSeek-V4 attention has one shared KV head"
            )
        head_dim = _int(cfg, "head_dim", 512)
        rope_dim = get("qk_rope_head_dim")
        if rope_dim is None and get("partial_rotary_factor") is not None:
            rope_dim = int(head_dim * float(get("partial_rotary_factor")))
        eos = get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]

        n_hash = get("num_hash_layers")
        if n_hash is None and isinstance(get("mlp_layer_types"), list):
            n_hash = sum(t == "hash_moe" for t in get("mlp_layer_types"))
        return cls(
            vocab_size=_int(cfg, "vocab_size", 129280),
            hidden_size=_int(cfg, "hidden_size", 4096),
            num_hidden_layers=n_layers,
            num_attention_heads=_int(cfg, "num_attention_heads", 64),
            head_dim=head_dim,
            qk_rope_head_dim=int(rope_dim if rope_dim is not None else 64),
            q_lora_rank=_int(cfg, "q_lora_rank", 1024),
            o_groups=_int(cfg, "o_groups", 8),
            o_lora_rank=_int(cfg, "o_lora_rank", 1024),
            sliding_window=_int(cfg, "sliding_window", 128),
            compress_ratios=main_ratios,
            layer_types=layer_types,
            mtp_compress_ratios=mtp_ratios,
            rope_theta=float(get("rope_theta", 10000.0)),
            compress_rope_theta=float(get("compress_rope_theta", 160000.0)),
            yarn=yarn,
            max_position_embeddings=_int(cfg, "max_position_embeddings", 1048576),
            index_n_heads=_int(cfg, "index_n_heads", 64),
            index_head_dim=_int(cfg, "index_head_dim", 128),
            index_topk=_int(cfg, "index_topk", 512),
            hc_mult=_int(cfg, "hc_mult", 4),
            hc_sinkhorn_iters=_int(cfg, "hc_sinkhorn_iters", 20),
            hc_eps=float(get("hc_eps", 1e-6)),
            n_routed_experts=_int(cfg, "n_routed_experts", 256),
            num_experts_per_tok=_int(cfg, "num_experts_per_tok", 6),
            n_shared_experts=_int(cfg, "n_shared_experts", 1),
            moe_intermediate_size=_int(cfg, "moe_intermediate_size", 2048),
            num_hash_layers=int(n_hash if n_hash is not None else 3),
            scoring_func=str(get("scoring_func", "sqrtsoftplus")),
            norm_topk_prob=bool(get("norm_topk_prob", True)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.5)),
            swiglu_limit=float(get("swiglu_limit", 10.0)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            num_nextn_predict_layers=n_mtp,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            bos_token_id=int(get("bos_token_id", 0)),
            eos_token_id=int(eos),
            linear_format=linear_format,
            expert_format=expert_format,
            scale_format=scale_format,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(cfg)


def _int(cfg: dict[str, Any], key: str, default: int) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"config.json: {key!r} must be an integer, got {v!r}")
    return v


def _validate(a: ModelArgs) -> None:
    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config.json: {name!r} {why}")

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
                 "o_groups", "o_lora_rank", "sliding_window", "hc_mult", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "index_n_heads", "index_head_dim", "index_topk"):
        need(getattr(a, name) > 0, name, f"must be positive, got {getattr(a, name)}")
    need(len(a.compress_ratios) == a.num_hidden_layers, "compress_ratios",
         f"needs {a.num_hidden_layers} main-layer entries, got {len(a.compress_ratios)}")
    need(len(a.layer_types) == a.num_hidden_layers, "layer_types", f"needs {a.num_hidden_layers} entries")
    for i, (t, r) in enumerate(zip(a.layer_types, a.compress_ratios)):
        need(t in (SWA, CSA, HCA), "layer_types", f"entry {i} = {t!r} is not one of {SWA}, {CSA}, {HCA}")
        need(t == SWA or r >= 2, "compress_ratios", f"entry {i} = {r}: a compressed layer needs a ratio >= 2")
    need(a.qk_rope_head_dim % 2 == 0 and 0 < a.qk_rope_head_dim <= a.head_dim, "qk_rope_head_dim",
         f"= {a.qk_rope_head_dim} must be even and in (0, head_dim={a.head_dim}]")
    need(a.qk_rope_head_dim <= a.index_head_dim, "index_head_dim", f"= {a.index_head_dim} must be >= qk_rope_head_dim")
    need(a.num_attention_heads % a.o_groups == 0, "o_groups",
         f"= {a.o_groups} must divide num_attention_heads = {a.num_attention_heads}")
    need(a.num_experts_per_tok <= a.n_routed_experts, "num_experts_per_tok", "must be <= n_routed_experts")
    need(0 <= a.num_hash_layers <= a.num_hidden_layers, "num_hash_layers", "must be in [0, num_hidden_layers]")
    need(a.scoring_func == "sqrtsoftplus", "scoring_func", f"= {a.scoring_func!r}; DeepSeek-V4 uses 'sqrtsoftplus'")
    need(a.n_shared_experts in (0, 1), "n_shared_experts", f"= {a.n_shared_experts}; ds4f runs 0 or 1")
    need(a.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "ds4f runs 0 or 1 MTP layer")
    need(not a.tie_word_embeddings, "tie_word_embeddings", "must be false (DeepSeek-V4 ships separate embed and head)")
    need(a.linear_format in ("bf16", "fp8"), "quantization_config", f"linear format {a.linear_format!r}")
    need(a.expert_format in ("bf16", "fp8", "fp4"), "expert_dtype", f"format {a.expert_format!r}")
    if a.yarn is not None:
        need(a.yarn.factor >= 1 and a.yarn.original_max_position_embeddings > 0, "rope_scaling",
             f"= {a.yarn} needs factor >= 1 and original_max_position_embeddings > 0")
    need(math.isfinite(a.rope_theta) and a.rope_theta > 1, "rope_theta", "must be a finite base > 1")


def tiny_config() -> dict[str, Any]:
    """config.json of the built-in tiny model: every layer type, hash + learned MoE, small windows so short
    prompts compress (CSA ratio 4, HCA ratio 16) and select (index_topk 4 < entries after 20 tokens)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 129280,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 32,
        "o_groups": 2,
        "o_lora_rank": 32,
        "sliding_window": 8,
        "compress_ratios": [0, 4, 16, 4, 0],
        "layer_types": [SWA, CSA, HCA, CSA],
        "compress_rates": {CSA: 4, HCA: 16},
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576,
        "index_n_heads": 2,
        "index_head_dim": 32,
        "index_topk": 4,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 32,
        "num_hash_layers": 1,
        "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "rms_norm_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }


def flash_config() -> dict[str, Any]:
    """config.json of DeepSeek-V4-Flash as published (for dummy loads and size arithmetic)."""
    ratios = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)] + [0]
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64,
        "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
        "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128, "compress_ratios": ratios,
        "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "n_routed_experts": 256, "num_experts_per_tok": 6,
        "n_shared_experts": 1, "moe_intermediate_size": 2048, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", "expert_dtype": "fp4",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                "scale_fmt": "ue8m0", "activation_scheme": "dynamic"},
    }
