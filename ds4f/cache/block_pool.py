"""④ cache: block ids in, block ids out; ref counts and the free queue of one cache group (CPU bookkeeping only)."""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    """Fixed set of block ids 0..num_blocks-1, each free or held with a ref count >= 1.

    NOTE: free + used == num_blocks, and a block is in the free queue iff its ref count is 0.
    The free queue is ordered (oldest freed first) so prefix caching can later keep freed blocks with a hash in it and
    evict them least-recently-freed first; `block_hash` is where that hash will live (always None for now).
    """

    def __init__(self, num_blocks: int, name: str = "blocks") -> None:
        if num_blocks < 0:
            raise ValueError(f"{name}: num_blocks must be >= 0, got {num_blocks}")
        self.name = name
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks if self.num_blocks else 0.0

    def allocate(self, n: int) -> list[int]:
        """Pop n blocks off the front of the free queue with ref count 1; all or nothing."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"{self.name}: asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self.ref_cnt[b] = 1
            self.block_hash[b] = None
            out.append(b)
        return out

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref_cnt[b] == 0:
                raise ValueError(f"{self.name}: incref of free block {b}")
            self.ref_cnt[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 go to the back of the free queue (in reverse order, so
        the tail of a sequence is reused first, as in vLLM)."""
        for b in reversed(blocks):
            if self.ref_cnt[b] <= 0:
                raise ValueError(f"{self.name}: double free of block {b}")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                self._free[b] = None

    def check_integrity(self, held: dict[int, int] | None = None) -> None:
        """Assert the pool invariants; `held` (block -> number of holders), if given, must match the ref counts."""
        free = set(self._free)
        assert len(free) == len(self._free), f"{self.name}: duplicate in free queue"
        used = {b for b in range(self.num_blocks) if self.ref_cnt[b] > 0}
        assert free.isdisjoint(used), f"{self.name}: blocks both free and used: {sorted(free & used)[:8]}"
        assert len(free) + len(used) == self.num_blocks, (
            f"{self.name}: free {len(free)} + used {len(used)} != total {self.num_blocks}")
        assert all(c >= 0 for c in self.ref_cnt), f"{self.name}: negative ref count"
        if held is not None:
            for b in range(self.num_blocks):
                assert held.get(b, 0) == self.ref_cnt[b], (
                    f"{self.name}: block {b} has ref count {self.ref_cnt[b]} but {held.get(b, 0)} holders")
