"""⑦ executor seam: a SchedulerOutput in, rank 0's RunnerOutput out — run locally or on every TP rank at once.

TP control plane (tiny on purpose): rank 0 runs the scheduler; each step it broadcasts the step's chunks (ids,
positions, block tables, slots) over a gloo group, then every rank runs its runner; only rank 0 samples. When idle,
rank 0 broadcasts a ping every PING_S so that a dead or stalled rank is noticed within distributed_timeout.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from typing import Any, NoReturn, Protocol

from ds4f.distributed.comm import broadcast_object
from ds4f.distributed.parallel import ParallelConfig, describe_exit
from ds4f.distributed.rendezvous import log, silent_ranks
from ds4f.distributed.wire import WireEncoder

PING_S = 1.0
FAIL_GRACE_S = 1.0  # after a failure: /health answers 503 this long before the process exits
STALL_MARGIN_S = 5.0  # a step longer than distributed_timeout + this is a stall even if no collective timed out


class Executor(Protocol):
    """What LLMEngine needs from its runner."""

    device: Any
    layout: Any
    num_blocks: int
    num_slots: int

    def execute(self, sched: Any) -> Any: ...


class LocalExecutor:
    """One process: the runner itself (its other attributes, e.g. `.model`, read through)."""

    healthy = True

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["runner"], name)

    def execute(self, sched: Any) -> Any:
        return self.runner.execute(sched)


class LocalRank:
    """A rank this process started on this node (a subprocess.Popen)."""

    def __init__(self, rank: int, process: Any) -> None:
        self.rank, self.process = rank, process

    def dead(self) -> str | None:
        code = self.process.poll()
        if code is None:
            return None
        return f"rank {self.rank} (pid {self.process.pid}) exited with {describe_exit(code)}"

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=max(0.0, timeout))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Watchdog:
    """Every rank's failure path: watch the spawned local ranks and the running step; on a failure print one line
    naming the rank(s) and the cause, kill the local ranks, wait FAIL_GRACE_S (health = 503), exit 1."""

    def __init__(self, rank: int, pc: ParallelConfig, store: Any, children: list[LocalRank]) -> None:
        self.rank, self.pc, self.store, self.children = rank, pc, store, children
        self.error: str | None = None
        self.step_started: float | None = None
        self._lock = threading.Lock()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self, on_tick: Any = None) -> None:
        def loop() -> None:
            while True:
                time.sleep(0.1)
                if self._stop:
                    return
                dead = [d for c in self.children if (d := c.dead()) is not None]
                if dead:
                    self.fail("; ".join(dead))
                started = self.step_started
                if started is not None and time.monotonic() - started > self.pc.distributed_timeout + STALL_MARGIN_S:
                    self.fail(f"a step has run for {time.monotonic() - started:.0f} s, past --distributed-timeout "
                              f"{self.pc.distributed_timeout:.0f} s: a collective stalled")
                if on_tick is not None:
                    on_tick()

        self._thread = threading.Thread(target=loop, name=f"ds4f-watchdog-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (before a clean shutdown lets the local ranks exit); returns once the thread is done."""
        self._stop = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def fail(self, cause: str) -> NoReturn:
        """Never returns: reports and exits the process with status 1."""
        with self._lock:
            if self.error is None:
                self.error = cause
                self._report(cause)
                for c in self.children:
                    c.kill()
                time.sleep(FAIL_GRACE_S)
                os._exit(1)
        while True:  # another thread is already reporting; it will exit the process
            time.sleep(1)

    def _report(self, cause: str) -> None:
        detail = ""
        if self.rank == 0 and self.pc.world_size > 1:
            try:
                silent, causes = silent_ranks(self.store, list(range(1, self.pc.world_size)))
                parts = [d for c in self.children if (d := c.dead()) is not None and d not in cause]
                parts += [f"rank {r} reported: {c}" for r, c in sorted(causes.items())]
                parts += [f"rank {r} (node {self.pc.node_of(r)}) stopped responding" for r in silent if r not in causes]
                detail = "; ".join(parts)
            except Exception as e:  # the store itself failed; the cause above still names what broke
                detail = f"(could not ask the store which rank failed: {type(e).__name__})"
        else:
            from ds4f.distributed.rendezvous import report_dead

            report_dead(self.store, self.rank, cause)
        log(f"rank {self.rank}: tensor-parallel failure: {cause}" + (f" | {detail}" if detail else "")
            + "; exiting with status 1")


