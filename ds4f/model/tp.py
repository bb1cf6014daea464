"""⑥ model tensor parallelism: a loaded Transformer + (rank, world, Comm) in, the same model sharded in place out.

gpt-fast `apply_tp` style: slice weights after load, set the local head / group counts, and add the all-reduces as
forward hooks that go through one counted helper (ds4f.distributed.comm.Comm). See docs/parallel.md for why each
part is split or replicated. Per layer: one all-reduce after attention (wo_b is row-parallel), one after the MoE
(routed + shared summed locally); per logits call: one all-gather of the vocab-parallel head.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ds4f.model.linear import Linear
from ds4f.model.quant import FP8_BLOCK, MXFP4_BLOCK

# checkpoint tensors split over the ranks (everything else is replicated): query heads + sinks, grouped output
# projection, every expert (routed and shared), the head
SHARDED = re.compile(r"(\.attn\.(wq_b|wo_a|wo_b)\.|\.attn\.attn_sink$|\.ffn\.(experts\.\d+|shared_experts)\.|^head\.)")


def per_rank_bytes(sizes: dict[str, int], world: int) -> int:
    """Weight bytes one rank holds: {checkpoint tensor name: bytes} -> sharded tensors / world + replicated ones."""
    return sum(-(-b // world) if SHARDED.search(n) else b for n, b in sizes.items())


class ShardError(ValueError):
    """The model's shapes do not divide over the requested number of ranks; the message names the flag."""


def _need(ok: bool, what: str, world: int) -> None:
    if not ok:
        raise ShardError(f"--tensor-parallel-size {world}: {what}; pick a size that divides it")


def check_shardable(args: Any, world: int) -> None:
    """Raise ShardError (naming --tensor-parallel-size) unless heads, o_groups and the expert width split evenly."""
    _need(args.num_attention_heads % world == 0, f"{args.num_attention_heads} attention heads do not split evenly",
          world)
    _need(args.o_groups % world == 0, f"{args.o_groups} output groups (o_groups) do not split evenly", world)
    _need(args.moe_intermediate_size % world == 0,
          f"moe_intermediate_size {args.moe_intermediate_size} does not split evenly", world)


