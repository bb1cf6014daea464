"""⑤ runner GPU fast path, glue: activations + metadata in, the small elementwise / index steps between kernels out.

Pure functions of tensors and Python ints, so one compiled graph serves every layer of a kind. `fuse(fn)` wraps a
function in torch.compile (dynamic shapes, no inductor CUDA graphs: the caller captures whole steps) when
DS4F_COMPILE=1 (the default; CUDA tensors only) or DS4F_COMPILE=force (any device), and runs it eagerly otherwise.
Each function documents the reference code it reproduces.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ds4f.kernels import step_meta
from ds4f.kernels.compress import compress_fused
from ds4f.kernels.fp8 import store_key_rows, store_kv_rows
from ds4f.kernels.ref import swiglu_clamp
from ds4f.kernels.rope import rope_ref
from ds4f.kernels.sparse_attn import use_triton
from ds4f.model.layers import rms_normalize
from ds4f.model.mhc import hc_head

_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def compile_mode() -> str:
    """DS4F_COMPILE: "1" (default) compiles on CUDA, "0" never, "force" on any device (tests of the compiled path)."""
    return os.environ.get("DS4F_COMPILE", "1")


def fuse(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        mode = compile_mode()
        if not (mode == "force" or (mode == "1" and args[0].is_cuda)):
            return fn(*args)
        c = _COMPILED.get(fn)
        if c is None:
            for knob in ("cache_size_limit", "recompile_limit"):  # one graph per (rank, 0/1-specialised ints) combo
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            c = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        if c is fn:
            return fn(*args)
        try:
            return c(*args)
        except Exception as ex:  # a compiler failure must not take the fast path down: run this step eagerly
            warnings.warn(f"ds4f glue: torch.compile of {fn.__name__} failed ({str(ex)[:200]}); eager from now on",
                          stacklevel=2)
            _COMPILED[fn] = fn
            return fn(*args)

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _rms_w(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """= model.layers.RMSNorm.forward."""
    return (w * rms_normalize(x.float(), eps)).to(x.dtype)


@fuse
def rms_w(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_w(x, w, eps)


@fuse
def head_in(streams: torch.Tensor, last_tok: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
            hc_eps: float, norm_eps: float, w: torch.Tensor, rms_eps: float) -> torch.Tensor:
    """The head's input at each sequence's last token: model.mhc.hc_head of its streams [T, hc, D], then the final
    RMSNorm (= Transformer.compute_logits before the head). Eager it was ~25 launches per decode step (~55 us of
    one TP=2 rank's step on H200)."""
    return _rms_w(hc_head(streams[last_tok], fn, scale, base, hc_eps, norm_eps), w, rms_eps)


def grouped_out(o: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """Grouped wo_a: o [T, H, hd] (inverse-roped) @ wa [G, r, H*hd/G] per group -> [T, G*r]; one strided bmm that
    reads o's groups and writes its output groups in place (no transposed copies)."""
    t, g, r = o.shape[0], wa.shape[0], wa.shape[1]
    out = torch.empty(t, g * r, dtype=o.dtype, device=o.device)
    torch.bmm(o.view(t, g, -1).transpose(0, 1), wa.transpose(1, 2), out=out.view(t, g, r).transpose(0, 1))
    return out


@fuse
def route(xn: torch.Tensor, w32: torch.Tensor, bias: torch.Tensor, hashed: torch.Tensor, k: int, use_hash: bool,
          norm: bool, scaling: float, shared_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """= model.moe.Gate.forward (+ the shared expert as pick id shared_id, weight 1; shared_id < 0: none).
    hashed [T, k] = tid2eid rows (hash layers); bias [E] (learned layers). -> ids [T, k(+1)] int32, weights fp32."""
    scores = F.softplus(F.linear(xn.float(), w32)).sqrt()
    eid = hashed.long() if use_hash else torch.topk(scores + bias, k, dim=-1, sorted=False).indices
    w = scores.gather(1, eid)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    w = w * scaling
    if shared_id >= 0:
        eid = torch.cat([eid, torch.full_like(eid[:, :1], shared_id)], dim=1)
        w = torch.cat([w, torch.ones_like(w[:, :1])], dim=1)
    return eid.to(torch.int32), w.contiguous()


def compress(kvz: torch.Tensor, ape: torch.Tensor, ring: torch.Tensor, norm_w: torch.Tensor, et: torch.Tensor,
             p: torch.Tensor, chunk_start: torch.Tensor, tok_slot: torch.Tensor, bt_tok: torch.Tensor,
             cos_t: torch.Tensor, sin_t: torch.Tensor, m: int, ring_len: int, overlap: bool, eps: float,
             dest_base: int, dummy_block: int, epb: int, ring_rows: torch.Tensor | None = None,
             pool: torch.Tensor | None = None, fp8_pool: tuple[torch.Tensor, ...] | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """compress_ref's inputs and outputs: one Triton launch (ds4f.kernels.compress) where triton runs (CUDA, or the
    interpreter), else compress_ref (also with DS4F_COMPRESS_KERNEL=0). The kernel's entries of candidates that
    complete nothing are zeros (they go to the dummy block; compress_ref's are unspecified).
    ring_rows / pool / fp8_pool (see compress_fused): the state rows / entries are stored there and come back None."""
    if os.environ.get("DS4F_COMPRESS_KERNEL", "1") == "1" and use_triton(kvz):
        return compress_fused(kvz, ape, ring, norm_w, et, p, chunk_start, tok_slot, bt_tok, cos_t, sin_t, m,
                              ring_len, overlap, eps, dest_base, dummy_block, epb, ring_rows=ring_rows, pool=pool,
                              fp8_pool=fp8_pool)
    rows, ent, dst = compress_ref(kvz, ape, ring, norm_w, et, p, chunk_start, tok_slot, bt_tok, cos_t, sin_t, m,
                                  ring_len, overlap, eps, dest_base, dummy_block, epb)
    if pool is not None:
        pool.index_copy_(0, dst, ent.to(pool.dtype))
    if fp8_pool is not None:  # the kernel's stores: zeros for candidates that complete nothing
        ent = torch.where((dst == dest_base + dummy_block * epb)[:, None], 0, ent)
        if len(fp8_pool) == 2:
            store_key_rows(*fp8_pool, dst, ent)
        else:
            store_kv_rows(*fp8_pool, dst, ent)
    if ring_rows is not None:
        ring.index_copy_(0, ring_rows, rows)
    return (None if ring_rows is not None else rows), (None if pool is not None or fp8_pool is not None else ent), dst


@fuse
def compress_ref(kvz: torch.Tensor, ape: torch.Tensor, ring: torch.Tensor, norm_w: torch.Tensor, et: torch.Tensor,
                 p: torch.Tensor, chunk_start: torch.Tensor, tok_slot: torch.Tensor, bt_tok: torch.Tensor,
                 cos_t: torch.Tensor, sin_t: torch.Tensor, m: int, ring_len: int, overlap: bool, eps: float,
                 dest_base: int, dummy_block: int, epb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """= model.compressor.Compressor.project + compress for a batch of candidate tokens.

    kvz [T, 2*cd] = [wkv | wgate](x) (bf16), ring [S1*R, 2*cd] fp32 carry; et [E] candidate tokens (-1 = none).
    -> state rows [T, 2*cd] fp32, entries [E, hd] (normed, roped at w*m, kvz's dtype), dest pool rows [E]
    (the dummy block's first row where the candidate completes nothing)."""
    cd = kvz.shape[1] // 2
    rows = kvz.float() + F.pad(ape[p % m], (cd, 0))  # K | Z + ape[p % m]
    t = rows.shape[0]
    i = et.clamp(min=0)
    pe = p[i]
    valid = (et >= 0) & ((pe + 1) % m == 0)
    w = ((pe + 1) // m - 1).clamp(min=0)
    ns = 2 * m if overlap else m
    q = (w * m - (m if overlap else 0))[:, None] + torch.arange(ns, device=p.device)[None, :]  # [E, ns] positions
    in_chunk = q >= chunk_start[i][:, None]
    ci = (i[:, None] - (pe[:, None] - q)).clamp(0, t - 1)
    ri = tok_slot[i][:, None] * ring_len + q.clamp(min=0) % ring_len
    g = torch.where(in_chunk[..., None], rows[ci], ring[ri])  # [E, ns, 2*cd]
    col = torch.arange(2 * cd, device=p.device)
    g = torch.where((q < 0)[..., None], torch.where(col >= cd, float("-inf"), 0.0), g)  # window -1: K 0, logit -inf
    hd = cd // 2 if overlap else cd
    if overlap:  # Ca of window w-1 (first m slots, first half), Cb of window w
        kv = torch.cat([g[:, :m, :hd], g[:, m:, hd: 2 * hd]], dim=1)
        z = torch.cat([g[:, :m, 2 * hd: 3 * hd], g[:, m:, 3 * hd:]], dim=1)
    else:
        kv, z = g[..., :hd], g[..., hd:]
    ent = _rms_w((kv * z.softmax(dim=1)).sum(dim=1), norm_w, eps)
    ent = rope_ref(ent, cos_t[w * m], sin_t[w * m], False).to(kvz.dtype)
    blk = torch.where(valid, bt_tok[i].gather(1, (w // epb)[:, None]).squeeze(1), dummy_block)
    return rows, ent, dest_base + blk * epb + torch.where(valid, w % epb, 0)


DERIVE_KERNEL_MAX_T = 16  # decode steps: derive in one Triton launch (ds4f.kernels.step_meta) up to this many tokens


def derive(p: torch.Tensor, slot: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, seq: torch.Tensor,
           table: torch.Tensor, tables: tuple[torch.Tensor, ...], scratch: int, dummy_slot: int, comp_base: int,
           W: int, rings: tuple[int, ...], ents: tuple[tuple[int, int, int, bool], ...],
           embed: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> tuple[Any, ...]:
    """derive_ref's outputs; embed = (input_ids [T], embedding weight [V, D], hc): one more output, the streams
    [T, hc, D] = weight[input_ids] in every stream (= Transformer.forward's first step). Steps of <=
    DERIVE_KERNEL_MAX_T tokens where triton runs (CUDA, or the interpreter) from one launch (step_meta.derive_fused;
    DS4F_STEP_META_KERNEL=0: derive_ref, ~12 compiled launches, + the embedding's gather and copy)."""
    args = (p, slot, c0, c1, seq, table, tables)
    if (p.shape[0] <= DERIVE_KERNEL_MAX_T and os.environ.get("DS4F_STEP_META_KERNEL", "1") == "1" and use_triton(p)
            and step_meta.supported(*args, rings, ents, embed)):
        return step_meta.derive_fused(*args, scratch, dummy_slot, comp_base, W, rings, ents, embed)
    out = derive_ref(*args, scratch, dummy_slot, comp_base, W, rings, ents)
    if embed is None:
        return out
    ids, weight, hc = embed
    return (*out, F.embedding(ids, weight).unsqueeze(1).expand(-1, hc, -1).contiguous())


@fuse
def derive_ref(p: torch.Tensor, slot: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, seq: torch.Tensor,
               table: torch.Tensor, tables: tuple[torch.Tensor, ...], scratch: int, dummy_slot: int, comp_base: int,
               W: int, rings: tuple[int, ...], ents: tuple[tuple[int, int, int, bool], ...]) -> tuple[Any, ...]:
    """StepMeta fields (positions, tok_slot, chunk_start, chunk_end, tok_seq, block_table) -> FastModel's per-step
    index tensors: window rows [T, W] int32, window-ring write rows [T], a carry-ring write row [T] per ring size,
    bt_tok [T, max_blocks], each table [max_pos, r] at the positions, and per (ratio, n_entries, epb, direct) of ents:
    direct -> (attention rows [T, W + n] int32 (window + every visible entry), W + visible entries [T] int32), else
    (index-pool rows [B, n] int32, visible entries [T] int32); then tok_seq as int32."""
    t = p.shape[0]
    ti = torch.arange(t, device=p.device)
    j = torch.arange(W, device=p.device)
    q = p[:, None] - j[None, :]
    ring = slot[:, None] * W + q % W
    win = torch.where(q >= c0[:, None], scratch + ti[:, None] - j[None, :], torch.where(q >= 0, ring, -1))
    win = win.to(torch.int32)
    win_write = torch.where(p >= c1 - W, slot, dummy_slot) * W + p % W
    ring_rows = tuple(torch.where(p >= c1 - r, slot, dummy_slot) * r + p % r for r in rings)
    bt_tok = table[seq]
    cs = tuple(tb[p] for tb in tables)
    per: list[Any] = []
    for m, n_ent, epb, direct in ents:
        w = torch.arange(n_ent, device=p.device)
        vis = (p + 1) // m
        if direct:
            rows_tok = bt_tok[:, w // epb] * epb + w % epb  # [T, n]
            ent = torch.where(w[None, :] < vis[:, None], comp_base + rows_tok, -1)
            per.append((torch.cat([win, ent.to(torch.int32)], dim=1), (vis.clamp(max=n_ent) + W).to(torch.int32)))
        else:
            per.append(((table[:, w // epb] * epb + w % epb).to(torch.int32), vis.clamp(max=n_ent).to(torch.int32)))
    return win, win_write, ring_rows, bt_tok, cs, tuple(per), seq.to(torch.int32)


@fuse
def swiglu_act(h: torch.Tensor, limit: float) -> torch.Tensor:
    """kernels.ref.swiglu_clamp in fp32, rounded to h's dtype: h [T, 2I] = [gate | up] -> [T, I]."""
    return swiglu_clamp(h.float(), limit).to(h.dtype)


@fuse
def scale_f32(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x.float() * scale


INDEX_BUCKET = 256  # indexer column counts are multiples of this: few distinct shapes, Triton's L stays 16-aligned


def index_len(max_len: int | None, ratio: int, n_ent: int, topk: int, bucket: int = INDEX_BUCKET) -> int:
    """Host ints -> the indexer columns an eager step needs: every token's visible count (p+1)//ratio <= max_len //
    ratio, and at least topk, rounded up to `bucket`, at most n_ent (None: n_ent). Columns past a token's visible
    count score -inf and are never selected, so scoring [:, :n] selects the set the full n_ent would (the zero-score
    tie-break -(l + 1) * 1e-30 does not depend on n), in the same order under torch.topk (sorted by value)."""
    if max_len is None:
        return n_ent
    return min(n_ent, -(-max(max_len // ratio, topk, 1) // bucket) * bucket)


@fuse
def topk_rows(sel: torch.Tensor, bt_tok: torch.Tensor, win: torch.Tensor, comp_base: int, epb: int) -> torch.Tensor:
    """Top-k entry ids [T, k] (-1 = none) -> attention index list [T, W + k] int32 = window rows + pool rows."""
    s0 = sel.clamp(min=0).long()
    rows = comp_base + bt_tok.gather(1, s0 // epb) * epb + s0 % epb
    return torch.cat([win, torch.where(sel >= 0, rows, -1).to(torch.int32)], dim=1)
