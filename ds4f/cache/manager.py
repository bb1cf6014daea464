"""④ cache manager: request ids + token counts in, per-request block tables and slots out (CPU bookkeeping only).

Two cache groups, each a BlockPool:
- compressed blocks (grow with the sequence): one block = `block_size` positions of every compressed layer, i.e.
  block_size/ratio CSA KV entries + as many indexer keys per CSA layer, and block_size/ratio HCA KV entries per HCA
  layer. A request's block table covers positions [0, num_tokens).
- slots (fixed per running request): a position-indexed ring of the last `window_ring` window rows of every layer
  (main + MTP), and the compressor carry rings (CSA 2*ratio, HCA ratio positions, + speculative slack). Rows are
  addressed by position modulo the ring, so rewriting the last k positions is a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ds4f.cache.block_pool import BlockPool

if TYPE_CHECKING:
    from ds4f.model.args import ModelArgs

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"
_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP8_GROUP = 64  # nope dims per power-of-two scale in fp8 KV rows


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class StateRing:
    layer: int
    kind: str  # "attn" | "index"
    ring: int  # positions kept
    width: int  # fp32 values per row: K | Z+ape


@dataclass(frozen=True)
class CompressedLayer:
    layer: int
    ratio: int
    has_index: bool  # CSA layers also keep lightning-indexer keys


@dataclass(frozen=True)
class CacheLayout:
    """What the V4 cache stores, and its bytes, for one model + block size + KV dtype."""

    block_size: int
    kv_dtype: str  # "float32" | "bfloat16" | "float16" | "fp8"
    head_dim: int
    rope_dim: int
    index_head_dim: int
    window_layers: tuple[int, ...]
    window_ring: int
    compressed: tuple[CompressedLayer, ...]
    states: tuple[StateRing, ...]

    @classmethod
    def from_model_args(cls, args: ModelArgs, block_size: int, kv_dtype: str, spec_slack: int = 0) -> CacheLayout:
        compressed, states = [], []
        for layer in range(args.num_hidden_layers):
            kind, m = args.layer_type(layer), args.compress_ratio(layer)
            if kind not in (CSA, HCA):
                continue
            if block_size % m:
                raise ValueError(f"--block-size {block_size} must be a multiple of every compress ratio "
                                 f"({sorted(set(args.compress_ratios) - {0})})")
            csa = kind == CSA
            compressed.append(CompressedLayer(layer, m, csa))
            # NOTE: the compressor reads at most 2*ratio (CSA, overlapping) / ratio (HCA) positions back
            ring = (2 * m if csa else m) + spec_slack
            states.append(StateRing(layer, "attn", ring, 2 * (2 if csa else 1) * args.head_dim))
            if csa:
                states.append(StateRing(layer, "index", ring, 2 * 2 * args.index_head_dim))
        if kv_dtype not in (*_ELEM_BYTES, "fp8"):
            raise ValueError(f"--kv-cache-dtype: unsupported storage {kv_dtype!r}")
        return cls(
            block_size=block_size, kv_dtype=kv_dtype, head_dim=args.head_dim, rope_dim=args.qk_rope_head_dim,
            index_head_dim=args.index_head_dim,
            window_layers=tuple(range(args.num_hidden_layers + args.num_nextn_predict_layers)),
            # NOTE: reads ask for at most sliding_window - 1 positions before a chunk (+ slack for rollback)
            window_ring=args.sliding_window + spec_slack,
            compressed=tuple(compressed), states=tuple(states),
        )

    # ---- bytes ----
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def fp8_scale_bytes(self) -> int:
        """UE8M0 scale bytes per fp8 KV row: one per FP8_GROUP nope dims, padded to 8 (vLLM fp8_ds_mla)."""
        return _round_up(-(-self.nope_dim // FP8_GROUP), 8)

    @property
    def kv_row_bytes(self) -> int:
        if self.kv_dtype == "fp8":  # e4m3 nope + bf16 rope + scales: 448 + 128 + 8 = 584 for V4-Flash
            return self.nope_dim + 2 * self.rope_dim + self.fp8_scale_bytes
        return self.head_dim * _ELEM_BYTES[self.kv_dtype]

    @property
    def index_row_bytes(self) -> int:
        if self.kv_dtype == "fp8":  # e4m3 + one fp32 power-of-two scale: 132 for V4-Flash
            return self.index_head_dim + 4
        return self.index_head_dim * _ELEM_BYTES[self.kv_dtype]

    @property
    def block_bytes(self) -> int:
        per = 0
        for c in self.compressed:
            per += (self.block_size // c.ratio) * (self.kv_row_bytes + (self.index_row_bytes if c.has_index else 0))
        return per

    @property
    def bytes_per_token(self) -> float:
        """Growing cache per token of context (compressed KV + index keys), whole model."""
        return self.block_bytes / self.block_size

    @property
    def window_bytes(self) -> int:
        return len(self.window_layers) * self.window_ring * self.kv_row_bytes

    @property
    def state_bytes(self) -> int:
        return sum(s.ring * s.width * 4 for s in self.states)

    @property
    def slot_bytes(self) -> int:
        """Fixed cache per running sequence: window rings + compressor carry rings."""
        return self.window_bytes + self.state_bytes

    def plan(self, budget_bytes: int, max_num_seqs: int) -> tuple[int, int]:
        """-> (num_blocks, num_slots) fitting in budget_bytes; slots take at most half of the budget."""
        num_slots = min(max_num_seqs, (budget_bytes // 2) // max(self.slot_bytes, 1))
        if num_slots < 1:
            raise ValueError(f"KV cache budget {budget_bytes / 2**20:.1f} MiB cannot hold one sequence slot "
                             f"({self.slot_bytes / 2**20:.1f} MiB fixed per sequence); raise --kv-cache-memory or "
                             "--gpu-memory-utilization")
        num_blocks = (budget_bytes - num_slots * self.slot_bytes) // max(self.block_bytes, 1)
        return int(num_blocks), int(num_slots)

    def describe(self, num_blocks: int, num_slots: int) -> str:
        return (f"KV cache ({self.kv_dtype}, block {self.block_size} tokens): {self.bytes_per_token:.2f} B/token "
                f"growing + {self.slot_bytes / 2**20:.2f} MiB/sequence fixed (window {self.window_bytes / 2**20:.2f}"
                f" + compressor state {self.state_bytes / 2**20:.2f}); {num_blocks} blocks = "
                f"{num_blocks * self.block_size} tokens fit, {num_slots} sequence slots, "
                f"{(num_blocks * self.block_bytes + num_slots * self.slot_bytes) / 2**30:.3f} GiB")


class KVCacheManager:
    """Per-request block table (compressed group) and slot (window + state group) over two BlockPools.

    Prefix caching will add chained block hashes on full blocks plus a snapshot of the slot (window + compressor
    carry) at block boundaries; speculative rollback will shrink num_tokens without touching the slot rings.
    """

    def __init__(self, layout: CacheLayout, num_blocks: int, num_slots: int) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.blocks = BlockPool(num_blocks, "compressed blocks")
        self.slots = BlockPool(num_slots, "sequence slots")
        self.block_tables: dict[str, list[int]] = {}
        self.slot_of: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return max(self.blocks.usage, self.slots.usage)

    def num_new_blocks(self, req_id: str, num_tokens: int) -> int:
        have = len(self.block_tables.get(req_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def max_tokens_per_seq(self) -> int:
        return self.blocks.num_blocks * self.block_size

    def allocate(self, req_id: str, num_tokens: int) -> bool:
        """Make the request's cache cover positions [0, num_tokens); False (and nothing changes) if it does not fit."""
        need_slot = req_id not in self.slot_of
        need = self.num_new_blocks(req_id, num_tokens)
        if need > self.blocks.num_free or (need_slot and self.slots.num_free == 0):
            return False
        if need_slot:
            self.slot_of[req_id] = self.slots.allocate(1)[0]
            self.block_tables[req_id] = []
        if need:
            self.block_tables[req_id].extend(self.blocks.allocate(need))
        return True

    def free(self, req_id: str) -> None:
        table = self.block_tables.pop(req_id, None)
        if table is not None:
            self.blocks.free(table)
            self.slots.free([self.slot_of.pop(req_id)])

    def block_table(self, req_id: str) -> list[int]:
        return self.block_tables[req_id]

    def slot(self, req_id: str) -> int:
        return self.slot_of[req_id]

    def check_integrity(self) -> None:
        held: dict[int, int] = {}
        for table in self.block_tables.values():
            for b in table:
                held[b] = held.get(b, 0) + 1
        self.blocks.check_integrity(held)
        slots: dict[int, int] = {}
        for s in self.slot_of.values():
            slots[s] = slots.get(s, 0) + 1
        self.slots.check_integrity(slots)
        assert set(self.slot_of) == set(self.block_tables), "requests with a slot but no table, or vice versa"
        if not self.block_tables:
            assert self.blocks.num_free == self.blocks.num_blocks and self.slots.num_free == self.slots.num_blocks
