"""⑤ runner KV storage: a CacheLayout + this step's block tables / slots in, an AttnCache over paged tensors out.

Pure torch. Storage per cache group (rows are flat; a row's address comes from the block table or slot):
- window rows:      [num_slots * window_ring, head_dim]      row = slot * ring + pos % ring
- state rows:       [num_slots * ring, width] fp32           row = slot * ring + pos % ring   (per layer, kind)
- compressed rows:  [num_blocks * block_size/ratio, dim]     row = table[w // epb] * epb + w % epb  (epb = entries
  per block; per layer, kind "kv" | "index")
NOTE: window and state rows live in rings, so within a layer the model must read a sequence's earlier rows before
it writes the chunk's rows (a long chunk's write reuses the ring slots of the rows it just read); the model does.
fp8 rows (vLLM fp8_ds_mla style): KV rows keep the rope dims in bf16 and store the nope dims as e4m3 with one
power-of-two (UE8M0) scale per 64 dims; index rows are e4m3 with one fp32 power-of-two scale. Dequantized on read.
"""

from __future__ import annotations

import torch

from ds4f.cache.manager import FP8_GROUP, CacheLayout

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """Smallest power of two s with amax / s <= FP8_MAX (amax floored at 1e-4)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-4) / FP8_MAX)))


class RowStore:
    """Flat rows of one (layer, kind) with plain or fp8 storage; read -> `dtype`, write <- any float dtype."""

    def __init__(self, num_rows: int, dim: int, storage: str, rope_dim: int, dtype: torch.dtype,
                 device: torch.device | str, index_rows: bool = False) -> None:
        self.dim, self.dtype, self.fp8 = dim, dtype, storage == "fp8"
        self.index_rows = index_rows
        if not self.fp8:
            self.data = torch.zeros(num_rows, dim, dtype=_TORCH_DTYPES[storage], device=device)
            return
        if index_rows:
            self.data = torch.zeros(num_rows, dim, dtype=torch.uint8, device=device)  # e4m3 bits
            self.scale = torch.ones(num_rows, 1, dtype=torch.float32, device=device)
            return
        self.nope = dim - rope_dim
        self.groups = -(-self.nope // FP8_GROUP)
        self.data = torch.zeros(num_rows, self.nope, dtype=torch.uint8, device=device)  # e4m3 bits
        self.rope = torch.zeros(num_rows, rope_dim, dtype=torch.bfloat16, device=device)
        # UE8M0 exponents 2^(e-127), one per group, padded to 8 bytes per row (the layout's accounting)
        self.exp = torch.full((num_rows, -(-self.groups // 8) * 8), 127, dtype=torch.uint8, device=device)

    @property
    def nbytes(self) -> int:
        parts = [self.data] + ([] if not self.fp8 else [self.scale] if self.index_rows else [self.rope, self.exp])
        return sum(t.numel() * t.element_size() for t in parts)

    def write(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.fp8:
            self.data.index_copy_(0, idx, rows.to(self.data.dtype))
            return
        x = rows.to(torch.bfloat16).float()  # NOTE: round to bf16 first, as the reference does before quantizing
        if self.index_rows:
            s = _pow2_scale(x.abs().amax(dim=-1, keepdim=True))
            self.data.index_copy_(0, idx, (x / s).to(FP8).view(torch.uint8))
            self.scale.index_copy_(0, idx, s)
            return
        n = x.shape[0]
        nope = torch.nn.functional.pad(x[:, : self.nope], (0, self.groups * FP8_GROUP - self.nope))
        nope = nope.view(n, self.groups, FP8_GROUP)  # [n, G, 64]
        s = _pow2_scale(nope.abs().amax(dim=-1, keepdim=True))  # [n, G, 1]
        q = (nope / s).to(FP8).view(torch.uint8).view(n, -1)[:, : self.nope]
        self.data.index_copy_(0, idx, q)
        e = (torch.log2(s.squeeze(-1)) + 127).round().to(torch.uint8)
        self.exp.index_copy_(0, idx, torch.nn.functional.pad(e, (0, self.exp.shape[1] - self.groups), value=127))
        self.rope.index_copy_(0, idx, x[:, self.nope:].to(torch.bfloat16))

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return self.data.index_select(0, idx).to(self.dtype)
        if self.index_rows:
            return (self.data.index_select(0, idx).view(FP8).float() * self.scale.index_select(0, idx)).to(self.dtype)
        n = idx.shape[0]
        q = self.data.index_select(0, idx).view(FP8).float()
        q = torch.nn.functional.pad(q, (0, self.groups * FP8_GROUP - self.nope)).view(n, self.groups, FP8_GROUP)
        s = torch.exp2(self.exp.index_select(0, idx)[:, : self.groups].float() - 127).unsqueeze(-1)
        nope = (q * s).view(n, -1)[:, : self.nope]
        return torch.cat([nope, self.rope.index_select(0, idx).float()], dim=-1).to(self.dtype)


class PagedKVCache:
    """Owns every cache tensor of the engine; `bind()` gives the per-step AttnCache view."""

    def __init__(self, layout: CacheLayout, num_blocks: int, num_slots: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.layout, self.num_blocks, self.num_slots = layout, num_blocks, num_slots
        self.dtype, self.device = dtype, torch.device(device)
        L, st = layout, layout.kv_dtype
        self.window = {layer: RowStore(num_slots * L.window_ring, L.head_dim, st, L.rope_dim, dtype, device)
                       for layer in L.window_layers}
        self.compressed: dict[tuple[int, str], RowStore] = {}
        self.epb: dict[int, int] = {}
        for c in L.compressed:
            self.epb[c.layer] = epb = L.block_size // c.ratio
            self.compressed[c.layer, "kv"] = RowStore(num_blocks * epb, L.head_dim, st, L.rope_dim, dtype, device)
            if c.has_index:
                self.compressed[c.layer, "index"] = RowStore(num_blocks * epb, L.index_head_dim, st, L.rope_dim, dtype,
                                                             device, index_rows=True)
        self.state = {(s.layer, s.kind): torch.zeros(num_slots * s.ring, s.width, dtype=torch.float32, device=device)
                      for s in L.states}
        self.state_ring = {(s.layer, s.kind): s.ring for s in L.states}

    @property
    def nbytes(self) -> int:
        n = sum(s.nbytes for s in self.window.values()) + sum(s.nbytes for s in self.compressed.values())
        return n + sum(t.numel() * 4 for t in self.state.values())

    def bind(self, block_tables: list[list[int]], slots: list[int]) -> PagedAttnCache:
        return PagedAttnCache(self, block_tables, slots)


class PagedAttnCache:
    """AttnCache (ds4f/model/cache.py) for one step: sequence b of the batch uses block_tables[b] and slots[b]."""

    def __init__(self, kv: PagedKVCache, block_tables: list[list[int]], slots: list[int]) -> None:
        self.kv, self.block_tables, self.slots = kv, block_tables, slots
        self._tables: dict[int, torch.Tensor] = {}

    def _ring_idx(self, seq: int, ring: int, lo: int, hi: int) -> torch.Tensor:
        return self.slots[seq] * ring + torch.arange(lo, hi, device=self.kv.device) % ring

    def _entry_idx(self, layer: int, seq: int, lo: int, hi: int) -> torch.Tensor:
        t = self._tables.get(seq)
        if t is None:
            t = self._tables[seq] = torch.tensor(self.block_tables[seq], dtype=torch.long, device=self.kv.device)
        epb = self.kv.epb[layer]
        w = torch.arange(lo, hi, device=self.kv.device)
        return t[w // epb] * epb + w % epb

    # ---- window: position-indexed ring ----
    def read_window(self, layer: int, seq: int, lo: int, hi: int) -> torch.Tensor:
        ring = self.kv.layout.window_ring
        assert hi - lo <= ring, f"window read of {hi - lo} rows exceeds the ring of {ring}"
        return self.kv.window[layer].read(self._ring_idx(seq, ring, lo, hi))

    def write_window(self, layer: int, seq: int, lo: int, rows: torch.Tensor) -> None:
        ring = self.kv.layout.window_ring
        if rows.shape[0] > ring:  # only the last `ring` positions can be read again
            lo, rows = lo + rows.shape[0] - ring, rows[-ring:]
        self.kv.window[layer].write(self._ring_idx(seq, ring, lo, lo + rows.shape[0]), rows)

    # ---- compressor carry: position-indexed ring, fp32 ----
    def read_state(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        ring = self.kv.state_ring[layer, kind]
        assert hi - lo <= ring, f"state read of {hi - lo} rows exceeds the ring of {ring}"
        return self.kv.state[layer, kind].index_select(0, self._ring_idx(seq, ring, lo, hi))

    def write_state(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None:
        ring = self.kv.state_ring[layer, kind]
        if rows.shape[0] > ring:
            lo, rows = lo + rows.shape[0] - ring, rows[-ring:]
        self.kv.state[layer, kind].index_copy_(0, self._ring_idx(seq, ring, lo, lo + rows.shape[0]),
                                               rows.to(torch.float32))

    # ---- compressed entries: paged by block table ----
    def read_compressed(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        return self.kv.compressed[layer, kind].read(self._entry_idx(layer, seq, lo, hi))

    def write_compressed(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None:
        if rows.shape[0]:
            self.kv.compressed[layer, kind].write(self._entry_idx(layer, seq, lo, lo + rows.shape[0]), rows)
