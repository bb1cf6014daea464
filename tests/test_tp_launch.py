"""Launch edges through the CLI: whichever node starts first waits --join-timeout and then names what it waited for;
TP / node flags that cannot work are refused naming the flag and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from server_fakes import free_port


def serve(*flags: str, timeout: float = 60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "ds4f", "serve", "--device", "cpu", *flags], capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


def test_worker_without_a_head_times_out_naming_the_address() -> None:
    port = free_port()
    rc, out, took = serve("-tp", "2", "--nnodes", "2", "--node-rank", "1", "--headless", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "--join-timeout", "2")
    assert rc == 1, out
    assert "waited" in out and f"for the head (node 0) at 127.0.0.1:{port}" in out and "--join-timeout" in out, out
    assert took < 30


def test_head_without_its_worker_times_out_naming_the_missing_ranks() -> None:
    port = free_port()
    rc, out, took = serve("-tp", "2", "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1",
                          "--master-port", str(port), "--join-timeout", "2")
    assert rc == 1, out
    assert f"ranks [1] (node(s) [1]) did not join at 127.0.0.1:{port} within 2 s" in out and "--headless" in out, out
    assert took < 30


def test_impossible_layouts_are_refused_naming_the_flag() -> None:
    rc, out, _ = serve("-tp", "3", "--nnodes", "2")
    assert rc == 2 and "--tensor-parallel-size 3 does not split over --nnodes 2" in out, out
    rc, out, _ = serve("-tp", "2", "--nnodes", "2", "--headless")
    assert rc == 2 and "--headless: node 0 runs the scheduler" in out, out
    rc, out, _ = serve("-tp", "8")  # the tiny model has 4 heads
    assert rc == 2 and "--tensor-parallel-size 8: 4 attention heads do not split evenly" in out, out
