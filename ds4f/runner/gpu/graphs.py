"""⑤ runner GPU fast path, decode CUDA graphs: (slot, position, token) per sequence in, logits [n, vocab] out.

One graph per (batch bucket, context class) (captured largest first into one shared memory pool); every bucket reads
the first `bucket` rows of one set of static metadata buffers, so a step is: fill buffers (H2D), replay, read logits.
Padding rows point at the dummy slot / block of the FastCache, so they never touch live sequences.
Context classes (DS4F_GRAPH_CTX, caps in tokens below the cache's max_ctx): a class's graphs are captured with
StepMeta.max_len = cap, so the indexer scores and top-k / HCA attention see cap // ratio columns instead of
max_ctx // ratio (glue.index_len, as eager steps); a step replays the smallest class whose cap holds every sequence's
position + 1. At max_ctx = 1M a short-context step would otherwise pay the 262144-column indexer launch grids.

Host path of a step (DecodeInputs): token ids, positions, slots, chunk starts / ends live in one packed [5, B] device
buffer filled by ONE copy from a persistent pinned staging buffer; a block-table row is copied only when that row's
table changed since the last step (a new block every block_size tokens, another sequence in the row), and then only
its changed entries, so a steady decode step does no work proportional to the table length but one list compare.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache, StepMeta, slice_meta

BUCKETS = (1, 2, 4, 8, 16)
# context-class caps (tokens). 32768: CSA's ratio-4 rows are 8192 columns, one top-k launch (DS4F_TOPK_SMALL's lanes)
def _caps(text: str) -> tuple[int, ...]:
    try:
        caps = tuple(int(c) for c in text.replace(",", " ").split())
    except ValueError:
        caps = (-1,)
    if any(c < 0 for c in caps):
        raise ValueError(f"DS4F_GRAPH_CTX={text!r}: give context caps in tokens, e.g. 32768 or 32768,262144 (0: none)")
    return tuple(c for c in caps if c)


CTX_CAPS = _caps(os.environ.get("DS4F_GRAPH_CTX", "32768"))
Key = tuple[int, int | None]  # (bucket, context cap; None = max_ctx)
TIMING = os.environ.get("DS4F_GRAPH_TIMING") == "1"  # CUDA events around each replay (benches: GPU vs host time)


class DecodeGraphs:
    def __init__(self, fm: FastModel, cache: FastCache, buckets: tuple[int, ...] = BUCKETS,
                 caps: tuple[int, ...] = CTX_CAPS) -> None:
        assert cache.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.fm, self.cache = fm, cache
        self.buckets = tuple(sorted(buckets))
        self.setup_buffers(caps)
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.out: dict[Key, torch.Tensor] = {}
        keys = [(b, c) for c in reversed(self.caps) for b in reversed(self.buckets)]  # largest first
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS handles; writes only hit dummy rows
            for k in keys:
                meta = self.meta(k)
                fm.logits(fm.forward(meta, cache), meta)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for k in keys:
            meta = self.meta(k)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.out[k] = fm.logits(fm.forward(meta, cache), meta)
            self.graphs[k] = g
        torch.cuda.synchronize()
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def setup_buffers(self, caps: tuple[int, ...] = CTX_CAPS) -> None:
        """The static metadata buffers every graph reads (before capture) and the context classes: the caps below
        max_ctx, ascending, then None (every column)."""
        self.inputs = DecodeInputs(self.cache, self.buckets[-1], self.fm.ratios)
        self.buf = self.inputs.meta
        self.caps: tuple[int | None, ...] = (*sorted({c for c in caps if 0 < c < self.cache.max_ctx}), None)

    def meta(self, key: Key) -> StepMeta:
        """The StepMeta a key's graph runs: the bucket's rows of the static buffers, max_len = the class's cap."""
        b, cap = key
        return dataclasses.replace(slice_meta(self.buf, b), max_len=cap)

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} sequences exceed the largest bucket {self.buckets[-1]}")

    def ctx_class(self, seqs: list[tuple[int, int, int]]) -> int | None:
        """The smallest cap holding every sequence's position + 1 (a token at p sees (p + 1) // ratio entries)."""
        need = max((p + 1 for _, p, _ in seqs), default=0)
        return next(c for c in self.caps if c is None or need <= c)

    def prepare(self, seqs: list[tuple[int, int, int]]) -> Key:
        """Fill the static buffers for one step of (slot, position, token id); returns the graph's key to replay."""
        b = self.bucket(len(seqs))
        self.inputs.fill(seqs, b)
        return b, self.ctx_class(seqs)

    def step(self, seqs: list[tuple[int, int, int]], feed: Any = None) -> torch.Tensor:
        """One decode step -> logits [len(seqs), vocab] fp32 (a view of the graph's output; copy to keep). feed: called
        with the static input ids [bucket] after they are filled, before the replay (device-side token ids)."""
        k = self.prepare(seqs)
        if feed is not None:
            feed(self.inputs.meta.input_ids)
        if TIMING:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            self.graphs[k].replay()
            ev[1].record()
            self.events.append(ev)
        else:
            self.graphs[k].replay()
        return self.out[k][: len(seqs)]

    def replay_ms(self) -> float | None:
        """Median GPU ms of the replays since the last call (DS4F_GRAPH_TIMING=1; None without), then forgets them."""
        if not self.events:
            return None
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) for s, e in self.events)
        self.events = []
        return ts[len(ts) // 2]


class DecodeInputs:
    """The static decode buffers of up to B sequences (StepMeta `meta`, padding rows at the dummy slot / block) and
    their host staging: `fill` writes one step exactly as FastCache.fill_decode would, with one H2D copy of the
    packed [5, B] fields (+ one per block-table row that changed)."""

    def __init__(self, cache: FastCache, bucket: int, ratios: list[int]) -> None:
        self.cache = cache
        meta = cache.decode_buffers(bucket, ratios)
        pin = cache.device.type == "cuda"
        # rows: input ids, positions, slots, chunk starts (= positions), chunk ends (= positions + 1)
        self.host = torch.zeros(5, bucket, dtype=torch.int64, pin_memory=pin)
        self.h = self.host.numpy()
        self.h[2], self.h[4] = cache.dummy_slot, 1
        self.packed = torch.empty(5, bucket, dtype=torch.int64, device=cache.device).copy_(self.host)
        self.meta: StepMeta = dataclasses.replace(meta, input_ids=self.packed[0], positions=self.packed[1],
                                                  tok_slot=self.packed[2], chunk_start=self.packed[3],
                                                  chunk_end=self.packed[4])
        self.table_host = torch.full(tuple(meta.block_table.shape), cache.dummy_block, dtype=torch.int64,
                                     pin_memory=pin)
        self.tnp = self.table_host.numpy()
        self.rows: list[list[int]] = [[] for _ in range(bucket)]  # device row i = rows[i] + dummy blocks
        self.done = torch.cuda.Event() if pin else None  # the last fill's copies (staging reuse waits on it)

    def fill(self, seqs: list[tuple[int, int, int]], bucket: int) -> None:
        """(slot, position, token id) per sequence into the first `bucket` rows (the rest of them padding)."""
        n = len(seqs)
        assert n <= bucket <= self.h.shape[1]
        if self.done is not None:
            self.done.synchronize()  # long complete in practice: a step's copies precede its replay
        h, ensure = self.h, self.cache.ensure
        for i, (s, p, tok) in enumerate(seqs):
            h[0, i], h[1, i], h[2, i] = tok, p, s
            t = ensure(s, p + 1)
            if t != self.rows[i]:
                self._row(i, t)
        if n < bucket:
            h[0, n:bucket] = 0
            h[1, n:bucket] = 0
            h[2, n:bucket] = self.cache.dummy_slot
            for i in range(n, bucket):
                if self.rows[i]:
                    self._row(i, [])
        h[3] = h[1]
        np.add(h[1], 1, out=h[4])
        self.packed.copy_(self.host, non_blocking=True)
        if self.done is not None:
            self.done.record()

    def _row(self, i: int, t: list[int]) -> None:
        """Make device block-table row i hold t + dummy blocks, copying only the entries that differ."""
        prev = self.rows[i]
        k = len(prev)
        lo = k if k <= len(t) and t[:k] == prev else 0
        hi = max(k, len(t))
        row = self.tnp[i]
        row[lo:len(t)] = t[lo:]
        row[len(t):hi] = self.cache.dummy_block
        if hi > lo:
            self.meta.block_table[i, lo:hi].copy_(self.table_host[i, lo:hi], non_blocking=True)
        self.rows[i] = list(t)
