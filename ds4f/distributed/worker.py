"""⑦ TP worker: a rank id + the head's store in, a loop that runs each step rank 0 broadcasts (no output; exits)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from ds4f.distributed.comm import broadcast_object
from ds4f.distributed.executor import STALL_MARGIN_S, LocalRank, Watchdog, _short
from ds4f.distributed.parallel import ParallelConfig
from ds4f.distributed.rendezvous import RendezvousError, connect_store, join, log, start_heartbeat, wait_key
from ds4f.distributed.wire import WireDecoder


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that spawned it dies (nothing outlives the launcher)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn_local(pc: ParallelConfig, ranks: list[int], addr: str, port: int) -> list[LocalRank]:
    """Start `ranks` on this node as `python -m ds4f.distributed.worker` processes joining the store at addr:port
    (a fresh interpreter: the launcher's __main__ is never re-run, unlike multiprocessing's spawn)."""
    out = []
    for r in ranks:
        cmd = [sys.executable, "-m", "ds4f.distributed.worker", "--rank", str(r), "--addr", addr, "--port", str(port),
               "--parallel", json.dumps(dataclasses.asdict(pc)), "--parent", str(os.getpid())]
        out.append(LocalRank(r, subprocess.Popen(cmd, stdin=subprocess.DEVNULL)))
    return out


def child_main(rank: int, pc: ParallelConfig, addr: str, port: int, parent: int) -> None:
    """Entry of a spawned rank: never returns (os._exit after the final barrier or on an error)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the launcher decides
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)
    try:
        store = connect_store(pc, rank, addr, port)
    except RendezvousError as e:
        log(str(e))
        os._exit(1)
    run_worker(rank, pc, store, [])


def trace_window() -> int:
    """DS4F_TRACE_WORKER: 0 / unset = no trace, 1 = a line per 50 steps, N > 1 = per N steps."""
    n = os.environ.get("DS4F_TRACE_WORKER", "0")
    w = int(n) if n.isdigit() else 0
    return 50 if w == 1 else w


def _topk_stats() -> str:
    """DS4F_TOPK_STATS (ds4f.kernels.topk_radix): its counters since the last trace line, or ""."""
    if os.environ.get("DS4F_TOPK_STATS", "0") != "1":
        return ""
    from ds4f.kernels.topk_radix import stats_line

    line = stats_line()
    return f"; {line}" if line else ""


class StepTrace:
    """DS4F_TRACE_WORKER (trace_window): every window steps, one line with the mean ms a worker waited for rank 0's
    message and the mean ms its host spent from the message to the step's last launch (where a TP decode step's
    time goes)."""

    def __init__(self, rank: int, window: int) -> None:
        self.rank, self.window, self.waits, self.hosts = rank, window, [], []

    def add(self, wait_s: float, host_s: float) -> None:
        self.waits.append(wait_s)
        self.hosts.append(host_s)
        if len(self.waits) == self.window:
            n = self.window
            log(f"rank {self.rank}: last {n} steps: waited {1e3 * sum(self.waits) / n:.3f} ms, host "
                f"{1e3 * sum(self.hosts) / n:.3f} ms per step{_topk_stats()}")
            self.waits, self.hosts = [], []


def run_worker(rank: int, pc: ParallelConfig, store: Any, children: list[LocalRank]) -> None:
    """Join, load and shard the model like rank 0, then follow rank 0's steps until "stop". Never returns."""
    watchdog = Watchdog(rank, pc, store, children)
    state = {"last": time.monotonic(), "phase": "joining the group"}

    def check_silence() -> None:
        idle = state["phase"] == "loop" and watchdog.step_started is None  # a long step is the step watchdog's
        if idle and time.monotonic() - state["last"] > pc.distributed_timeout + STALL_MARGIN_S:
            watchdog.fail(f"lost the head (rank 0): no message for {time.monotonic() - state['last']:.0f} s")

    try:
        join(store, pc, rank, "", 0)
        start_heartbeat(store, rank)
        watchdog.start(on_tick=check_silence)
        config = pickle.loads(wait_key(store, "config", pc.join_timeout, f"rank {rank}: rank 0 sent no config"))
        state["phase"] = "loading the model"
        from ds4f.distributed.launch import build_rank

        runner, ctrl, _, _ = build_rank(config, pc, rank, store)
        store.set(f"ready/{rank}", "1")
        wait_key(store, "go", pc.join_timeout, f"rank {rank}: rank 0 did not start")
    except Exception as e:
        watchdog.fail(f"{state['phase']} failed: {_short(e)}")
    state["last"] = time.monotonic()  # silence counts from here, not from before the model load
    state["phase"] = "loop"
    follow_steps(rank, ctrl, runner, watchdog, state)
    watchdog.stop()
    try:
        ctrl.barrier().wait()
    finally:
        for c in children:
            c.join(10.0)
            c.kill()
        os._exit(0)


def follow_steps(rank: int, ctrl: Any, runner: Any, watchdog: Watchdog, state: dict[str, Any]) -> None:
    """Run each step rank 0 broadcasts on `runner` (its forward only: rank 0 samples) until "stop"; returns then.
    `state["last"]` is the monotonic time of the last message (the silence check reads it)."""
    wire = WireDecoder()
    forward = getattr(runner, "forward_step", runner.logits)  # FastRunner: no logits gathered for nobody
    trace = StepTrace(rank, trace_window()) if trace_window() else None
    while True:
        t_wait = time.perf_counter()
        try:
            kind, msg = broadcast_object(ctrl, None, rank)
        except Exception as e:
            watchdog.fail(f"lost the head (rank 0): {_short(e)}")
        state["last"] = time.monotonic()
        if kind == "ping":
            continue
        if kind == "stop":
            return
        watchdog.step_started = time.monotonic()
        t_got = time.perf_counter()
        try:
            forward(wire.decode(msg))
        except Exception as e:
            watchdog.fail(f"step failed: {_short(e)}")
        watchdog.step_started = None
        state["last"] = time.monotonic()
        if trace is not None:
            trace.add(t_got - t_wait, time.perf_counter() - t_got)


def run_headless(pc: ParallelConfig) -> int:
    """A worker node (`--headless`, node_rank > 0): run this node's ranks, no HTTP. Returns only on a startup error;
    otherwise the process exits 0 when the head stops the group, 1 on any failure."""
    if pc.node_rank == 0:
        log("--headless: node 0 runs rank 0 (the scheduler and the HTTP server); use --headless only with "
            "--node-rank >= 1")
        return 2
    first, *rest = list(pc.node_ranks)
    threading.current_thread().name = f"ds4f-rank-{first}"
    try:
        store = connect_store(pc, first, pc.master_addr, pc.master_port)
    except RendezvousError as e:
        log(str(e))
        return 1
    children = spawn_local(pc, rest, pc.master_addr, pc.master_port)
    log(f"node {pc.node_rank}: ranks {list(pc.node_ranks)} joined the head at {pc.master_addr}:{pc.master_port}")
    run_worker(first, pc, store, children)
    return 0  # not reached: run_worker exits the process


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="one TP rank (started by ds4f itself)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--parallel", required=True, help="ParallelConfig as JSON")
    ap.add_argument("--parent", type=int, required=True)
    a = ap.parse_args()
    child_main(a.rank, ParallelConfig(**json.loads(a.parallel)), a.addr, a.port, a.parent)
