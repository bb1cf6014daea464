"""④ block pool: exact block ids, free-queue order, ref counts and the integrity check."""

from __future__ import annotations

import random

import pytest

from ds4f.cache.block_pool import BlockPool, NoFreeBlocksError


def test_allocate_in_order_and_reuse_tail_first() -> None:
    pool = BlockPool(6)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert (a, b) == ([0, 1, 2], [3, 4])
    pool.free(a)  # freed in reverse: 2, 1, 0 join the back of the queue after 5
    assert pool.allocate(4) == [5, 2, 1, 0]
    assert pool.num_free == 0 and pool.num_used == 6
    pool.check_integrity()


def test_all_or_nothing_and_errors() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError, match="asked for 2 blocks, 1 free of 3"):
        pool.allocate(2)
    assert pool.num_free == 1
    with pytest.raises(ValueError, match="double free"):
        pool.free([2])
    with pytest.raises(ValueError, match="incref of free block"):
        pool.incref([2])


def test_ref_counts_keep_shared_blocks_until_last_free() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.incref(a)
    pool.free(a)
    assert pool.num_free == 2 and pool.ref_cnt[:2] == [1, 1]
    pool.check_integrity({0: 1, 1: 1})
    with pytest.raises(AssertionError, match="ref count 1 but 2 holders"):
        pool.check_integrity({0: 2, 1: 1})
    pool.free(a)
    assert pool.num_free == 4
    pool.check_integrity({})


def test_integrity_catches_corruption() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    pool.ref_cnt[3] = 1  # used and still in the free queue
    with pytest.raises(AssertionError, match="both free and used"):
        pool.check_integrity()


def test_random_alloc_free_keeps_invariants() -> None:
    rng = random.Random(0)
    pool = BlockPool(64)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and (rng.random() < 0.45 or pool.num_free == 0):
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 8)
            if n <= pool.num_free:
                held.append(pool.allocate(n))
        counts = {b: 1 for h in held for b in h}
        pool.check_integrity(counts)
        assert pool.num_used == sum(map(len, held))
