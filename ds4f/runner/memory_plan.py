"""⑤ memory plan: model args + serving limits (TP size, max_num_seqs, max_num_batched_tokens, block size, KV dtype,
GPU memory, gpu_memory_utilization) in, a per-rank table (weights, KV pool, activation peak, CUDA graphs, NCCL,
free) and the KV capacity out.

The capacity always comes from CacheLayout.plan on the KV budget, the same call the runner makes, so the tokens
printed are the tokens the scheduler admits. Two entry points:
- `plan_memory` (offline estimate, also the CLI below): weights counted exactly from the model built on the meta
  device and sharded by tp.shard_model; activation / graphs / NCCL / CUDA context are estimates.
- `runtime_table` (build_runner): measured weights, warmup peak and memory in use, and the runner's own plan.

    python3 -m ds4f.runner.memory_plan --model flash --tp 2 --kv-cache-dtype fp8 --request-tokens 1048576
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ds4f.cache.manager import CacheLayout
from ds4f.model.args import ModelArgs

GiB = 2**30
H200_BYTES = 150_110_011_392  # torch.cuda.mem_get_info total of one H200 (141 GB class)
CUDA_CONTEXT = GiB // 2  # context + cuBLAS workspaces, per process (estimate)
NCCL_PER_PEER = 256 * 2**20  # 32 channels x 2 x 4 MiB NCCL_BUFFSIZE per peer (estimate)
GRAPH_TOKENS = 512  # largest decode batch captured in CUDA graphs; the pool is shared by the captured sizes


@dataclass(frozen=True)
class Row:
    name: str
    nbytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    rows: tuple[Row, ...]  # in table order; "free" last
    usable: int  # gpu total x gpu_memory_utilization (CPU: weights + KV budget)
    kv_budget: int  # bytes handed to CacheLayout.plan
    num_blocks: int
    num_slots: int
    block_size: int
    usable_note: str = "gpu total x gpu_memory_utilization"

    @property
    def max_kv_tokens(self) -> int:
        """Context one sequence can reach: what KVCacheManager admits (num_blocks x block_size)."""
        return self.num_blocks * self.block_size

    def fits(self, tokens: int) -> bool:
        return self.num_slots >= 1 and tokens <= self.max_kv_tokens and self.row("free").nbytes >= 0

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def table(self, title: str = "memory plan (per GPU)") -> str:
        w = max(len(r.name) for r in self.rows)
        lines = [title, f"  {'':{w}}  {'GiB':>8}"]
        lines += [f"  {r.name:{w}}  {r.nbytes / GiB:8.2f}  {r.note}".rstrip() for r in self.rows]
        lines.append(f"  {'usable':{w}}  {self.usable / GiB:8.2f}  {self.usable_note}")
        lines.append(f"  KV capacity admitted: {self.max_kv_tokens} tokens ({self.num_blocks} blocks of "
                     f"{self.block_size}), {self.num_slots} sequence slots")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- estimates

def module_bytes(args: ModelArgs, dtype: torch.dtype, tp_world: int = 1, keep_dequantized: bool = False,
                 buffers: bool = True) -> Iterator[tuple[str, int]]:
    """(module name, bytes it holds on one rank after load_model) for every module, exactly: the model built on
    meta, sharded by shard_model; quantized linears count their packed bytes (the checkpoint's, cut to the rank's
    slice), plus the dequantized weight when keep_dequantized; buffers (RoPE tables, ...) unless buffers=False."""
    from ds4f.distributed.comm import Comm
    from ds4f.model.deepseek_v4 import Transformer
    from ds4f.model.linear import Linear
    from ds4f.model.manifest import checkpoint_manifest
    from ds4f.model.tp import shard_model

    man = checkpoint_manifest(args)
    net = Transformer(args, dtype=dtype, device="meta")
    if tp_world > 1:
        shard_model(net, 0, tp_world, Comm(0, tp_world, pg=object()))
    for name, mod in net.named_modules():
        total = 0
        for leaf, t in [*mod._parameters.items(), *(mod._buffers.items() if buffers else ())]:
            if t is None or (isinstance(mod, Linear) and leaf == "weight" and mod.fmt != "bf16"):
                continue
            total += t.numel() * t.element_size()
        if isinstance(mod, Linear) and mod.fmt != "bf16":
            w, s = man[f"{name}.weight"], man[f"{name}.scale"]
            frac = (mod.out_features * mod.in_features) / (w.shape[0] * w.shape[1] * (2 if mod.fmt == "fp4" else 1))
            total += int((w.nbytes + s.nbytes) * frac)
            if keep_dequantized:
                total += mod.weight.numel() * mod.weight.element_size()
        yield name, total


def weight_bytes(args: ModelArgs, dtype: torch.dtype, tp_world: int = 1, keep_dequantized: bool = False) -> int:
    """Bytes one rank's model holds after load_model (exact; see module_bytes)."""
    return sum(n for _, n in module_bytes(args, dtype, tp_world, keep_dequantized))


