"""⑦ distributed rendezvous: a ParallelConfig + rank in, the shared TCPStore, joined ranks and process groups out.

Whichever node starts first waits: node 0 hosts the TCPStore; other ranks retry connecting until join_timeout, then
fail naming the address:port they waited for. Liveness goes through the store too: each rank bumps `hb/<rank>`
every HEARTBEAT_S and writes `dead/<rank>` with its cause before exiting on an error, so rank 0 can name who failed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ds4f.distributed.comm import gloo_group, nccl_group
from ds4f.distributed.parallel import ParallelConfig, local_ip_towards

HEARTBEAT_S = 0.5
# DS4F_* variables that change only what one process logs, times or how long it waits; every other one picks kernels
# or collectives that pair across ranks (DS4F_HC_AR, DS4F_SYMM_PUSH, DS4F_SP_INDEXER, ...) and must agree
LOCAL_ENV = frozenset({"DS4F_TRACE_WORKER", "DS4F_GRAPH_TIMING", "DS4F_GIT", "DS4F_SYMM_PUSH_TIMEOUT_S"})


class RendezvousError(RuntimeError):
    """Ranks could not meet; the message names the address:port, the missing ranks and the flag to check."""


def log(msg: str) -> None:
    print(f"[ds4f] {msg}", file=sys.stderr, flush=True)


def head_store(pc: ParallelConfig) -> dist.TCPStore:
    """Rank 0's store server: master_port on every interface for several nodes, an ephemeral port for one."""
    port = pc.master_port if pc.multi_node else 0
    try:
        return dist.TCPStore("0.0.0.0" if pc.multi_node else "127.0.0.1", port, None, True,
                             timeout=dt.timedelta(seconds=pc.join_timeout), wait_for_workers=False)
    except Exception as e:  # the port is taken, most often by an earlier run
        raise RendezvousError(f"rank 0: cannot listen on port {port} (--master-port): {e}; stop the process using "
                              f"it or pick another port") from e


def connect_store(pc: ParallelConfig, rank: int, addr: str, port: int) -> dist.TCPStore:
    """A client of the head's store; retries until join_timeout, then names the address it waited for."""
    t0 = time.monotonic()
    try:
        return dist.TCPStore(addr, port, None, False, timeout=dt.timedelta(seconds=pc.join_timeout))
    except Exception as e:
        waited = time.monotonic() - t0
        raise RendezvousError(
            f"rank {rank}: waited {waited:.0f} s for the head (node 0) at {addr}:{port} and it did not answer "
            f"({type(e).__name__}); start node 0 (`ds4f serve ... --node-rank 0`), check --master-addr / "
            f"--master-port and that the port is open, or raise --join-timeout") from e


def join(store: dist.TCPStore, pc: ParallelConfig, rank: int, addr: str, port: int,
         dead: Callable[[], list[str]] = list) -> None:
    """Announce this rank; rank 0 then waits for all of them and names the ones that never came. `dead` lists the
    local ranks that already exited (their exit is the error, not the timeout)."""
    store.set(f"join/{rank}", str(os.getpid()))
    if rank != 0:
        return
    keys = [f"join/{r}" for r in range(pc.world_size)]
    deadline = time.monotonic() + pc.join_timeout
    while time.monotonic() < deadline:
        if store.check(keys):
            return
        _raise_if_dead(dead)
        time.sleep(0.05)
    missing = [r for r in range(pc.world_size) if not store.check([f"join/{r}"])]
    nodes = sorted({pc.node_of(r) for r in missing})
    raise RendezvousError(
        f"rank 0: ranks {missing} (node(s) {nodes}) did not join at {addr}:{port} within {pc.join_timeout:.0f} s "
        f"(--join-timeout); start them with `ds4f serve ... --nnodes {pc.nnodes} --node-rank N "
        f"--master-addr {pc.master_addr} --master-port {pc.master_port} --headless`")


def _raise_if_dead(dead: Callable[[], list[str]]) -> None:
    gone = dead()
    if gone:
        raise RendezvousError("; ".join(gone))


def wait_key(store: dist.TCPStore, key: str, timeout: float, what: str, dead: Callable[[], list[str]] = list) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if store.check([key]):
            return store.get(key)
        _raise_if_dead(dead)
        time.sleep(0.05)
    raise RendezvousError(f"{what} within {timeout:.0f} s (--join-timeout)")


