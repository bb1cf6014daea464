"""⑤ runner GPU fast path, KV pools + step metadata: sequences (slot, start, token ids) in, flat pools and StepMeta out.

One flat pool per layer holds every K=V row attention can read, so one [T, K] index list covers a token:
    rows [0, S1*W)                    window ring: row = slot * W + pos % W            (S1 = max_seqs + 1)
    rows [S1*W, S1*W + max_tokens)    scratch: this forward's own rows, row = S1*W + token index
    rows [comp_base, + NB1 * epb)     compressed entries: row = comp_base + table[w // epb] * epb + w % epb
                                      (epb = block_size // ratio, NB1 = num_blocks + 1; CSA / HCA layers only)
Index keys (CSA): NB1 * epb rows of index_head_dim, row = table[w // epb] * epb + w % epb.
Compressor carry (fp32, position-addressed like the engine's slot rings): [S1 * R, width], row = slot * R + pos % R,
R = 2 * ratio (CSA) or ratio (HCA). Slot max_seqs and block num_blocks are dummies: padded tokens and entries that
are not emitted write there, so no write needs a mask (and no host sync).
The window ring, block tables and slot rings follow ds4f/cache/manager.py CacheLayout's addressing.

kv_dtype "bfloat16" (default): KV rows [N, head_dim] and index keys [., index_head_dim] in `dtype`.
kv_dtype "fp8": the reference engine's fp8 rows (ds4f/runner/kv_cache.py RowStore, bit for bit): a KV pool is an
Fp8KV, nope [N, head_dim - rope] e4m3 + exp [N, 8] uint8 (UE8M0, one per 64 nope columns, padded to 8) + rope
[N, rope] bf16 (584 B per row at V4-Flash width; dequantizes to bf16 exactly); index keys are an Fp8Keys, e4m3 +
one fp32 power-of-two scale per row (132 B). Every row is quantized where it enters a pool (`put`, `put_scratch`:
scratch, ring and compressed rows alike; one fused Triton launch per write on CUDA), so a row reads the same whichever
forward wrote it and however a prompt was chunked (as vLLM's fp8_ds_mla cache). The reference engine instead reads
the rows of its own chunk unquantized.
Writers go through `put` / `put_scratch`, readers through `attend` / `index_scores`, which serve both dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ds4f.kernels import indexer_scores, sparse_attn
from ds4f.kernels.fp8 import FP8, kv_exp_bytes, store_key_rows, store_kv_rows
from ds4f.kernels.kv_store import fits, norm_rope_store_kv
from ds4f.kernels.prefix_attn import dense_entries, prefix_attn
from ds4f.model.args import CSA, HCA, ModelArgs

KV_DTYPES = {"auto": "bfloat16", "bfloat16": "bfloat16", "fp8": "fp8", "fp8_e4m3": "fp8"}


@dataclass
class Fp8KV:
    """One layer's fp8 KV rows: nope [N, dn] e4m3, exp [N, 8] uint8 exponents (scale 2^(e-127)), rope [N, dr] bf16."""

    nope: torch.Tensor
    exp: torch.Tensor
    rope: torch.Tensor

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.nope, self.exp, self.rope


@dataclass
class Fp8Keys:
    """One layer's fp8 index keys: keys [N, d] e4m3, scale [N] fp32 (a power of two per row)."""

    keys: torch.Tensor
    scale: torch.Tensor

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.scale


Pool = torch.Tensor | Fp8KV | Fp8Keys