class TPExecutor:
    """Rank 0's side of the TP control plane; stands in for the runner in LLMEngine."""

    def __init__(self, runner: Any, ctrl: Any, watchdog: Watchdog) -> None:
        self.runner, self.ctrl, self.watchdog = runner, ctrl, watchdog
        self.device, self.layout = runner.device, runner.layout
        self.num_blocks, self.num_slots = runner.num_blocks, runner.num_slots
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = False
        self._wire = WireEncoder()
        self._trace = None
        from ds4f.distributed.worker import StepTrace, trace_window

        if trace_window():  # rank 0: broadcast ms, then execute ms (sampling included)
            self._trace = StepTrace(0, trace_window())
        watchdog.start(on_tick=self._ping_if_idle)

    def __getattr__(self, name: str) -> Any:  # other runner attributes the engine reads (e.g. weight_format)
        return getattr(self.__dict__["runner"], name)

    @property
    def healthy(self) -> bool:
        return self.watchdog.error is None and not self._closed

    def execute(self, sched: Any) -> Any:
        return self._guarded(lambda: self.runner.execute(sched), sched)

    @property
    def supports_launch(self) -> bool:
        return bool(getattr(self.runner, "supports_launch", False))

    def launch(self, sched: Any, prev: Any = None) -> Any:
        """execute()'s first half (FastRunner.launch): the broadcast, then this rank's launch; AHEAD tokens cross the
        wire as -1 and every rank feeds them from rank 0's sampled ids (one all-reduce)."""
        return self._guarded(lambda: self.runner.launch(sched, prev), sched)

    def collect(self, pending: Any) -> Any:
        return self._guarded(lambda: self.runner.collect(pending), None)

    def _guarded(self, run: Any, sched: Any) -> Any:
        """run() under the watchdog (a stall past --distributed-timeout fails the group), after broadcasting sched
        when given (the trace: broadcast ms, then run ms)."""
        if self.watchdog.error is not None or self._closed:
            raise RuntimeError(f"tensor-parallel group is down: {self.watchdog.error or 'closed'}")
        with self._lock:
            self.watchdog.step_started = time.monotonic()
            try:
                t0 = time.perf_counter()
                if sched is not None:
                    broadcast_object(self.ctrl, ("step", self._wire.encode(sched)), 0)
                t1 = time.perf_counter()
                out = run()
                if self._trace is not None:
                    self._trace.add(t1 - t0, time.perf_counter() - t1)
                return out
            except Exception as e:
                self.watchdog.fail(f"step failed: {_short(e)}")
                raise
            finally:
                self.watchdog.step_started = None
                self._last = time.monotonic()

    def _ping_if_idle(self) -> None:
        if self._closed or time.monotonic() - self._last < PING_S or not self._lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                broadcast_object(self.ctrl, ("ping", None), 0)
        except Exception as e:
            self.watchdog.fail(f"a worker did not take the heartbeat: {_short(e)}")
        finally:
            self._last = time.monotonic()
            self._lock.release()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (they pass a barrier and exit 0); idempotent."""
        with self._lock:
            if self._closed or self.watchdog.error is not None:
                return
            self._closed = True
            self.watchdog.stop()
            try:
                broadcast_object(self.ctrl, ("stop", None), 0)
                self.ctrl.barrier().wait()
            except Exception as e:
                log(f"rank 0: workers did not stop cleanly: {_short(e)}")
        deadline = time.monotonic() + timeout
        for c in self.watchdog.children:
            c.join(deadline - time.monotonic())
            c.kill()


def _short(e: BaseException) -> str:
    text = str(e).split(". This is typically caused")[0]
    return f"{type(e).__name__}: {text[:300]}"
