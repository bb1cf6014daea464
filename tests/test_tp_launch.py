"""Launch edges through the CLI: whichever node starts first waits --join-timeout and then names what it waited for;
TP / node flags that cannot work are refused naming the flag and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
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


def test_ranks_with_different_ds4f_switches_are_refused_naming_them() -> None:
    # a headless node started with another DS4F_HC_AR than the head's: both stop at start-up naming the variable
    # (instead of waiting on an all-reduce the other rank never starts)
    port = free_port()
    common = ["-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--join-timeout", "30"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DS4F_")}
    procs = [subprocess.Popen([sys.executable, "-m", "ds4f", "serve", "--device", "cpu", *common, *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**env, "PYTHONUNBUFFERED": "1", **switch})
             for extra, switch in ((["--node-rank", "0"], {}),
                                   (["--node-rank", "1", "--headless"], {"DS4F_HC_AR": "1,4"}))]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0, out
    assert "DS4F_* environment differs" in outs[0] and "DS4F_HC_AR=(unset) here, 1,4 on rank 1" in outs[0], outs[0]
    assert "DS4F_HC_AR=1,4 here, (unset) on rank 0" in outs[1], outs[1]


def test_agree_env_ignores_local_switches() -> None:
    import threading

    import torch.distributed as dist

    from ds4f.distributed.rendezvous import RendezvousError, agree_env, ds4f_env

    assert ds4f_env({"DS4F_TRACE_WORKER": "16", "DS4F_PDL": "0", "PATH": "/bin"}) == {"DS4F_PDL": "0"}
    for envs, bad in (([{"DS4F_PDL": "0"}, {"DS4F_PDL": "0"}, {"DS4F_PDL": "0"}], set()),
                      ([{"DS4F_PDL": "0"}, {"DS4F_PDL": "0"}, {"DS4F_PDL": "1"}], {0, 2})):
        store = dist.HashStore()
        errors: dict[int, str] = {}

        def rank(r: int, store: dist.HashStore = store, envs: list = envs, errors: dict = errors) -> None:
            try:
                agree_env(store, r, len(envs), envs[r], timeout=10)
            except RendezvousError as e:
                errors[r] = str(e)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(envs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert set(errors) == bad, errors  # rank 0 checks everyone, the others rank 0 only
        if bad:
            assert "DS4F_PDL=0 here, 1 on rank 2" in errors[0] and "DS4F_PDL=1 here, 0 on rank 0" in errors[2]


def test_step_trace_prints_topk_stats(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # DS4F_TRACE_WORKER's line carries DS4F_TOPK_STATS' counters (read and cleared); off, the line leaves them be
    from ds4f.distributed.worker import StepTrace
    from ds4f.kernels import topk_radix

    trace, cpu = StepTrace(1, 2), torch.device("cpu")
    for on in ("1", "0"):
        with torch.inference_mode():  # as the model's first launch makes them: an inference tensor
            monkeypatch.setitem(topk_radix._STATS, cpu, torch.tensor([4, 2000, 900, 1, 0, 40]))
        monkeypatch.setenv("DS4F_TOPK_STATS", on)
        trace.add(0.001, 0.002)
        trace.add(0.001, 0.002)
        err = capsys.readouterr().err
        assert "rank 1: last 2 steps: waited 1.000 ms, host 2.000 ms per step" in err, err
        assert ("top-k picks on cpu: 4, candidates mean 500.0 max 900, past the lanes 1, past the buffer 0, still "
                "needed mean 10.0" in err) == (on == "1"), err
        assert bool(topk_radix._STATS[cpu].any()) == (on == "0")
