"""TP=2 through the offline API: LLM(tensor_parallel_size=2) on two gloo ranks gives TP=1's tokens (greedy and seeded,
chunked prefill, batched); a worker killed or stalled makes rank 0 exit 1 naming it; nothing hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ds4f import LLM, SamplingParams

KW = dict(device="cpu", dtype="float32", kv_cache_memory=16 << 20, block_size=16, max_num_batched_tokens=32,
          max_model_len=256)
PROMPTS = ["Hello, my name is", "The capital of France is a city that many people visit because of its museums",
           [5, 17, 99, 1024, 77, 3, 4096, 12, 8, 8, 8, 60000, 2, 19, 128000, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
PARAMS = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
          SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
          SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]


def test_llm_tp2_tokens_equal_tp1() -> None:
    ref = [o.outputs[0].token_ids for o in LLM(**KW).generate(PROMPTS, PARAMS)]
    llm = LLM(tensor_parallel_size=2, distributed_timeout=30, **KW)
    try:
        assert llm.engine.runner.__class__.__name__ == "TPExecutor"
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        assert got == ref
        # again after the workers idled through a few heartbeats
        time.sleep(2.5)
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:1], PARAMS[:1])] == ref[:1]
    finally:
        llm.engine.runner.close()
    assert all(c.process.returncode == 0 for c in llm.engine.runner.watchdog.children)


DRIVER = """
import sys, time
from ds4f import LLM, SamplingParams
llm = LLM(tensor_parallel_size=2, distributed_timeout=3, device="cpu", dtype="float32", kv_cache_memory=16 << 20,
          block_size=16, max_model_len=256)
print("PID", llm.engine.runner.watchdog.children[0].process.pid, flush=True)
while True:
    if sys.argv[1] == "busy":
        llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    else:
        time.sleep(0.1)
"""


def _run_and_hit(sig: signal.Signals, mode: str) -> tuple[int, str, float]:
    """Start a TP=2 LLM in a subprocess, send `sig` to its worker, return (exit code, output, seconds to exit)."""
    p = subprocess.Popen([sys.executable, "-c", DRIVER, mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        assert p.stdout is not None
        pid = None
        deadline = time.monotonic() + 90
        while pid is None and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("PID "):
                pid = int(line.split()[1])
        assert pid is not None, "".join(lines)
        time.sleep(1.5)  # a few steps / heartbeats first
        t0 = time.monotonic()
        os.kill(pid, sig)
        rest, _ = p.communicate(timeout=30)
        return p.returncode, "".join(lines) + rest, time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killed_worker_makes_rank0_exit_1_naming_it() -> None:
    rc, out, took = _run_and_hit(signal.SIGKILL, "idle")
    assert rc == 1, out
    assert "rank 0: tensor-parallel failure: rank 1 (pid" in out and "exited with signal SIGKILL" in out, out
    assert took < 10, took


def test_stalled_worker_times_out_and_rank0_exits_1() -> None:
    # SIGSTOP mid-generation: rank 0's next collective cannot complete; distributed_timeout=3 bounds the wait
    rc, out, took = _run_and_hit(signal.SIGSTOP, "busy")
    assert rc == 1, out
    assert "tensor-parallel failure" in out and "rank 1 (node 0) stopped responding" in out, out
    assert took < 3 + 10, took