def ds4f_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The DS4F_* variables of `environ` (default os.environ) that must agree across ranks (see LOCAL_ENV)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith("DS4F_") and k not in LOCAL_ENV}


def agree_env(store: Any, rank: int, world: int, env: dict[str, str] | None = None, timeout: float = 600.0) -> None:
    """Publish this rank's ds4f_env and compare: rank 0 against every rank, the others against rank 0; a difference
    raises RendezvousError naming the variables. Ranks launched with different switches would otherwise wait on a
    collective the others never start (the push all-reduce traps after DS4F_SYMM_PUSH_TIMEOUT_S)."""
    env = ds4f_env() if env is None else env
    store.set(f"env/{rank}", json.dumps(env, sort_keys=True))
    for other in (range(1, world) if rank == 0 else [0]):
        theirs = json.loads(wait_key(store, f"env/{other}", timeout, f"rank {rank}: rank {other} published no "
                                              f"DS4F_* environment"))
        diff = sorted(k for k in env.keys() | theirs.keys() if env.get(k) != theirs.get(k))
        if diff:
            shown = "; ".join(f"{k}={env.get(k, '(unset)')} here, {theirs.get(k, '(unset)')} on rank {other}"
                              for k in diff)
            raise RendezvousError(
                f"rank {rank}: the DS4F_* environment differs from rank {other}'s ({shown}): these switches pick "
                f"kernels and collectives that must pair across ranks; set the same DS4F_* variables on every node "
                f"(only {', '.join(sorted(LOCAL_ENV))} may differ)")


def bind_address(pc: ParallelConfig) -> str:
    """The address gloo binds: loopback on one node; with several, GLOO_SOCKET_IFNAME's device when set, else the
    local address that routes to master_addr."""
    if not pc.multi_node:
        return "127.0.0.1"
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return ""
    return local_ip_towards(pc.master_addr, pc.master_port)


def make_groups(store: dist.TCPStore, pc: ParallelConfig, rank: int, device: str) -> tuple[Any, Any]:
    """(control group: gloo, CPU; model group: NCCL on cuda, gloo on cpu), both with distributed_timeout."""
    host = bind_address(pc)
    ctrl = gloo_group(dist.PrefixStore("ctrl", store), rank, pc.world_size, pc.distributed_timeout, host)
    if device.startswith("cuda"):
        if pc.multi_node and not os.environ.get("NCCL_SOCKET_IFNAME") and host:
            from ds4f.distributed.parallel import interface_for

            ifname = interface_for(host)
            if ifname:
                os.environ["NCCL_SOCKET_IFNAME"] = ifname
        model = nccl_group(dist.PrefixStore("model", store), rank, pc.world_size, pc.distributed_timeout)
    else:
        model = gloo_group(dist.PrefixStore("model", store), rank, pc.world_size, pc.distributed_timeout, host)
    return ctrl, model


def start_heartbeat(store: dist.TCPStore, rank: int) -> threading.Thread:
    """Bump hb/<rank> every HEARTBEAT_S from a daemon thread: a counter that stops = a process that is gone."""

    def beat() -> None:
        while True:
            try:
                store.add(f"hb/{rank}", 1)
            except Exception:  # the head's store is gone; the control loop reports it
                return
            time.sleep(HEARTBEAT_S)

    t = threading.Thread(target=beat, name=f"ds4f-heartbeat-{rank}", daemon=True)
    t.start()
    return t


def report_dead(store: dist.TCPStore, rank: int, cause: str) -> None:
    """Best effort, at most 1 s: leave this rank's cause in the store for rank 0's message."""
    t = threading.Thread(target=lambda: store.set(f"dead/{rank}", cause), daemon=True)
    t.start()
    t.join(1.0)


def silent_ranks(store: dist.TCPStore, ranks: list[int], window: float = 3 * HEARTBEAT_S) -> tuple[list[int],
                                                                                                   dict[int, str]]:
    """(ranks whose heartbeat did not move during `window` s, {rank: cause} they reported) — for failure messages."""
    def beats() -> dict[int, int]:
        return {r: store.add(f"hb/{r}", 0) for r in ranks}

    causes = {r: store.get(f"dead/{r}").decode() for r in ranks if store.check([f"dead/{r}"])}
    before = beats()
    time.sleep(window)
    after = beats()
    return [r for r in ranks if after[r] == before[r]], causes