def _slice_linear(lin: Linear, dim: int, start: int, stop: int) -> None:
    """Keep rows (dim 0: output features) or columns (dim 1: input features) [start, stop) of lin, packed tensors
    included when the cut falls on their block grid (else they are dropped: the float weight stays exact)."""
    w = lin.weight.data.narrow(dim, start, stop - start).clone()
    lin.weight = nn.Parameter(w, requires_grad=False)
    if dim == 0:
        lin.out_features = stop - start
    else:
        lin.in_features = stop - start
    pw, ps = lin.packed_weight, lin.packed_scale
    if pw is None:
        return
    lin.packed_weight = lin.packed_scale = None
    if lin.fmt == "fp8" and ps is not None and start % FP8_BLOCK == 0 and stop % FP8_BLOCK == 0:
        lin.packed_weight = pw.narrow(dim, start, stop - start).clone()
        lin.packed_scale = ps.narrow(dim, start // FP8_BLOCK, (stop - start) // FP8_BLOCK).clone()
    elif lin.fmt == "fp4" and ps is not None:
        if dim == 0:
            lin.packed_weight, lin.packed_scale = pw[start:stop].clone(), ps[start:stop].clone()
        elif start % MXFP4_BLOCK == 0 and stop % MXFP4_BLOCK == 0:
            lin.packed_weight = pw[:, start // 2: stop // 2].clone()
            lin.packed_scale = ps[:, start // MXFP4_BLOCK: stop // MXFP4_BLOCK].clone()


def _part(n: int, rank: int, world: int) -> tuple[int, int]:
    k = n // world
    return rank * k, (rank + 1) * k


_COLUMN_CUT = re.compile(r"\.(attn\.wo_b|w2)\.weight$")  # row-parallel linears: their input columns are split


def rank_slice(name: str, shape: tuple[int, ...], rank: int, world: int) -> tuple[int, int, int] | None:
    """(dim, start, stop) of checkpoint tensor `name` (its logical shape: [out, in] for a linear, unpacked) that TP
    rank `rank` keeps under shard_model's rules; None when the tensor is replicated. For the vocab-parallel head,
    stop may pass the vocab: those rows are zero padding. Lets a loader read only this rank's part."""
    if world == 1 or not SHARDED.search(name):
        return None
    if name.startswith("head."):
        n = -(-shape[0] // world)
        return 0, rank * n, (rank + 1) * n
    dim = 1 if _COLUMN_CUT.search(name) else 0
    start, stop = _part(shape[dim], rank, world)
    return dim, start, stop


def _shard_attention(attn: Any, rank: int, world: int) -> None:
    """Query heads split (wq_b rows, attn_sink); o_groups split with them (wo_a rows); wo_b row-parallel (columns).
    wq_a / q_norm, wkv / kv_norm, the compressor and the indexer stay whole: every rank keeps the full KV cache."""
    h, g, hd = attn.n_heads, attn.o_groups, attn.head_dim
    _need(h % world == 0, f"{h} attention heads do not split evenly", world)
    _need(g % world == 0, f"{g} output groups (o_groups) do not split evenly", world)
    rank_out = attn.wo_a.out_features // g  # o_lora_rank
    h0, h1 = _part(h, rank, world)
    g0, g1 = _part(g, rank, world)
    _slice_linear(attn.wq_b, 0, h0 * hd, h1 * hd)
    attn.attn_sink = nn.Parameter(attn.attn_sink.data[h0:h1].clone(), requires_grad=False)
    _slice_linear(attn.wo_a, 0, g0 * rank_out, g1 * rank_out)
    _slice_linear(attn.wo_b, 1, g0 * rank_out, g1 * rank_out)
    attn.n_heads, attn.o_groups = h1 - h0, g1 - g0


def _shard_moe(moe: Any, rank: int, world: int) -> None:
    """Every expert (routed and shared) split along its intermediate dim: w1 / w3 rows, w2 columns. The gate and the
    routing stay whole, so every rank picks the same experts and sums its partial outputs locally."""
    experts = list(moe.experts) + ([moe.shared_experts] if moe.shared_experts is not None else [])
    for e in experts:
        inter = e.w1.out_features
        _need(inter % world == 0, f"moe_intermediate_size {inter} does not split evenly", world)
        i0, i1 = _part(inter, rank, world)
        _slice_linear(e.w1, 0, i0, i1)
        _slice_linear(e.w3, 0, i0, i1)
        _slice_linear(e.w2, 1, i0, i1)


def _shard_head(head: Linear, rank: int, world: int) -> int:
    """Vocab-parallel head: rank r keeps rows [r*n, (r+1)*n) of the vocab padded up to world*n. Returns the vocab."""
    vocab = head.out_features
    n = -(-vocab // world)
    lo, hi = rank * n, min(vocab, (rank + 1) * n)
    w = torch.zeros(n, head.in_features, dtype=head.weight.dtype, device=head.weight.device)
    if hi > lo:
        w[: hi - lo] = head.weight.data[lo:hi]
    head.weight = nn.Parameter(w, requires_grad=False)
    head.out_features = n
    head.packed_weight = head.packed_scale = None
    return vocab


def shard_model(model: Any, rank: int, world: int, comm: Any) -> Any:
    """Shard a loaded Transformer in place for TP rank `rank` of `world`; returns it (with `.tp_comm` = comm).

    Every main and MTP block: attention heads / groups and MoE intermediate dims split, one all-reduce hook on the
    attention output and one on the MoE output. Embedding, mHC, norms, router, compressors, indexer: replicated.
    """
    assert 0 <= rank < world and comm.world == world
    check_shardable(model.args, world)
    model.tp_comm = comm
    if world == 1:
        return model

    def reduce_hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(out)

    for block in [*model.layers, *model.mtp]:
        _shard_attention(block.attn, rank, world)
        _shard_moe(block.ffn, rank, world)
        block.attn.register_forward_hook(reduce_hook)
        block.ffn.register_forward_hook(reduce_hook)

    vocab = _shard_head(model.head, rank, world)

    def gather_hook(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        return comm.all_gather_last(out, vocab)

    model.head.register_forward_hook(gather_hook)
    return model
