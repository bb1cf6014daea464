"""A real two-host launch: two network namespaces joined by a veth pair (a private /30 made here), the head in one and
a --headless worker in the other with --nnodes 2; a chat completion through the head equals TP=1, and killing the
worker makes the head exit non-zero within the distributed timeout. Skips (saying why) without root / netns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from test_tp_server import CHAT, FLAGS, tp1_tokens

TIMEOUT = 5  # --distributed-timeout


@dataclass
class TwoHosts:
    head_ns: str
    worker_ns: str
    head_ip: str
    worker_if: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("needs Linux with iproute2 (`ip netns`)")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    tag = str(os.getpid() % 100000)
    h, w, va, vb = f"ds4f-h{tag}", f"ds4f-w{tag}", f"d4fa{tag}", f"d4fb{tag}"
    net = f"10.213.{os.getpid() % 250}"  # a /30 that exists only inside these two namespaces
    made: list[str] = []
    try:
        for ns in (h, w):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {r.stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", va, "type", "veth", "peer", "name", vb), ("link", "set", va, "netns", h),
                 ("link", "set", vb, "netns", w), ("-n", h, "addr", "add", f"{net}.1/30", "dev", va),
                 ("-n", w, "addr", "add", f"{net}.2/30", "dev", vb), ("-n", h, "link", "set", va, "up"),
                 ("-n", w, "link", "set", vb, "up"), ("-n", h, "link", "set", "lo", "up"),
                 ("-n", w, "link", "set", "lo", "up")]
        for s in steps:
            r = _ip(*s)
            if r.returncode != 0:
                pytest.skip(f"cannot build the veth pair (`ip {' '.join(s)}`): {r.stderr.strip()}")
        yield TwoHosts(h, w, f"{net}.1", vb)
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", ns)


def _in_ns(ns: str, code: str, timeout: float = 30) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout)
    return r.stdout.strip() if r.returncode == 0 else f"ERROR {r.stderr.strip()[-300:]}"


def _serve(ns: str, *flags: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "ds4f", "serve", *FLAGS, "--uvicorn-log-level",
           "warning", *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_two_hosts_over_veth(hosts: TwoHosts) -> None:
    ref = tp1_tokens()

    common = ("--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", hosts.head_ip, "--master-port",
              "29511", "--distributed-timeout", str(TIMEOUT), "--join-timeout", "90")
    # the worker starts first and waits for the head; it names its interface, the head finds its own
    worker = _serve(hosts.worker_ns, *common, "--node-rank", "1", "--headless",
                    env={"GLOO_SOCKET_IFNAME": hosts.worker_if})
    time.sleep(1.0)
    head = _serve(hosts.head_ns, *common, "--node-rank", "0", "--host", hosts.head_ip, "--port", "8000")
    url = f"http://{hosts.head_ip}:8000"
    try:
        probe = f"import urllib.request as u; print(u.urlopen('{url}/health', timeout=1).status)"
        deadline = time.monotonic() + 120
        while _in_ns(hosts.head_ns, probe, 10) != "200":
            assert head.poll() is None and worker.poll() is None, "a node exited before the head became healthy"
            assert time.monotonic() < deadline, "the head did not become healthy in 120 s"
            time.sleep(0.5)
        client = ("import json, sys, urllib.request as u\n"
                  f"req = u.Request('{url}/v1/chat/completions', data=json.dumps({CHAT!r}).encode(), "
                  "headers={'Content-Type': 'application/json'})\n"
                  "c = json.load(u.urlopen(req, timeout=60))['choices'][0]\n"
                  "print(json.dumps([c['message'], [(t['token'], [a['token'] for a in t['top_logprobs']]) "
                  "for t in c['logprobs']['content']]]))")
        raw = _in_ns(hosts.head_ns, client, 90)
        assert not raw.startswith("ERROR"), raw
        message, tokens = json.loads(raw)
        assert (message, [(t, list(a)) for t, a in tokens]) == (ref[0], [(t, list(a)) for t, a in ref[1]])

        t0 = time.monotonic()
        worker.kill()  # the worker node's rank: SIGKILL, no goodbye
        worker.wait(10)
        try:
            rc = head.wait(TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the head did not exit within {TIMEOUT + 15} s of the worker's death")
        out = head.stdout.read() if head.stdout else ""
        assert rc == 1, out
        assert time.monotonic() - t0 < TIMEOUT + 15
        assert "rank 0: tensor-parallel failure" in out and "rank 1" in out, out
    finally:
        for p in (head, worker):
            if p.poll() is None:
                p.kill()
                p.wait()
