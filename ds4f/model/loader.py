"""⑥ weight loading: a model name + load format in, a Transformer with checkpoint (or dummy) weights out.

Files are checked against the manifest from their headers before any data is read; shards are then read one at a
time; FP8 / MXFP4 linears are dequantized on CPU into Linear.weight and their packed tensors kept alongside.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ds4f.model.hub import ResolvedModel, resolve_model
from ds4f.model.manifest import TensorSpec, checkpoint_manifest
from ds4f.model.quant import dequantize
from ds4f.model.weights import iter_random_checkpoint

if TYPE_CHECKING:
    from ds4f.model.deepseek_v4 import Transformer

logger = logging.getLogger("ds4f")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
LOAD_FORMATS = ("auto", "safetensors", "dummy")
_ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """Checkpoint files that do not match the config's manifest; the message names each bad tensor."""


@dataclass(frozen=True)
class FileTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # str: a safetensors dtype ds4f has no torch type for
    file: Path


@dataclass
class LoadStats:
    tensors: int = 0
    nbytes: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    source: str = ""

    def line(self) -> str:
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        return (f"loaded {self.tensors} tensors ({self.nbytes / 2**30:.3f} GiB; {fmts}) from {self.source} "
                f"in {self.seconds:.2f} s")


@dataclass(frozen=True)
class LoadedTensor:
    """One model tensor: `name` is its state_dict key; for a quantized linear value is the dequantized
    `X.weight` and packed / scale the tensors as shipped."""
    name: str
    value: torch.Tensor
    fmt: str
    packed: torch.Tensor | None = None
    scale: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------- files and headers

def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory, in load order."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: 'weight_map' is missing or empty")
        files = [path / f for f in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(absent)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors files")
    return found


def read_header(file: Path) -> dict[str, FileTensor]:
    """Tensor names, shapes and dtypes of one safetensors file, from its JSON header only."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: FileTensor(tuple(v["shape"]), _ST_DTYPES.get(v["dtype"], v["dtype"]), file) for k, v in header.items()}


def read_headers(files: Iterable[Path]) -> dict[str, FileTensor]:
    out: dict[str, FileTensor] = {}
    for file in files:
        for name, t in read_header(file).items():
            if name in out:
                raise CheckpointError(f"tensor {name} is stored twice: in {out[name].file} and {file}")
            out[name] = t
    return out


def _dtype_name(d: torch.dtype | str) -> str:
    return str(d).removeprefix("torch.")


def validate(found: dict[str, FileTensor], manifest: dict[str, TensorSpec], where: str) -> None:
    """Raise CheckpointError naming every missing, extra, misshapen or mistyped tensor (expected shape/dtype)."""
    problems: list[str] = []
    for name, spec in manifest.items():
        want = f"expected shape {list(spec.shape)} dtype {_dtype_name(spec.dtype)}"
        t = found.get(name)
        if t is None:
            problems.append(f"missing tensor {name} ({want})")
        elif t.shape != spec.shape:
            problems.append(f"tensor {name} has shape {list(t.shape)}, {want} (in {t.file.name})")
        elif isinstance(t.dtype, str) or not spec.accepts(t.dtype):
            problems.append(f"tensor {name} has dtype {_dtype_name(t.dtype)}, {want} (in {t.file.name})")
    for name in sorted(set(found) - set(manifest)):
        t = found[name]
        problems.append(f"unexpected tensor {name} (shape {list(t.shape)} dtype {_dtype_name(t.dtype)}, in "
                        f"{t.file.name}) is not part of this config's checkpoint")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CheckpointError(f"checkpoint {where} does not match its config.json ({len(problems)} problems):\n  "
                              + "\n  ".join(problems[:_MAX_LISTED]) + more)


def iter_safetensors(files: list[Path], total: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from each shard in turn; one shard open at a time."""
    from safetensors import safe_open

    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=None) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)
                    bar.update(1)


# ------------------------------------------------------------------------------------------- assembling

