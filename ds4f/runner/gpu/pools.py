"""⑤ runner GPU fast path, KV pools + step metadata: sequences (slot, start, token ids) in, flat pools and StepMeta out.

One flat bf16 pool per layer holds every K=V row attention can read, so one [T, K] index list covers a token:
    rows [0, S1*W)                    window ring: row = slot * W + pos % W            (S1 = max_seqs + 1)
    rows [S1*W, S1*W + max_tokens)    scratch: this forward's own rows, row = S1*W + token index
    rows [comp_base, + NB1 * epb)     compressed entries: row = comp_base + table[w // epb] * epb + w % epb
                                      (epb = block_size // ratio, NB1 = num_blocks + 1; CSA / HCA layers only)
Index keys (CSA): [NB1 * epb, index_head_dim] bf16, row = table[w // epb] * epb + w % epb.
Compressor carry (fp32, position-addressed like the engine's slot rings): [S1 * R, width], row = slot * R + pos % R,
R = 2 * ratio (CSA) or ratio (HCA). Slot max_seqs and block num_blocks are dummies: padded tokens and entries that
are not emitted write there, so no write needs a mask (and no host sync).
The window ring, block tables and slot rings follow ds4f/cache/manager.py CacheLayout's addressing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ds4f.model.args import CSA, HCA, ModelArgs


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


class FastCache:
    """Device pools for a FastModel plus a host-side block allocator (one block table row per slot)."""

    def __init__(self, args: ModelArgs, max_seqs: int, num_blocks: int, block_size: int, max_ctx: int,
                 max_tokens: int, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> None:
        self.args, self.device, self.dtype = args, torch.device(device), dtype
        self.max_seqs, self.num_blocks, self.block_size = max_seqs, num_blocks, block_size
        self.max_ctx, self.max_tokens = max_ctx, max_tokens
        self.W = args.sliding_window
        self.S1, self.NB1 = max_seqs + 1, num_blocks + 1
        self.dummy_slot, self.dummy_block = max_seqs, num_blocks
        self.scratch = self.S1 * self.W
        self.comp_base = self.scratch + max_tokens
        self.max_blocks = -(-max_ctx // block_size)
        self.kinds: dict[int, str] = {}  # layer -> CSA / HCA
        self.ratio: dict[int, int] = {}
        self.kv: list[torch.Tensor] = []
        self.index: dict[int, torch.Tensor] = {}
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
                    self.index[layer] = torch.zeros(self.NB1 * epb, ihd, dtype=dtype, device=device)
                    self.state[layer, "index"] = torch.zeros(self.S1 * self.ring(layer), 4 * ihd,
                                                             dtype=torch.float32, device=device)
            self.kv.append(torch.zeros(n, hd, dtype=dtype, device=device))
        self.free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    def ring(self, layer: int) -> int:
        m = self.ratio[layer]
        return 2 * m if self.kinds[layer] == CSA else m

    def epb(self, ratio: int) -> int:
        return self.block_size // ratio

    def max_entries(self, ratio: int) -> int:
        return -(-self.max_ctx // ratio)

    @property
    def nbytes(self) -> int:
        ts = [*self.kv, *self.index.values(), *self.state.values()]
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
        """seqs: (slot, start position, new token ids) per sequence -> StepMeta (one H2D copy per field)."""
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
                        {m: dev(e if e else [-1]) for m, e in ent.items()}, dev(last))

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
                        {m: ar.clone() for m in ratios}, ar.clone())


def slice_meta(meta: StepMeta, n: int) -> StepMeta:
    """The first n rows of decode buffers (views: a bucket's graph reads the shared static storage)."""
    return StepMeta(meta.input_ids[:n], meta.positions[:n], meta.tok_slot[:n], meta.tok_seq[:n],
                    meta.chunk_start[:n], meta.chunk_end[:n], meta.block_table[:n],
                    {m: e[:n] for m, e in meta.ent_tok.items()}, meta.last_tok[:n])
