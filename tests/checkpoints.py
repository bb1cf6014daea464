"""Test fixtures: a config dict + seed in, an official-layout checkpoint directory (config.json + safetensors) out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ds4f.model.args import ModelArgs
from ds4f.model.weights import random_checkpoint

QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
                "activation_scheme": "dynamic"}


def checkpoint_config(args_dict: dict[str, Any], *, quantized: bool, scale_fmt: str = "ue8m0") -> dict[str, Any]:
    """The config.json for a fixture: bf16 as given, or Flash's FP8 linears (+ MXFP4 experts when scale_fmt is
    "ue8m0"; FP8 experts with float32 scales, like Flash-Base, when it is "float", HF's name for it)."""
    cfg = {k: v for k, v in args_dict.items() if k not in ("quantization_config", "expert_dtype")}
    if quantized:
        cfg["quantization_config"] = {**QUANT_CONFIG, "scale_fmt": scale_fmt}
        cfg["expert_dtype"] = "fp4" if scale_fmt == "ue8m0" else "fp8"
    return cfg


def write_checkpoint(directory: str | Path, args_dict: dict[str, Any], seed: int, *, quantized: bool,
                     shards: int = 1, scale_fmt: str = "ue8m0",
                     tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors (or `shards` files round-robin + model.safetensors.index.json, so a
    quantized weight and its scale usually land in different shards). `tensors` overrides the random ones."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = checkpoint_config(args_dict, quantized=quantized, scale_fmt=scale_fmt)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    state = tensors if tensors is not None else random_checkpoint(ModelArgs.from_hf(cfg), seed)
    state = {k: v.contiguous() for k, v in state.items()}
    if shards <= 1:
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d
    names = list(state)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return d