def assemble(stream: Iterable[tuple[str, torch.Tensor]], manifest: dict[str, TensorSpec], dtype: torch.dtype,
             stats: LoadStats) -> Iterator[LoadedTensor]:
    """Checkpoint tensors -> model tensors; a quantized weight waits for its `.scale` (possibly in another shard)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in stream:
        spec = manifest[name]
        stats.tensors += 1
        stats.nbytes += t.numel() * t.element_size()
        stats.formats[spec.fmt if spec.fmt != "scale" else f"{_dtype_name(t.dtype)} scale"] += 1
        if spec.fmt not in ("fp8", "fp4", "scale"):
            yield LoadedTensor(name, t, spec.fmt)
            continue
        prefix, _, leaf = name.rpartition(".")
        pair = pending.setdefault(prefix, {})
        pair[leaf] = t
        if len(pair) == 2:
            del pending[prefix]
            fmt = manifest[f"{prefix}.weight"].fmt
            value = dequantize(fmt, pair["weight"], pair["scale"], dtype, name=f"{prefix}.weight")
            yield LoadedTensor(f"{prefix}.weight", value, fmt, packed=pair["weight"], scale=pair["scale"])
    if pending:
        raise CheckpointError(f"quantized weights without a scale or scales without a weight: {sorted(pending)}")


def iter_checkpoint(resolved: ResolvedModel, *, dtype: torch.dtype, load_format: str = "auto", seed: int = 0,
                    stats: LoadStats | None = None) -> Iterator[LoadedTensor]:
    """Validated, dequantized model tensors of `resolved` (files) or its dummy weights."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    stats = stats if stats is not None else LoadStats()
    manifest = checkpoint_manifest(resolved.args)
    if load_format == "dummy" or (load_format == "auto" and resolved.path is None):
        stats.source = f"dummy weights (seed {seed})"
        yield from assemble(iter_random_checkpoint(resolved.args, seed, manifest), manifest, dtype, stats)
        return
    if resolved.path is None:
        raise ValueError("load_format 'safetensors' needs a checkpoint directory; the built-in tiny model has no "
                         "files (use load_format 'auto' or 'dummy')")
    files = checkpoint_files(resolved.path)
    found = read_headers(files)
    validate(found, manifest, str(resolved.path))
    stats.source = f"{resolved.path} ({len(files)} file{'s' if len(files) > 1 else ''})"
    yield from assemble(iter_safetensors(files, len(found)), manifest, dtype, stats)


def load_state_dict(model: str | None, *, dtype: torch.dtype, load_format: str = "auto",
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(state_dict in model key names with quantized weights dequantized to `dtype`, {linear prefix: (packed, scale)}).
    Plain tensors keep their stored dtype."""
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in iter_checkpoint(resolve_model(model), dtype=dtype, load_format=load_format, seed=seed):
        state[t.name] = t.value
        if t.packed is not None and t.scale is not None:
            packed[t.name.removesuffix(".weight")] = (t.packed, t.scale)
    return state, packed


# ------------------------------------------------------------------------------------------- into the model

def _put(model: torch.nn.Module, t: LoadedTensor, device: torch.device) -> None:
    prefix, _, leaf = t.name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    target = module._parameters.get(leaf)
    if target is None:
        target = module._buffers.get(leaf)
    if target is None:
        raise CheckpointError(f"checkpoint tensor {t.name} has no parameter or buffer in the model")
    if tuple(target.shape) != tuple(t.value.shape):
        raise CheckpointError(f"checkpoint tensor {t.name} has shape {list(t.value.shape)} but the model's is "
                              f"{list(target.shape)}")
    with torch.no_grad():
        target.copy_(t.value)
    if t.packed is not None:
        module.packed_weight = t.packed.to(device)
        module.packed_scale = t.scale.to(device) if t.scale is not None else None


def fill_model(model: torch.nn.Module, tensors: Iterable[LoadedTensor], device: torch.device) -> None:
    """Copy every tensor into `model`; every persistent parameter and buffer must be filled exactly once."""
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for t in tensors:
        _put(model, t, device)
        seen.add(t.name)
    unfilled = sorted(expected - seen)
    if unfilled:
        raise CheckpointError(f"the model has {len(unfilled)} parameters the checkpoint does not fill: "
                              f"{', '.join(unfilled[:_MAX_LISTED])}")


def load_model(model: str | None, *, dtype: torch.dtype, device: str = "cpu", load_format: str = "auto",
               seed: int = 0) -> Transformer:
    """Build the Transformer for `model` (None / "ds4f-tiny" / directory / cached HF repo id) and load its weights."""
    from ds4f.model.deepseek_v4 import Transformer

    t0 = time.perf_counter()
    resolved = resolve_model(model)
    dev = torch.device(device)
    stats = LoadStats()
    tensors = iter_checkpoint(resolved, dtype=dtype, load_format=load_format, seed=seed, stats=stats)
    first = next(tensors, None)  # validation errors surface before the model is allocated
    net = Transformer(resolved.args, dtype=dtype, device=dev)
    fill_model(net, itertools.chain([first] if first is not None else [], tensors), dev)
    net.eval()
    stats.seconds = time.perf_counter() - t0
    logger.info("%s", stats.line())
    return net

