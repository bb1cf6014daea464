"""TP=2 through `ds4f serve -tp 2`: the chat completion equals TP=1's token for token; killing a worker turns /health
to 503 and the server exits 1 naming the rank, within the distributed timeout."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from server_fakes import start_server

FLAGS = ("--device", "cpu", "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory", "16M",
         "--block-size", "16", "--max-num-batched-tokens", "32")
CHAT = {"model": "ds4f-tiny", "messages": [{"role": "user", "content": "Tell me about the sea, please."}],
        "max_tokens": 16, "temperature": 0, "logprobs": True, "top_logprobs": 2}


def chat_tokens(url: str) -> tuple[Any, list[Any]]:
    r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"], [(t["token"], [a["token"] for a in t["top_logprobs"]])
                               for t in choice["logprobs"]["content"]]


def tp1_tokens() -> tuple[Any, list[Any]]:
    """The TP=1 server's answer to CHAT: the oracle every TP launch is compared with."""
    proc, url = start_server(*FLAGS)
    try:
        return chat_tokens(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def test_serve_tp2_equals_tp1_and_a_dead_worker_stops_it() -> None:
    ref = tp1_tokens()
    proc, url = start_server(*FLAGS, "--tensor-parallel-size", "2", "--distributed-timeout", "5")
    try:
        got = chat_tokens(url)
        assert got == ref
        assert len(got[1]) == CHAT["max_tokens"]
        workers = children_of(proc.pid)
        assert len(workers) == 1, workers
        t0 = time.monotonic()
        os.kill(workers[0], signal.SIGKILL)
        codes = []
        while proc.poll() is None and time.monotonic() - t0 < 20:
            try:
                codes.append(httpx.get(f"{url}/health", timeout=1).status_code)
            except httpx.HTTPError:
                codes.append(0)
            time.sleep(0.1)
        out = proc.stdout.read() if proc.stdout else ""  # type: ignore[union-attr]
        assert proc.wait(5) == 1, out
        assert time.monotonic() - t0 < 10
        assert 503 in codes, codes
        assert "rank 1 (pid" in out and "exited with signal SIGKILL" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
