"""⑥ dummy weights: ModelArgs + seed in, random tensors in the official checkpoint layout and formats out (lazily).

Generated on `device`: a CUDA generator draws other numbers than the CPU one for the same seed (identical on every
rank of one machine), but draws and quantizes a full-size V4-Flash in seconds where the CPU took ~0.2 GiB/s."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator

import torch

from ds4f.model.args import ModelArgs
from ds4f.model.manifest import TensorSpec, checkpoint_manifest
from ds4f.model.quant import quant_fp8_block, quant_mxfp4


def _generator(seed: int, name: str, device: str | torch.device = "cpu") -> torch.Generator:
    # one stream per tensor: a tensor's values do not depend on which other tensors were generated before it
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _normal(g: torch.Generator, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32, device=g.device).mul_(std).add_(mean)


def _float_value(name: str, spec: TensorSpec, args: ModelArgs, g: torch.Generator) -> torch.Tensor:
    """The float32 value of a plain (or to-be-quantized) tensor, scaled so activations stay O(1)."""
    shape = spec.shape
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight"):
        return _normal(g, shape, 0.1, 1.0)
    if name == "embed.weight":
        return _normal(g, shape, 1.0)
    if leaf.endswith("_fn"):
        return _normal(g, shape, 1.0 / math.sqrt(shape[1]))
    if leaf.endswith("_base"):
        base = _normal(g, shape, 0.5)
        hc = args.hc_mult
        if shape[0] > hc:  # comb bias leaning towards identity, like a trained residual
            base[2 * hc:] += 2 * torch.eye(hc, device=g.device).flatten()
        return base
    if leaf.endswith("_scale"):
        return _normal(g, shape, 0.2, 1.0)
    if leaf == "attn_sink":
        return _normal(g, shape, 1.0)
    if leaf == "ape":
        return _normal(g, shape, 0.5)
    if leaf == "bias":
        return _normal(g, shape, 0.1)
    if leaf == "weight" and len(shape) == 2:
        # linears (incl. head, router gate, compressors): ~1/sqrt(fan_in); SwiGLU inputs x4 so the clamp is exercised
        in_f = shape[1] * (2 if spec.fmt == "fp4" else 1)
        gain = 4.0 if name.endswith((".w1.weight", ".w3.weight")) else 1.0
        return _normal(g, (shape[0], in_f), gain / math.sqrt(in_f))
    raise KeyError(f"no dummy-weight rule for {name} {spec}")


def _tid2eid(spec: TensorSpec, n_experts: int, g: torch.Generator) -> torch.Tensor:
    """[vocab, k] distinct expert ids per token (the k smallest of random keys = a uniform k-subset)."""
    rows, k = spec.shape
    out = torch.empty(rows, k, dtype=torch.int64, device=g.device)
    step = max(1, (1 << 24) // n_experts)
    for lo in range(0, rows, step):
        keys = torch.rand(min(step, rows - lo), n_experts, generator=g, device=g.device)
        out[lo:lo + step] = keys.topk(k, dim=1, largest=False).indices
    return out


def random_tensors(name: str, spec: TensorSpec, args: ModelArgs, seed: int,
                   scale_spec: TensorSpec | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`name` (and, for a quantized weight, its `.scale`) as stored in the checkpoint, on `device`."""
    g = _generator(seed, name, device)
    if spec.fmt == "i64":
        return {name: _tid2eid(spec, args.n_routed_experts, g)}
    value = _float_value(name, spec, args, g)
    if spec.fmt in ("bf16", "f32"):
        return {name: value.to(spec.dtype)}
    scale_name = name.removesuffix(".weight") + ".scale"
    if spec.fmt == "fp8":
        fmt = "ue8m0" if scale_spec is None or scale_spec.dtype != torch.float32 else "float32"
        q, s = quant_fp8_block(value, fmt)
    elif spec.fmt == "fp4":
        q, s = quant_mxfp4(value)
    else:
        raise KeyError(f"{name}: cannot generate format {spec.fmt!r}")
    return {name: q, scale_name: s}


def iter_random_checkpoint(args: ModelArgs, seed: int = 0,
                           manifest: dict[str, TensorSpec] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every checkpoint tensor, one (weight + scale pair) at a time, in manifest order.
    Deterministic in `seed`; nothing is kept, so a 284B-parameter config streams in bounded memory."""
    manifest = manifest if manifest is not None else checkpoint_manifest(args)
    for name, spec in manifest.items():
        if spec.fmt == "scale":
            continue  # produced with its weight
        scale_spec = manifest.get(name.removesuffix(".weight") + ".scale")
        yield from random_tensors(name, spec, args, seed, scale_spec).items()


def random_checkpoint(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole random checkpoint in memory (small configs only; use iter_random_checkpoint for big ones)."""
    return dict(iter_random_checkpoint(args, seed))
