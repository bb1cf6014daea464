"""⑥ model ↔ ④ cache seam: the caller-owned attention state the model reads and writes each forward.

The model never owns KV storage. Each forward gets an `AttnBatch`: a batch of sequences, each contributing one
contiguous chunk of new tokens (positions start_pos .. start_pos + n - 1), and an `AttnCache` that holds what
earlier forwards wrote. The engine implements AttnCache over paged blocks; `DenseCache` below is the simple
per-sequence implementation used by tests and by standalone model runs.

Contract (all indices absolute; `seq` is the index of the sequence inside the batch):
- window rows: post-norm, post-RoPE K=V rows [n, head_dim] addressed by position. Reads only ask for positions
  below the chunk's start_pos and at most `sliding_window - 1` (+ speculative slack) back.
- state rows: compressor carry, fp32 [n, width] addressed by position, width = 2 * c * d (K | Z+ape), where
  kind "attn" has c*d = 2*head_dim (CSA) or head_dim (HCA) and kind "index" has c*d = 2*index_head_dim.
  Reads only ask for positions below start_pos and at most 2*ratio (CSA) / ratio (HCA) back.
- compressed rows: entry w of kind "kv" [n, head_dim] or "index" [n, index_head_dim], addressed by entry index.
- Writes cover the whole chunk (the model writes every new position / every entry it completed); storage keeps
  what later reads can ask for. Rewriting a position or entry overwrites it, which is how rollback works.
- Reads return the model's compute dtype (window, compressed) or fp32 (state); fp8 storage dequantizes on read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class AttnCache(Protocol):
    def read_window(self, layer: int, seq: int, lo: int, hi: int) -> torch.Tensor: ...
    def write_window(self, layer: int, seq: int, lo: int, rows: torch.Tensor) -> None: ...
    def read_state(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor: ...
    def write_state(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None: ...
    def read_compressed(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor: ...
    def write_compressed(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None: ...


@dataclass
class AttnBatch:
    """Per-forward metadata. Tokens are flattened: sequence b owns rows query_start_loc[b]:query_start_loc[b+1]."""

    query_start_loc: list[int]
    start_pos: list[int]
    cache: AttnCache

    @property
    def num_seqs(self) -> int:
        return len(self.start_pos)

    def seq_slice(self, b: int) -> slice:
        return slice(self.query_start_loc[b], self.query_start_loc[b + 1])


@dataclass
class _SeqStore:
    window: dict[int, torch.Tensor] = field(default_factory=dict)
    state: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    compressed: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


def _put(buf: torch.Tensor | None, lo: int, rows: torch.Tensor) -> torch.Tensor:
    """Grow-on-demand dense buffer indexed by absolute position / entry."""
    hi = lo + rows.shape[0]
    if buf is None or buf.shape[0] < hi:
        new = rows.new_zeros((max(hi, 2 * (0 if buf is None else buf.shape[0])), *rows.shape[1:]))
        if buf is not None:
            new[: buf.shape[0]] = buf
        buf = new
    buf[lo:hi] = rows
    return buf


class DenseCache:
    """Keeps every row ever written, per sequence id; `seq` indices map to ids through `seq_ids`."""

    def __init__(self) -> None:
        self.seqs: dict[int, _SeqStore] = {}
        self.seq_ids: list[int] = [0]

    def bind(self, seq_ids: list[int]) -> DenseCache:
        self.seq_ids = list(seq_ids)
        for s in seq_ids:
            self.seqs.setdefault(s, _SeqStore())
        return self

    def _s(self, seq: int) -> _SeqStore:
        return self.seqs.setdefault(self.seq_ids[seq], _SeqStore())

    def read_window(self, layer: int, seq: int, lo: int, hi: int) -> torch.Tensor:
        return self._s(seq).window[layer][lo:hi]

    def write_window(self, layer: int, seq: int, lo: int, rows: torch.Tensor) -> None:
        s = self._s(seq)
        s.window[layer] = _put(s.window.get(layer), lo, rows)

    def read_state(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        return self._s(seq).state[layer, kind][lo:hi]

    def write_state(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None:
        s = self._s(seq)
        s.state[layer, kind] = _put(s.state.get((layer, kind)), lo, rows)

    def read_compressed(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        return self._s(seq).compressed[layer, kind][lo:hi]

    def write_compressed(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None:
        s = self._s(seq)
        s.compressed[layer, kind] = _put(s.compressed.get((layer, kind)), lo, rows)
