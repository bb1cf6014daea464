"""Shutdown test: SIGTERM to `ds4f serve` -> new requests 503, in-flight ones finish or are aborted, exit status 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
from server_fakes import start_server


def _stream(url: str, max_tokens: int, out: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                out["started"] = True
    out["events"] = events


def test_sigterm_drains_then_exits_zero() -> None:
    proc, url = start_server("--shutdown-timeout", "3", "--max-model-len", "2048")
    short: dict[str, Any] = {}
    long: dict[str, Any] = {}
    threads = [threading.Thread(target=_stream, args=(url, 12, short)),
               threading.Thread(target=_stream, args=(url, 2000, long))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not (short.get("started") and long.get("started")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert short.get("started") and long.get("started")
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    assert httpx.get(f"{url}/health", timeout=10).status_code == 503
    for t in threads:
        t.join(timeout=60)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - t_term < 20

    def finish(events: list[str]) -> str | None:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        return next(c["choices"][0]["finish_reason"] for c in reversed(chunks) if c.get("choices"))

    assert finish(short["events"]) == "length"  # finished within --shutdown-timeout
    assert finish(long["events"]) == "abort"  # aborted when it ran out