@dataclass
class StepMeta:
    """Per-forward metadata, all device tensors. T tokens of B sequences; sequence b's tokens are contiguous."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    tok_slot: torch.Tensor  # [T] int64 slot (window / carry rings) of the token's sequence
    tok_seq: torch.Tensor  # [T] int64 row of block_table of the token's sequence
    chunk_start: torch.Tensor  # [T] int64 first position of this forward's chunk of the token's sequence
    chunk_end: torch.Tensor  # [T] int64 one past its last position
    block_table: torch.Tensor  # [B, max_blocks] int64
    ent_tok: dict[int, torch.Tensor]  # ratio -> [E] int64 tokens that may complete an entry (-1 = none)
    last_tok: torch.Tensor  # [B] int64 token whose logits are wanted
    # host int: one past the step's largest position (eager steps; bounds the indexer's columns). None: unknown, the
    # indexer scores every entry (decode graphs: static shapes; fast_warmup: the [T, max_ctx / ratio] peak)
    max_len: int | None = None
    # host bool: every sequence has exactly one token in this step (decode), so no token's carry-ring write lands
    # on a row another token of the step reads: the compressor may write its state rows in place
    one_per_seq: bool = False


class FastCache:
    """Device pools for a FastModel plus a host-side block allocator (one block table row per slot)."""

    def __init__(self, args: ModelArgs, max_seqs: int, num_blocks: int, block_size: int, max_ctx: int,
                 max_tokens: int, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                 kv_dtype: str = "bfloat16") -> None:
        assert kv_dtype in KV_DTYPES, f"kv_dtype must be one of {sorted(KV_DTYPES)}, got {kv_dtype!r}"
        self.args, self.device, self.dtype = args, torch.device(device), dtype
        self.kv_dtype = KV_DTYPES[kv_dtype]
        self.fused_quant: bool | None = None  # fp8 stores: one Triton launch (None = on CUDA) or torch ops
        # put() on a plain tensor pool stores rows verbatim, so a kernel may write them itself (the compressor at
        # decode); a subclass whose put transforms the rows sets this False
        self.plain_store = True
        self.attn_kw: dict[str, Any] = {}  # sparse_attn tuning knobs (block_k, ...) for tests and benches
        self.max_seqs, self.num_blocks, self.block_size = max_seqs, num_blocks, block_size
        self.max_ctx, self.max_tokens = max_ctx, max_tokens
        self.W = args.sliding_window
        self.S1, self.NB1 = max_seqs + 1, num_blocks + 1
        self.dummy_slot, self.dummy_block = max_seqs, num_blocks
        self.scratch = self.S1 * self.W
        self.comp_base = self.scratch + max_tokens
        self.max_blocks = -(-max_ctx // block_size)
        self.scratch_rows = torch.arange(self.scratch, self.comp_base, device=device)  # [max_tokens] int64
        self.kinds: dict[int, str] = {}  # layer -> CSA / HCA
        self.ratio: dict[int, int] = {}
        self.kv: list[Pool] = []
        self.index: dict[int, Pool] = {}
        self.state: dict[tuple[int, str], torch.Tensor] = {}
        hd, ihd = args.head_dim, args.index_head_dim
        for layer in range(args.num_hidden_layers):
            kind, m = args.layer_type(layer), args.compress_ratio(layer)
            n = self.comp_base
            if kind in (CSA, HCA):
                assert block_size % m == 0, "block_size must be a multiple of every compress ratio"
                self.kinds[layer], self.ratio[layer] = kind, m
                epb = block_size // m
                n += self.NB1 * epb
                c = 2 if kind == CSA else 1
                self.state[layer, "attn"] = torch.zeros(self.S1 * self.ring(layer), 2 * c * hd,
                                                        dtype=torch.float32, device=device)
                if kind == CSA:
                    self.index[layer] = self._keys(self.NB1 * epb, ihd)
                    self.state[layer, "index"] = torch.zeros(self.S1 * self.ring(layer), 4 * ihd,
                                                             dtype=torch.float32, device=device)
            self.kv.append(self._rows(n, hd))
        self.free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    def _rows(self, n: int, hd: int) -> Pool:
        if self.kv_dtype != "fp8":
            return torch.zeros(n, hd, dtype=self.dtype, device=self.device)
        dr = self.args.qk_rope_head_dim
        return Fp8KV(torch.zeros(n, hd - dr, dtype=FP8, device=self.device),
                     torch.full((n, kv_exp_bytes(hd - dr)), 127, dtype=torch.uint8, device=self.device),
                     torch.zeros(n, dr, dtype=torch.bfloat16, device=self.device))

    def _keys(self, n: int, d: int) -> Pool:
        if self.kv_dtype != "fp8":
            return torch.zeros(n, d, dtype=self.dtype, device=self.device)
        return Fp8Keys(torch.zeros(n, d, dtype=FP8, device=self.device),
                       torch.ones(n, dtype=torch.float32, device=self.device))

    # ---- row writes and reads (no host sync: CUDA-graph safe) ----
    def put(self, dest: Pool, rows: torch.Tensor, x: torch.Tensor) -> None:
        """dest[rows] = x [n, width] (rows [n] int64; repeats only where nothing reads the row, e.g. dummy rows)."""
        if isinstance(dest, Fp8KV):
            store_kv_rows(dest.nope, dest.exp, dest.rope, rows, x, fused=self.fused_quant)
        elif isinstance(dest, Fp8Keys):
            store_key_rows(dest.keys, dest.scale, rows, x, fused=self.fused_quant)
        else:
            dest.index_copy_(0, rows, x.to(dest.dtype))

    def put_kv_fused(self, layer: int, x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     eps: float, win_rows: torch.Tensor | None) -> bool:
        """norm_rope(x, w, ...) into layer's scratch rows (and window rows win_rows [T] int64) in one launch
        (ds4f.kernels.kv_store) -> True; False (nothing written) unless the pool is fp8, its stores are the fused
        kind (fused_quant not False) and the launch fits x."""
        dest = self.kv[layer]
        if not (isinstance(dest, Fp8KV) and self.fused_quant is not False and fits(x)):
            return False
        norm_rope_store_kv(x, w, cos, sin, eps, dest.nope, dest.exp, dest.rope, self.scratch_rows[: x.shape[0]],
                           win_rows)
        return True

    def put_scratch(self, layer: int, x: torch.Tensor) -> None:
        """This forward's K=V rows x [T, head_dim] -> the scratch rows of layer's pool."""
        dest, lo = self.kv[layer], self.scratch
        if isinstance(dest, Fp8KV):
            self.put(dest, self.scratch_rows[: x.shape[0]], x)
        else:
            dest[lo: lo + x.shape[0]] = x

    def attend(self, layer: int, q: torch.Tensor, idx: torch.Tensor, sink: torch.Tensor,
               scale: float, live: torch.Tensor | None = None,
               inv_rope: tuple[torch.Tensor, torch.Tensor] | None = None, q_norm: float | None = None
               ) -> torch.Tensor:
        """sparse_attn over layer's pool: q [T, H, hd] bf16, idx [T, K] int32 pool rows (-1 = none; all -1 from
        live[t] on when live [T] int32 is given) -> [T, H, hd]; inv_rope (cos, sin) [T, rope/2]: the output's rope
        channels rotated back in the kernel that writes it; q_norm = eps: q is raw, normed and rotated by the kernel
        (sparse_attn's q_norm)."""
        pool = self.kv[layer]
        if isinstance(pool, Fp8KV):
            return sparse_attn(q, pool.nope, idx, sink, scale, pool.exp, kv_rope=pool.rope, live=live,
                               inv_rope=inv_rope, q_norm=q_norm, **self.attn_kw)
        return sparse_attn(q, pool, idx, sink, scale, live=live, inv_rope=inv_rope, q_norm=q_norm, **self.attn_kw)

    def attend_prefix(self, layer: int, q: torch.Tensor, win: torch.Tensor, table: torch.Tensor, seq: torch.Tensor,
                      vis: torch.Tensor, n_ent: int, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """attend's softmax for an all-entries layer through prefix_attn: window rows win [T, W] plus entries
        0..vis[t]-1 of block-table row seq[t] (each sequence's first n_ent entries dequantized once) -> [T, H, hd]."""
        pool = self.kv[layer]
        parts = pool.parts() if isinstance(pool, Fp8KV) else pool
        ent = dense_entries(parts, table, self.comp_base, self.epb(self.ratio[layer]), n_ent)
        return prefix_attn(q, ent, seq, vis, win, parts, sink, scale)  # type: ignore[arg-type]

    def index_scores(self, layer: int, q: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, seq_of: torch.Tensor,
                     valid_len: torch.Tensor, hist: torch.Tensor | None = None) -> torch.Tensor:
        """indexer_scores over layer's index keys (arguments as ds4f.kernels.indexer_scores, zero_rank on: exact
        zeros tie-broken by id) -> [T, L] fp32."""
        keys = self.index[layer]
        fp8 = isinstance(keys, Fp8Keys)
        return indexer_scores(q, w, keys.keys if fp8 else keys, slots, seq_of, valid_len,
                              k_scale=keys.scale if fp8 else None, zero_rank=True, hist=hist)

    def ring(self, layer: int) -> int:
        m = self.ratio[layer]
        return 2 * m if self.kinds[layer] == CSA else m

    def epb(self, ratio: int) -> int:
        return self.block_size // ratio

    def max_entries(self, ratio: int) -> int:
        return -(-self.max_ctx // ratio)

    @property
    def nbytes(self) -> int:
        ts: list[torch.Tensor] = [*self.state.values()]
        for p in [*self.kv, *self.index.values()]:
            ts += p.parts() if isinstance(p, Fp8KV | Fp8Keys) else [p]
        return sum(t.numel() * t.element_size() for t in ts)

    # ---- host bookkeeping (python ints only) ----
    def ensure(self, slot: int, num_tokens: int) -> list[int]:
        """Blocks for positions [0, num_tokens) of the sequence in `slot`; returns its table row."""
        assert 0 <= slot < self.max_seqs and num_tokens <= self.max_ctx
        t = self.tables.setdefault(slot, [])
        while len(t) * self.block_size < num_tokens:
            t.append(self.free.pop())
        return t

    def release(self, slot: int) -> None:
        self.free.extend(reversed(self.tables.pop(slot, [])))

    def table_row(self, slot: int) -> list[int]:
        t = self.tables.get(slot, [])
        return t + [self.dummy_block] * (self.max_blocks - len(t))

    def build_meta(self, seqs: list[tuple[int, int, list[int]]], ratios: list[int]) -> StepMeta:
        """seqs: (slot, start position, new token ids) per sequence -> StepMeta (one H2D copy per field; max_len
        from the host values)."""
        ids, pos, slot, seq, cs, ce, last, rows = [], [], [], [], [], [], [], []
        ent: dict[int, list[int]] = {m: [] for m in ratios}
        for b, (s, start, toks) in enumerate(seqs):
            n = len(toks)
            self.ensure(s, start + n)
            t0 = len(ids)
            ids += list(toks)
            p = list(range(start, start + n))
            pos += p
            slot += [s] * n
            seq += [b] * n
            cs += [start] * n
            ce += [start + n] * n
            last.append(t0 + n - 1)
            rows.append(self.table_row(s))
            for m in ratios:
                ent[m] += [t0 + i for i, q in enumerate(p) if (q + 1) % m == 0]
        assert len(ids) <= self.max_tokens

        def dev(x: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.from_numpy(np.asarray(x, dtype=np.int64)).to(self.device, non_blocking=True)

        return StepMeta(dev(ids), dev(pos), dev(slot), dev(seq), dev(cs), dev(ce), dev(rows),
                        {m: dev(e if e else [-1]) for m, e in ent.items()}, dev(last),
                        max((start + len(toks) for _, start, toks in seqs), default=0),
                        all(len(toks) == 1 for _, _, toks in seqs))

    def fill_decode(self, meta: StepMeta, seqs: list[tuple[int, int, int]]) -> None:
        """Write one decode step (slot, position, token id) per sequence into static buffers sized to a bucket
        (padding rows point at the dummy slot / block). Host values go through one pinned staging copy per field."""
        bucket = meta.input_ids.shape[0]
        n = len(seqs)
        assert n <= bucket
        ids = np.zeros(bucket, np.int64)
        pos = np.zeros(bucket, np.int64)
        slot = np.full(bucket, self.dummy_slot, np.int64)
        table = np.full((bucket, self.max_blocks), self.dummy_block, np.int64)
        for b, (s, p, tok) in enumerate(seqs):
            self.ensure(s, p + 1)
            ids[b], pos[b], slot[b] = tok, p, s
            table[b] = self.table_row(s)
        for buf, host in ((meta.input_ids, ids), (meta.positions, pos), (meta.tok_slot, slot),
                          (meta.chunk_start, pos), (meta.chunk_end, pos + 1), (meta.block_table, table)):
            buf.copy_(torch.from_numpy(host).pin_memory() if buf.is_cuda else torch.from_numpy(host),
                      non_blocking=True)

    def decode_buffers(self, bucket: int, ratios: list[int]) -> StepMeta:
        """Static decode buffers for `bucket` tokens (one per sequence), initialised to padding."""
        d = self.device
        ar = torch.arange(bucket, device=d)
        z = torch.zeros(bucket, dtype=torch.int64, device=d)
        return StepMeta(z.clone(), z.clone(), torch.full_like(z, self.dummy_slot), ar.clone(), z.clone(), z + 1,
                        torch.full((bucket, self.max_blocks), self.dummy_block, dtype=torch.int64, device=d),
                        {m: ar.clone() for m in ratios}, ar.clone(), one_per_seq=True)


def slice_meta(meta: StepMeta, n: int) -> StepMeta:
    """The first n rows of decode buffers (views: a bucket's graph reads the shared static storage)."""
    return StepMeta(meta.input_ids[:n], meta.positions[:n], meta.tok_slot[:n], meta.tok_seq[:n],
                    meta.chunk_start[:n], meta.chunk_end[:n], meta.block_table[:n],
                    {m: e[:n] for m, e in meta.ent_tok.items()}, meta.last_tok[:n], meta.max_len, meta.one_per_seq)