def activation_bytes(args: ModelArgs, tokens: int, context: int, tp_world: int = 1,
                     dtype: torch.dtype = torch.bfloat16) -> int:
    """Rough peak of one forward of `tokens` rows at `context` positions (the reference path's largest live
    buffers): residual streams, the local heads' q and fp32 output, one attention tile over the window + the HCA
    entries or the CSA top-k gather, the indexer's score pass and fp32 keys, MoE accumulators."""
    a = args
    e = torch.empty((), dtype=dtype).element_size()
    h = a.num_attention_heads // tp_world
    streams = 6 * tokens * a.hc_mult * a.hidden_size * e  # x, mixes, hc_post in / out
    attn = tokens * h * a.head_dim * (e + 4) + tokens * (a.q_lora_rank + a.head_dim) * e
    ratios = [r for r in a.compress_ratios if r] or [1]
    keys = a.sliding_window + 128 + max(context // max(ratios), a.index_topk)  # one 128-query tile's keys
    tile = 3 * 128 * h * keys * 4 + 128 * a.index_topk * a.head_dim * 4
    csa_entries = context // min(ratios)
    # reference path: score pass (SCORE_BUDGET fp32) + every CSA entry read back from the cache (fp32 index keys, KV
    # rows); fast path: the whole [tokens, entries] fp32 score matrix (8 GiB for an 8192-token chunk at 1M) + the
    # selected ids. The larger of the two.
    indexer = max(2 * min(1 << 26, tokens * a.index_n_heads * max(csa_entries, 1)) * 4
                  + csa_entries * (a.index_head_dim * 4 + a.head_dim * e),
                  tokens * csa_entries * 4 + tokens * (a.sliding_window + a.index_topk) * 8)
    inter = a.moe_intermediate_size // tp_world
    moe = tokens * a.hidden_size * 4 * 2 + 3 * tokens * inter * max(a.n_shared_experts, 1) * e
    return int(streams + attn + tile + indexer + moe)


def nccl_bytes(tp_world: int) -> int:
    return NCCL_PER_PEER * (tp_world - 1)


# ------------------------------------------------------------------------------------------- plans

def _finish(rows: list[Row], usable: int, layout: CacheLayout, kv_budget: int, max_num_seqs: int,
            kv_plan: tuple[int, int] | None = None, usable_note: str = MemoryPlan.usable_note) -> MemoryPlan:
    blocks, slots = kv_plan if kv_plan is not None else layout.plan(kv_budget, max_num_seqs)
    kv = blocks * layout.block_bytes + slots * layout.slot_bytes
    rows.append(Row("KV pool", kv, f"{layout.kv_dtype}, {layout.bytes_per_token:.1f} B/token + "
                                   f"{layout.slot_bytes / 2**20:.1f} MiB/sequence (every rank holds all of it)"))
    rows.append(Row("free", usable - sum(r.nbytes for r in rows)))
    return MemoryPlan(tuple(rows), usable, kv_budget, blocks, slots, layout.block_size, usable_note)


def plan_memory(args: ModelArgs, *, dtype: torch.dtype = torch.bfloat16, keep_dequantized: bool = False,
                tp_world: int = 1, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                block_size: int = 256, kv_dtype: str = "fp8", gpu_total: int = H200_BYTES,
                gpu_memory_utilization: float = 0.9, context: int | None = None,
                activation_peak: int | None = None) -> MemoryPlan:
    """Offline plan for one rank: the KV budget is what is left of total x utilization after weights, CUDA context,
    NCCL, the CUDA graph pool and the activation peak of a prefill chunk at `context` (default max position)."""
    ctx = args.max_position_embeddings if context is None else context
    usable = int(gpu_total * gpu_memory_utilization)
    act = activation_peak if activation_peak is not None else activation_bytes(
        args, max_num_batched_tokens, ctx, tp_world, dtype)
    mode = "packed fp8/MXFP4" if not keep_dequantized else f"packed + dequantized {str(dtype)[6:]}"
    rows = [
        Row("weights", weight_bytes(args, dtype, tp_world, keep_dequantized), f"TP {tp_world}, {mode}"),
        Row("activation peak", act, ("measured" if activation_peak is not None else "estimate") +
            f": {max_num_batched_tokens}-token chunk at {ctx} context"),
        Row("CUDA graphs", activation_bytes(args, min(max_num_seqs, GRAPH_TOKENS), ctx, tp_world, dtype),
            f"estimate: decode pool for {min(max_num_seqs, GRAPH_TOKENS)} sequences"),
        Row("NCCL buffers", nccl_bytes(tp_world), f"estimate: {tp_world - 1} peer(s)"),
        Row("CUDA context", CUDA_CONTEXT, "estimate: context + cuBLAS workspace"),
    ]
    layout = CacheLayout.from_model_args(args, block_size, kv_dtype)
    kv_budget = usable - sum(r.nbytes for r in rows)
    if kv_budget <= 0:
        rows.append(Row("free", kv_budget))
        return MemoryPlan(tuple(rows), usable, kv_budget, 0, 0, block_size)
    return _finish(rows, usable, layout, kv_budget, max_num_seqs)


def model_bytes(model: Any) -> int:
    """Bytes a loaded model holds on its device: parameters, buffers and packed quantized tensors."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    for m in model.modules():
        for t in (getattr(m, "packed_weight", None), getattr(m, "packed_scale", None)):
            if t is not None and not t.is_meta:
                total += t.numel() * t.element_size()
    return total


def graph_reserve(config: Any, model: Any, device: torch.device) -> int:
    """Bytes the decode CUDA graphs' pool is estimated to take on a CUDA device (0 elsewhere): kept out of the KV
    budget (model_runner.kv_cache_budget), which is sized before the graphs are captured."""
    if device.type != "cuda":
        return 0
    tp = getattr(getattr(model, "tp_comm", None), "world", 1)
    return activation_bytes(model.args, min(config.max_num_seqs, GRAPH_TOKENS), 0, tp, model.dtype)


def runtime_table(config: Any, model: Any, layout: CacheLayout, budget: int, num_blocks: int, num_slots: int,
                  device: torch.device) -> str:
    """The runner's plan as a table: measured weights (and on GPU memory in use and the warmup peak), the KV pool
    and capacity of the runner's own (num_blocks, num_slots), estimates for what is not allocated yet."""
    tp = getattr(getattr(model, "tp_comm", None), "world", 1)
    weights = model_bytes(model)
    rows = [Row("weights", weights, f"measured, TP {tp}")]
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        reserved = torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_allocated(device) - allocated
        rows = [
            Row("weights", allocated, f"measured memory_allocated after load, TP {tp}"),
            Row("activation peak", peak, "measured warmup (empty context)"),
            Row("allocator cache", max(0, reserved - allocated),
                "measured: free blocks torch keeps in partly used segments (fragmentation)"),
            Row("context+NCCL+other", max(0, total - free - max(reserved, allocated)),
                "measured: CUDA context, NCCL buffers, other processes"),
            Row("CUDA graphs", graph_reserve(config, model, device),
                "estimate, left out of the KV budget unless --kv-cache-memory sets it"),
        ]
        usable, note = int(total * config.gpu_memory_utilization), MemoryPlan.usable_note
    else:
        usable, note = weights + budget, "weights + KV budget (host memory)"
    plan = _finish(rows, usable, layout, budget, config.max_num_seqs, (num_blocks, num_slots), note)
    return plan.table(f"memory plan ({device.type}, KV budget {budget / GiB:.2f} GiB)")


# ------------------------------------------------------------------------------------------- CLI

def _args_for(model: str) -> ModelArgs:
    from ds4f.model.args import flash_config
    from ds4f.model.hub import resolve_model

    if model in ("flash", "deepseek-ai/DeepSeek-V4-Flash-config-only"):
        return ModelArgs.from_hf(flash_config())
    return resolve_model(model).args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m ds4f.runner.memory_plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="flash", help="'flash' (built-in V4-Flash config), a directory or a repo id")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dequantized", action="store_true", help="also hold bf16 copies of quantized linears")
    p.add_argument("--kv-cache-dtype", default="fp8")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--gpu-memory-gib", type=float, default=H200_BYTES / GiB)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--request-tokens", type=int, default=None, help="check that one request of this length fits")
    a = p.parse_args(argv)
    args = _args_for(a.model)
    ctx = a.request_tokens or args.max_position_embeddings
    plan = plan_memory(args, dtype=getattr(torch, a.dtype), keep_dequantized=a.dequantized, tp_world=a.tp,
                       max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                       block_size=a.block_size, kv_dtype=a.kv_cache_dtype, gpu_total=int(a.gpu_memory_gib * GiB),
                       gpu_memory_utilization=a.gpu_memory_utilization, context=ctx)
    print(plan.table(f"memory plan per GPU: {a.model}, TP {a.tp}, {a.gpu_memory_gib:.1f} GiB x "
                     f"{a.gpu_memory_utilization}"))
    if a.request_tokens:
        ok = plan.fits(a.request_tokens)
        print(f"  one {a.request_tokens}-token request with its prefill peak: {'fits' if ok else 'does NOT fit'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
