"""Test helper: run a function as `world` spawned processes (ranks of a CPU gloo group) and collect exit codes."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
from collections.abc import Callable

import torch.distributed as dist


def spawn_ranks(target: Callable[..., None], world: int, *args: object, timeout: float = 120.0) -> list[int | None]:
    """target(rank, store_port, *args) in `world` spawned processes sharing a TCPStore on 127.0.0.1 -> exit codes
    (a process still alive after `timeout` is killed and reports None)."""
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=dt.timedelta(seconds=30), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, store.port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes
