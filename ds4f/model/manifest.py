"""⑥ checkpoint manifest: ModelArgs in, every tensor of the official layout (name -> shape, dtype, format) out;
and safetensors files in, their headers checked against it (CheckpointError naming each bad tensor)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ds4f.model.args import CSA, HCA, ModelArgs
from ds4f.model.quant import E8M0_DTYPE, FP8_BLOCK, FP8_DTYPE, MXFP4_BLOCK

# fmt values: "bf16" / "f32" plain floats, "i64" integer table, "fp8" / "fp4" packed weights, "scale" their scales
PLAIN_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    fmt: str
    of_fp8: bool = False  # a `.scale` of an FP8 block-scaled weight (not of MXFP4)

    def accepts(self, dtype: torch.dtype) -> bool:
        """Whether a file tensor of `dtype` can stand for this spec (the loader converts plain floats)."""
        if self.fmt in ("bf16", "f32"):
            return dtype in PLAIN_FLOATS
        if self.fmt == "i64":
            return dtype in (torch.int64, torch.int32)
        if self.fmt == "fp4":
            return dtype in (torch.int8, torch.uint8)
        if self.fmt == "scale":
            # the stored dtype says how to decode: UE8M0 bytes (or raw u8) / float32 (FP8 block scales only)
            return dtype in (E8M0_DTYPE, torch.uint8) or (dtype == torch.float32 and self.of_fp8)
        return dtype == self.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Builder:
    def __init__(self, args: ModelArgs):
        self.args = args
        self.out: dict[str, TensorSpec] = {}
        self.scale_dtype = E8M0_DTYPE if args.scale_format == "ue8m0" else torch.float32

    def plain(self, name: str, shape: tuple[int, ...], fmt: str = "bf16") -> None:
        dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "i64": torch.int64}[fmt]
        self.out[name] = TensorSpec(tuple(shape), dtype, fmt)

    def linear(self, prefix: str, out_f: int, in_f: int, fmt: str) -> None:
        """`prefix.weight` (+ `prefix.scale`) of a linear stored as fmt ("bf16" | "fp8" | "fp4")."""
        if fmt == "bf16":
            self.plain(f"{prefix}.weight", (out_f, in_f))
        elif fmt == "fp8":
            self.out[f"{prefix}.weight"] = TensorSpec((out_f, in_f), FP8_DTYPE, "fp8")
            self.out[f"{prefix}.scale"] = TensorSpec((_cdiv(out_f, FP8_BLOCK), _cdiv(in_f, FP8_BLOCK)),
                                                     self.scale_dtype, "scale", of_fp8=True)
        elif fmt == "fp4":
            # Flash ships MXFP4 scales as UE8M0 whatever the FP8 linears use
            self.out[f"{prefix}.weight"] = TensorSpec((out_f, in_f // 2), torch.int8, "fp4")
            self.out[f"{prefix}.scale"] = TensorSpec((out_f, _cdiv(in_f, MXFP4_BLOCK)), E8M0_DTYPE, "scale")
        else:
            raise ValueError(f"{prefix}: unknown linear format {fmt!r}")

    def hc(self, name: str, n_mix: int) -> None:
        a = self.args
        self.plain(f"{name}_fn", (n_mix, a.hc_mult * a.hidden_size), "f32")
        self.plain(f"{name}_base", (n_mix,), "f32")

    def block(self, p: str, layer: int) -> None:
        """One decoder block (main layer or MTP) under prefix p ('layers.3.' / 'mtp.0.')."""
        a = self.args
        D, hd, lin = a.hidden_size, a.head_dim, a.linear_format
        mix = (2 + a.hc_mult) * a.hc_mult
        for site in ("attn", "ffn"):
            self.hc(f"{p}hc_{site}", mix)
            self.plain(f"{p}hc_{site}_scale", (3,), "f32")
        self.plain(f"{p}attn_norm.weight", (D,))
        self.plain(f"{p}ffn_norm.weight", (D,))
        at = f"{p}attn."
        self.linear(f"{at}wq_a", a.q_lora_rank, D, lin)
        self.plain(f"{at}q_norm.weight", (a.q_lora_rank,))
        self.linear(f"{at}wq_b", a.num_attention_heads * hd, a.q_lora_rank, lin)
        self.linear(f"{at}wkv", hd, D, lin)
        self.plain(f"{at}kv_norm.weight", (hd,))
        self.linear(f"{at}wo_a", a.o_groups * a.o_lora_rank, a.num_attention_heads * hd // a.o_groups, lin)
        self.linear(f"{at}wo_b", D, a.o_groups * a.o_lora_rank, lin)
        self.plain(f"{at}attn_sink", (a.num_attention_heads,), "f32")
        kind = a.layer_type(layer)
        if kind in (CSA, HCA):
            m, c = a.compress_ratio(layer), (2 if kind == CSA else 1)
            self.compressor(f"{at}compressor.", m, c, hd)
        if kind == CSA:
            ih = a.index_n_heads * a.index_head_dim
            self.linear(f"{at}indexer.wq_b", ih, a.q_lora_rank, lin)
            self.plain(f"{at}indexer.weights_proj.weight", (a.index_n_heads, D))
            self.compressor(f"{at}indexer.compressor.", a.compress_ratio(layer), 2, a.index_head_dim)
        ff = f"{p}ffn."
        E, I = a.n_routed_experts, a.moe_intermediate_size
        self.plain(f"{ff}gate.weight", (E, D))
        if a.is_hash_layer(layer):
            self.plain(f"{ff}gate.tid2eid", (a.vocab_size, a.num_experts_per_tok), "i64")
        else:
            self.plain(f"{ff}gate.bias", (E,), "f32")
        if a.n_shared_experts:
            Is = I * a.n_shared_experts
            self.linear(f"{ff}shared_experts.w1", Is, D, lin)
            self.linear(f"{ff}shared_experts.w2", D, Is, lin)
            self.linear(f"{ff}shared_experts.w3", Is, D, lin)
        for e in range(E):
            self.linear(f"{ff}experts.{e}.w1", I, D, a.expert_format)
            self.linear(f"{ff}experts.{e}.w2", D, I, a.expert_format)
            self.linear(f"{ff}experts.{e}.w3", I, D, a.expert_format)

    def compressor(self, p: str, ratio: int, c: int, width: int) -> None:
        D = self.args.hidden_size
        self.plain(f"{p}wkv.weight", (c * width, D))
        self.plain(f"{p}wgate.weight", (c * width, D))
        self.plain(f"{p}ape", (ratio, c * width), "f32")
        self.plain(f"{p}norm.weight", (width,))

    def head(self, p: str) -> None:
        self.hc(f"{p}hc_head", self.args.hc_mult)
        self.plain(f"{p}hc_head_scale", (1,), "f32")


def checkpoint_manifest(args: ModelArgs) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for `args`, in a stable order (globals, layers, MTP)."""
    a = args
    b = _Builder(a)
    D = a.hidden_size
    b.plain("embed.weight", (a.vocab_size, D))
    for i in range(a.num_hidden_layers):
        b.block(f"layers.{i}.", i)
    b.plain("norm.weight", (D,))
    b.plain("head.weight", (a.vocab_size, D))
    b.head("")
    for k in range(a.num_nextn_predict_layers):
        p = f"mtp.{k}."
        b.block(p, a.num_hidden_layers + k)
        b.linear(f"{p}e_proj", D, D, a.linear_format)
        b.linear(f"{p}h_proj", D, D, a.linear_format)
        b.plain(f"{p}enorm.weight", (D,))
        b.plain(f"{p}hnorm.weight", (D,))
        b.plain(f"{p}norm.weight", (D,))
        b.head(p)
    return b.out


def quantized_linears(manifest: dict[str, TensorSpec]) -> dict[str, str]:
    """Linear prefix -> "fp8" | "fp4" for every quantized linear (the ones with a `.scale`)."""
    return {n.removesuffix(".weight"): s.fmt for n, s in manifest.items() if s.fmt in ("fp8", "fp4")}


def manifest_bytes(manifest: dict[str, TensorSpec]) -> int:
    return sum(s.nbytes for s in manifest.values())


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
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
