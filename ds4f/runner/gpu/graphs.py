"""⑤ runner GPU fast path, decode CUDA graphs: (slot, position, token) per sequence in, logits [n, vocab] out.

One graph per batch bucket (captured largest first into one shared memory pool); every bucket reads the first
`bucket` rows of one set of static metadata buffers, so a step is: fill buffers (H2D), replay, read logits.
Padding rows point at the dummy slot / block of the FastCache, so they never touch live sequences.
"""

from __future__ import annotations

import os

import torch

from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache, slice_meta

BUCKETS = (1, 2, 4, 8, 16)
TIMING = os.environ.get("DS4F_GRAPH_TIMING") == "1"  # CUDA events around each replay (benches: GPU vs host time)


class DecodeGraphs:
    def __init__(self, fm: FastModel, cache: FastCache, buckets: tuple[int, ...] = BUCKETS) -> None:
        assert cache.device.type == "cuda", "CUDA graphs need a CUDA device"
        self.fm, self.cache = fm, cache
        self.buckets = tuple(sorted(buckets))
        self.buf = cache.decode_buffers(self.buckets[-1], fm.ratios)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.out: dict[int, torch.Tensor] = {}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS handles; writes only hit dummy rows
            for b in reversed(self.buckets):
                meta = slice_meta(self.buf, b)
                fm.logits(fm.forward(meta, cache), meta)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            meta = slice_meta(self.buf, b)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.out[b] = fm.logits(fm.forward(meta, cache), meta)
            self.graphs[b] = g
        torch.cuda.synchronize()
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} sequences exceed the largest bucket {self.buckets[-1]}")

    def prepare(self, seqs: list[tuple[int, int, int]]) -> int:
        """Fill the static buffers for one step of (slot, position, token id); returns the bucket to replay."""
        b = self.bucket(len(seqs))
        self.cache.fill_decode(slice_meta(self.buf, b), seqs)
        return b

    def step(self, seqs: list[tuple[int, int, int]]) -> torch.Tensor:
        """One decode step -> logits [len(seqs), vocab] fp32 (a view of the graph's output; copy to keep)."""
        b = self.prepare(seqs)
        if TIMING:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            self.graphs[b].replay()
            ev[1].record()
            self.events.append(ev)
        else:
            self.graphs[b].replay()
        return self.out[b][: len(seqs)]

    def replay_ms(self) -> float | None:
        """Median GPU ms of the replays since the last call (DS4F_GRAPH_TIMING=1; None without), then forgets them."""
        if not self.events:
            return None
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) for s, e in self.events)
        self.events = []
        return ts[len(ts) // 2]
