"""⑥ weight loading: a model name + load format (+ TP rank / world) in, a Transformer with checkpoint (or dummy)
weights out.

Files are checked against the manifest from their headers before any data is read. Then the shards are streamed:
one file open at a time, each tensor read (under TP only this rank's rows / columns, via safetensors get_slice),
moved to the target device and dropped, so host memory holds about one shard's pages plus one tensor, never the
model. The model is built on the meta device (and sharded there under TP), then allocated on the target device
(keep_dequantized=True) or left on meta with each parameter created when its tensor arrives (packed-only).
Quantized pairs (weight + `.scale`, possibly in different shards) wait on the target device and are dequantized
there.

What a quantized linear (checkpoint fmt "fp8" e4m3 + 128x128 block scales, or "fp4" MXFP4) holds after load_model:
- keep_dequantized=True (default, the reference model path): `weight` = the dequantized [out, in] in the compute
  dtype, plus `packed_weight` / `packed_scale` = the tensors as shipped (fp4 packed bytes as uint8, scales in their
  stored dtype: float8_e8m0fnu or float32).
- keep_dequantized=False (for the quantized kernels): only `packed_weight` / `packed_scale`; `weight` stays a meta
  tensor (right shape and dtype, no storage), so nothing ever holds a bf16 copy and a dense forward fails loudly.
- Either mode, under TP: a linear whose rank cut falls off its scale-block grid (tiny test configs only; never
  V4-Flash at TP 2/4/8) cannot keep exact packed tensors: it gets the dequantized slice and no packed ones, as
  shard_model does.
Plain tensors (bf16 / f32 / i64 in the checkpoint) are always materialized in the model's parameter dtype.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ds4f.model.hub import ResolvedModel, resolve_model
from ds4f.model.manifest import (  # noqa: F401 (FileTensor, read_header: re-exported)
    _MAX_LISTED,
    CheckpointError,
    FileTensor,
    TensorSpec,
    _dtype_name,
    checkpoint_files,
    checkpoint_manifest,
    read_header,
    read_headers,
    validate,
)
from ds4f.model.quant import FP8_BLOCK, MXFP4_BLOCK, dequantize
from ds4f.model.tp import rank_slice, shard_model
from ds4f.model.weights import random_tensors

if TYPE_CHECKING:
    from ds4f.model.deepseek_v4 import Transformer

logger = logging.getLogger("ds4f")

LOAD_FORMATS = ("auto", "safetensors", "dummy")
_QUANT = ("fp8", "fp4")


@dataclass
class LoadStats:
    tensors: int = 0
    nbytes: int = 0  # bytes read (under TP: this rank's slices)
    formats: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    source: str = ""

    def line(self) -> str:
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items()))
        return (f"loaded {self.tensors} tensors ({self.nbytes / 2**30:.3f} GiB; {fmts}) from {self.source} "
                f"in {self.seconds:.2f} s")


@dataclass(frozen=True)
class LoadedTensor:
    """One model tensor: `name` is its state_dict key and `shape` its (local) shape. For a quantized linear, value is
    the dequantized `X.weight` (None when packed-only) and packed / scale the tensors as shipped (None when the TP
    cut is off their block grid)."""
    name: str
    value: torch.Tensor | None
    fmt: str
    shape: tuple[int, ...]
    packed: torch.Tensor | None = None
    scale: torch.Tensor | None = None


@dataclass(frozen=True)
class Cut:
    """Rows (dim 0) or columns (dim 1) [lo, hi) of a stored tensor: the part one TP rank reads."""
    dim: int
    lo: int
    hi: int


# ------------------------------------------------------------------------------------------- progress

class Progress:
    """Bytes over shards: a tqdm bar when tqdm is installed and stderr is a terminal, else one stderr line every
    `every` seconds (nothing for a load shorter than that)."""

    def __init__(self, total: int, desc: str, every: float = 10.0) -> None:
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.t0 = self.last = time.perf_counter()
        self.bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

    def update(self, nbytes: int, where: str = "") -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9) / 2**30
            print(f"[ds4f] {self.desc}: {self.done / 2**30:.1f} / {self.total / 2**30:.1f} GiB "
                  f"({100 * self.done / max(self.total, 1):.0f}%, {rate:.2f} GiB/s) {where}", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------- what a rank reads

Reader = Callable[[Cut | None], torch.Tensor]


def _covering(fmt: str, dim: int, start: int, stop: int, full: int) -> tuple[int, int, int]:
    """Logical range [a, b) on the scale-block grid that covers [start, stop) of a quantized linear, and the block."""
    block = FP8_BLOCK if fmt == "fp8" else (MXFP4_BLOCK if dim == 1 else 1)
    return start // block * block, min(-(-stop // block) * block, full), block


def _logical(manifest: dict[str, TensorSpec], prefix: str) -> tuple[int, int]:
    w = manifest[f"{prefix}.weight"]
    return w.shape[0], w.shape[1] * (2 if w.fmt == "fp4" else 1)


def file_cut(name: str, manifest: dict[str, TensorSpec], rank: int, world: int) -> Cut | None:
    """The part of stored tensor `name` that TP rank `rank` reads (None: all of it). A quantized weight and its
    scale are read on their block grid around the rank's logical slice (tp.rank_slice)."""
    spec = manifest[name]
    if spec.fmt not in (*_QUANT, "scale"):
        s = rank_slice(name, spec.shape, rank, world)
        return None if s is None else Cut(s[0], s[1], min(s[2], spec.shape[s[0]]))
    prefix = name.rpartition(".")[0]
    wfmt, logical = manifest[f"{prefix}.weight"].fmt, _logical(manifest, prefix)
    s = rank_slice(f"{prefix}.weight", logical, rank, world)
    if s is None:
        return None
    dim, start, stop = s
    a, b, block = _covering(wfmt, dim, start, stop, logical[dim])
    if spec.fmt == "scale":
        return Cut(dim, a // block, -(-b // block))
    return Cut(dim, a // 2, b // 2) if wfmt == "fp4" and dim == 1 else Cut(dim, a, b)


def _narrow(t: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    return t if cut is None else t.narrow(cut.dim, cut.lo, cut.hi - cut.lo).contiguous()


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, Reader]]:
    """(name, reader) for each tensor of each shard in turn; one shard open at a time. reader(cut) reads only the
    cut's rows / columns from the file."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                def read(cut: Cut | None, name: str = name) -> torch.Tensor:
                    if cut is None:
                        return f.get_tensor(name)
                    sl = f.get_slice(name)
                    t = sl[cut.lo:cut.hi] if cut.dim == 0 else sl[:, cut.lo:cut.hi]
                    # NOTE: safetensors 0.8 slices a view of the whole tensor: keep only the slice's bytes
                    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t
                yield name, read


def iter_dummy(resolved: ResolvedModel, seed: int, manifest: dict[str, TensorSpec],
               device: torch.device | None = None) -> Iterator[tuple[str, Reader]]:
    """Dummy weights, one tensor (weight + scale pair) generated at a time (on CUDA when the target is: see
    ds4f/model/weights.py); a rank keeps only its cut."""
    gen = device if device is not None and device.type == "cuda" else torch.device("cpu")
    for name, spec in manifest.items():
        if spec.fmt == "scale":
            continue  # produced with its weight
        scale_spec = manifest.get(name.removesuffix(".weight") + ".scale")
        for n, t in random_tensors(name, spec, resolved.args, seed, scale_spec, gen).items():
            yield n, lambda cut, t=t: _narrow(t, cut)


# ------------------------------------------------------------------------------------------- assembling

@dataclass(frozen=True)
class _Opts:
    dtype: torch.dtype
    device: torch.device
    rank: int = 0
    world: int = 1
    keep_dequantized: bool = True


def _finish_linear(prefix: str, fmt: str, w: torch.Tensor, s: torch.Tensor, manifest: dict[str, TensorSpec],
                   o: _Opts) -> LoadedTensor:
    """A quantized pair as read (its rank's covering block range) -> the model tensor."""
    logical = _logical(manifest, prefix)
    name = f"{prefix}.weight"
    if fmt == "fp4":
        w = w.view(torch.uint8)
    sl = rank_slice(name, logical, o.rank, o.world)
    if sl is None:
        value = dequantize(fmt, w, s, o.dtype, name=name) if o.keep_dequantized else None
        return LoadedTensor(name, value, fmt, logical, packed=w, scale=s)
    dim, start, stop = sl
    a, b, _ = _covering(fmt, dim, start, stop, logical[dim])
    shape = tuple(stop - start if d == dim else n for d, n in enumerate(logical))
    if (a, b) == (start, stop):
        value = dequantize(fmt, w, s, o.dtype, name=name) if o.keep_dequantized else None
        return LoadedTensor(name, value, fmt, shape, packed=w, scale=s)
    value = dequantize(fmt, w, s, o.dtype, name=name).narrow(dim, start - a, stop - start).contiguous()
    return LoadedTensor(name, value, fmt, shape)


def _pad_rows(t: torch.Tensor, name: str, manifest: dict[str, TensorSpec], o: _Opts) -> torch.Tensor:
    """The vocab-parallel head's last rank holds rows past the vocab: zeros."""
    s = rank_slice(name, manifest[name].shape, o.rank, o.world)
    if s is None or t.shape[0] == s[2] - s[1]:
        return t
    out = torch.zeros(s[2] - s[1], *t.shape[1:], dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


def assemble(stream: Iterable[tuple[str, Reader]], manifest: dict[str, TensorSpec], o: _Opts, stats: LoadStats,
             progress: Progress | None = None) -> Iterator[LoadedTensor]:
    """Checkpoint tensors -> model tensors on o.device; a quantized weight waits (on the device) for its `.scale`,
    possibly in another shard."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, read in stream:
        spec = manifest[name]
        t = read(file_cut(name, manifest, o.rank, o.world)).to(o.device)
        stats.tensors += 1
        stats.nbytes += t.numel() * t.element_size()
        stats.formats[spec.fmt if spec.fmt != "scale" else f"{_dtype_name(t.dtype)} scale"] += 1
        if progress is not None:
            progress.update(spec.nbytes, name)
        if spec.fmt not in (*_QUANT, "scale"):
            if name.startswith("head."):
                t = _pad_rows(t, name, manifest, o)
            yield LoadedTensor(name, t, spec.fmt, tuple(t.shape))
            continue
        prefix, _, leaf = name.rpartition(".")
        pair = pending.setdefault(prefix, {})
        pair[leaf] = t
        if len(pair) == 2:
            del pending[prefix]
            fmt = manifest[f"{prefix}.weight"].fmt
            yield _finish_linear(prefix, fmt, pair["weight"], pair["scale"], manifest, o)
    if pending:
        raise CheckpointError(f"quantized weights without a scale or scales without a weight: {sorted(pending)}")


def iter_checkpoint(resolved: ResolvedModel, *, dtype: torch.dtype, load_format: str = "auto", seed: int = 0,
                    stats: LoadStats | None = None, device: str | torch.device = "cpu", tp_rank: int = 0,
                    tp_world: int = 1, keep_dequantized: bool = True, progress: bool = False,
                    ) -> Iterator[LoadedTensor]:
    """Validated model tensors of `resolved` (files) or its dummy weights, on `device`, cut for TP rank `tp_rank` of
    `tp_world` (tp.rank_slice); quantized linears dequantized to `dtype` unless keep_dequantized=False."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r}: expected one of {', '.join(LOAD_FORMATS)}")
    stats = stats if stats is not None else LoadStats()
    manifest = checkpoint_manifest(resolved.args)
    opts = _Opts(dtype, torch.device(device), tp_rank, tp_world, keep_dequantized)
    tp = f", TP rank {tp_rank}/{tp_world}" if tp_world > 1 else ""
    if load_format == "dummy" or (load_format == "auto" and resolved.path is None):
        stats.source = f"dummy weights (seed {seed}{tp})"
        stream: Iterator[tuple[str, Reader]] = iter_dummy(resolved, seed, manifest, opts.device)
        desc = "Generating dummy weights"
    else:
        if resolved.path is None:
            raise ValueError("load_format 'safetensors' needs a checkpoint directory; the built-in tiny model has "
                             "no files (use load_format 'auto' or 'dummy')")
        files = checkpoint_files(resolved.path)
        validate(read_headers(files), manifest, str(resolved.path))
        stats.source = f"{resolved.path} ({len(files)} file{'s' if len(files) > 1 else ''}{tp})"
        stream = iter_safetensors(files)
        desc = "Loading safetensors"
    bar = Progress(sum(s.nbytes for s in manifest.values()), desc + tp) if progress else None
    try:
        yield from assemble(stream, manifest, opts, stats, bar)
    finally:
        if bar is not None:
            bar.close()


def load_state_dict(model: str | None, *, dtype: torch.dtype, load_format: str = "auto",
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(state_dict in model key names with quantized weights dequantized to `dtype`, {linear prefix: (packed, scale)}).
    Plain tensors keep their stored dtype. Whole model in host memory: for tests and small models."""
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in iter_checkpoint(resolve_model(model), dtype=dtype, load_format=load_format, seed=seed):
        assert t.value is not None
        state[t.name] = t.value
        if t.packed is not None and t.scale is not None:
            packed[t.name.removesuffix(".weight")] = (t.packed, t.scale)
    return state, packed


# ------------------------------------------------------------------------------------------- into the model

def _put(model: nn.Module, t: LoadedTensor, device: torch.device) -> None:
    """Copy the tensor into its parameter / buffer, or create that on `device` (in the model's dtype) when it is
    still a meta placeholder."""
    prefix, _, leaf = t.name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    is_param = leaf in module._parameters
    target = module._parameters[leaf] if is_param else module._buffers.get(leaf)
    if target is None:
        raise CheckpointError(f"checkpoint tensor {t.name} has no parameter or buffer in the model")
    if tuple(target.shape) != t.shape:
        raise CheckpointError(f"checkpoint tensor {t.name} has shape {list(t.shape)} but the model's is "
                              f"{list(target.shape)}")
    if t.value is not None and not target.is_meta:
        with torch.no_grad():
            target.copy_(t.value)
    elif t.value is not None:
        v = t.value.to(device=device, dtype=target.dtype)
        if is_param:
            module._parameters[leaf] = nn.Parameter(v, requires_grad=False)
        else:
            module._buffers[leaf] = v
    if t.fmt in _QUANT:
        module.packed_weight = t.packed.to(device) if t.packed is not None else None
        module.packed_scale = t.scale.to(device) if t.scale is not None else None


def fill_model(model: nn.Module, tensors: Iterable[LoadedTensor], device: torch.device) -> None:
    """Put every tensor into `model` (built on meta or materialized); every persistent parameter and buffer must be
    filled exactly once, and nothing but packed-only linear weights may stay on meta."""
    expected = set(model.state_dict().keys())
    seen: set[str] = set()
    for t in tensors:
        _put(model, t, device)
        seen.add(t.name)
    unfilled = sorted(expected - seen)
    if unfilled:
        raise CheckpointError(f"the model has {len(unfilled)} parameters the checkpoint does not fill: "
                              f"{', '.join(unfilled[:_MAX_LISTED])}")
    for name, p in [*model.named_parameters(), *model.named_buffers()] if device.type != "meta" else []:
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if p.is_meta and getattr(owner, "packed_weight", None) is None:
            raise CheckpointError(f"{name} was never materialized")


def load_model(model: str | None, *, dtype: torch.dtype, device: str = "cpu", load_format: str = "auto",
               seed: int = 0, tp_rank: int = 0, tp_world: int = 1, comm: Any = None,
               keep_dequantized: bool = True) -> Transformer:
    """Build the Transformer for `model` (None / "ds4f-tiny" / directory / cached HF repo id) and load its weights.

    tp_world > 1: the model is built on meta, sharded there by tp.shard_model (local head / group counts, hooks,
    `tp_comm` = comm), and each parameter is created from only this rank's slice of its checkpoint tensor.
    keep_dequantized=False: quantized linears keep only their packed tensors (see the module docstring).
    """
    from ds4f.model.deepseek_v4 import Transformer

    t0 = time.perf_counter()
    resolved = resolve_model(model)
    dev = torch.device(device)
    if tp_world > 1 and comm is None:
        raise ValueError(f"load_model: tp_world {tp_world} needs the rank's Comm")
    stats = LoadStats()
    tensors = iter_checkpoint(resolved, dtype=dtype, load_format=load_format, seed=seed, stats=stats, device=dev,
                              tp_rank=tp_rank, tp_world=tp_world, keep_dequantized=keep_dequantized,
                              progress=True)
    first = next(tensors, None)  # validation errors surface before the model is built
    net = Transformer(resolved.args, dtype=dtype, device="meta")
    if comm is not None:
        shard_model(net, tp_rank, tp_world, comm)
    if keep_dequantized:  # every tensor gets a dense home: allocate them up front (less host fragmentation on CPU)
        net.to_empty(device=dev)
    fill_model(net, itertools.chain([first] if first is not None else [], tensors), dev)
    net.eval()
    stats.seconds = time.perf_counter() - t0
    logger.info("%s", stats.line())
    return net
