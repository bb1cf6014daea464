"""W ranks as forked processes over one shared anonymous mapping (the "NVLink" of the push all-reduce's interpreter
tests): each rank runs the same body on its own copy of the process; the children's failures reach the parent."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import torch


def run_ranks(world: int, region_numel: int, body: Callable[[int, list[int]], None]) -> None:
    """body(rank, addrs) on ranks 0..world-1 (rank 0 in this process, the others forked): addrs[q] is rank q's
    region of region_numel zeroed bf16 elements in one MAP_SHARED mapping every rank sees. Raises here if any rank's
    body raised."""
    mm = mmap.mmap(-1, world * region_numel * 2)  # MAP_SHARED | MAP_ANONYMOUS: survives the fork, zeroed
    whole = torch.frombuffer(mm, dtype=torch.bfloat16)
    addrs = [whole[q * region_numel:].data_ptr() for q in range(world)]
    kids, rank = [], 0
    for r in range(1, world):
        pid = os.fork()
        if pid == 0:
            rank = r
            break
        kids.append(pid)
    ok = 1
    try:
        body(rank, addrs)
    except BaseException as ex:  # a child must exit here, never return into the parent's code
        print(f"rank {rank}: {type(ex).__name__}: {ex}", flush=True)
        ok = 0
    if rank:
        os._exit(0 if ok else 1)
    codes = [os.waitpid(pid, 0)[1] for pid in kids]
    assert ok and codes == [0] * len(kids), (world, ok, codes)
