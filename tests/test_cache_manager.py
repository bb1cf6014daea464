"""④ cache manager: V4 cache bytes (v4-architecture.md §3.1), capacity planning, block tables and slots."""

from __future__ import annotations

import pytest

from ds4f.cache.manager import CacheLayout, KVCacheManager
from ds4f.model.args import ModelArgs, flash_config, tiny_config

FLASH = ModelArgs.from_hf(flash_config())
TINY = ModelArgs.from_hf(tiny_config())


def test_flash_bytes_per_token_match_the_architecture_doc() -> None:
    bf16 = CacheLayout.from_model_args(FLASH, 256, "bfloat16")
    fp8 = CacheLayout.from_model_args(FLASH, 256, "fp8")
    assert bf16.bytes_per_token == 6880  # 21 x (1024/4 + 256/4) + 20 x 1024/128
    assert fp8.bytes_per_token == pytest.approx(3850, abs=0.5)  # 21 x (146 + 33) + 20 x 4.5625
    assert (bf16.kv_row_bytes, fp8.kv_row_bytes, fp8.index_row_bytes) == (1024, 584, 132)
    # fixed per sequence: 44 windows x 128 rows (main + MTP) and the vLLM-style fp32 compressor rings (11.6 MiB)
    assert bf16.window_bytes == 44 * 128 * 1024
    assert bf16.state_bytes == 21 * (8 * 2048 + 8 * 512) * 4 + 20 * 128 * 1024 * 4
    assert bf16.state_bytes / 2**20 == pytest.approx(11.64, abs=0.01)


def test_tiny_layout_and_block_size_check() -> None:
    lay = CacheLayout.from_model_args(TINY, 16, "float32")
    assert [(c.layer, c.ratio, c.has_index) for c in lay.compressed] == [(1, 4, True), (2, 16, False), (3, 4, True)]
    assert lay.block_bytes == 2 * 4 * (64 + 32) * 4 + 1 * 64 * 4
    assert lay.window_layers == (0, 1, 2, 3, 4) and lay.window_ring == 8
    with pytest.raises(ValueError, match="--block-size 8 must be a multiple of every compress ratio"):
        CacheLayout.from_model_args(TINY, 8, "float32")


def test_plan_splits_the_budget() -> None:
    lay = CacheLayout.from_model_args(FLASH, 256, "bfloat16")
    blocks, slots = lay.plan(80 << 30, 256)
    assert slots == 256
    assert blocks * lay.block_bytes + slots * lay.slot_bytes <= 80 << 30
    assert (blocks + 1) * lay.block_bytes + slots * lay.slot_bytes > 80 << 30
    blocks, slots = lay.plan(1 << 30, 256)  # slots never take more than half
    assert slots == (1 << 29) // lay.slot_bytes and blocks > 0
    with pytest.raises(ValueError, match="cannot hold one sequence slot"):
        lay.plan(1 << 20, 256)


def test_allocate_grow_free_exact_ids() -> None:
    m = KVCacheManager(CacheLayout.from_model_args(TINY, 16, "float32"), num_blocks=5, num_slots=2)
    assert m.allocate("a", 17)  # 2 blocks
    assert m.allocate("b", 16)
    assert (m.block_table("a"), m.slot("a"), m.block_table("b"), m.slot("b")) == ([0, 1], 0, [2], 1)
    assert m.allocate("a", 33) and m.block_table("a") == [0, 1, 3]
    assert not m.allocate("b", 33)  # needs 2, 1 free: nothing changes
    assert m.block_table("b") == [2]
    assert not m.allocate("c", 1)  # no slot left
    m.check_integrity()
    m.free("a")
    assert m.blocks.num_free == 4 and m.slots.num_free == 1
    assert m.allocate("c", 40) and m.block_table("c") == [4, 3, 1] and m.slot("c") == 0
    m.check_integrity()
    m.free("b")
    m.free("c")
    m.free("c")  # freeing an unknown / already freed request is a no-op
    m.check_integrity()
    assert m.blocks.num_free == 5 and m.slots.num_free == 2


def test_integrity_catches_a_leak() -> None:
    m = KVCacheManager(CacheLayout.from_model_args(TINY, 16, "float32"), num_blocks=4, num_slots=2)
    m.allocate("a", 20)
    m.block_tables["a"].pop()  # a block held by nobody
    with pytest.raises(AssertionError, match="holders"):
        m.check_integrity()
