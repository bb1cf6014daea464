"""⑦ one-shot symmetric-memory all-reduce on 2 GPUs (DS4F_ALLREDUCE=symm): the same sums as NCCL's all-reduce for
decode-sized bf16 messages, eagerly and replayed from a CUDA graph; prints both paths' microseconds per call."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

WORKER = r"""
import os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from ds4f.distributed.comm import nccl_group
from ds4f.distributed.symm import SymmAllReduce
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.cuda.set_device(rank)
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=True)
pg = nccl_group(dist.PrefixStore("model", store), rank, 2, 60.0)
ar = SymmAllReduce(store, rank, 2, torch.device("cuda", rank), backend=pg)
lines = []
copy_in = ar.copy_in
for mode in ([True, False] if copy_in else [False]):  # the copy-in kernel (default), then copy + reduce
    ar.copy_in = mode
    for t in (1, 4, 64):
        g = torch.Generator(device="cuda").manual_seed(100 * t + rank)
        x = torch.randn(t, 4096, device="cuda", generator=g).bfloat16()
        want = x.clone()
        pg.allreduce([want]).wait()
        got = ar.all_reduce(x.clone())
        assert torch.equal(got, want), (mode, t, (got.float() - want.float()).abs().max().item())
        # in a CUDA graph: capture once, replay on new data in the captured input buffer
        buf = torch.zeros_like(x)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ar.all_reduce(buf)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = ar.all_reduce(buf)
        for rep in range(3):
            x2 = torch.randn(t, 4096, device="cuda", generator=g).bfloat16()
            want2 = x2.clone()
            pg.allreduce([want2]).wait()
            buf.copy_(x2)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(res, want2), (mode, t, rep)
        # timing: 200 calls each, eager
        for name, fn in ((f"symm copy_in={int(mode)}", lambda: ar.all_reduce(x)),
                         ("nccl", lambda: pg.allreduce([x]).wait())):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            lines.append(f"rank {rank} T={t} {name} {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call eager")
lines.append(f"rank {rank} copy-in kernel available: {copy_in}")
open(out, "w").write("\n".join(lines) + "\n")
dist.PrefixStore("done", store).set(str(rank), "1")
store.wait([f"done/{r}" for r in range(2)])
os._exit(0)
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_symm_allreduce_equals_nccl(tmp_path: Path) -> None:
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    port = _port()
    outs = [tmp_path / f"r{r}.txt" for r in range(2)]
    env = dict(os.environ, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(port), str(outs[r]), root], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:  # a hung rendezvous must not outlive the test
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    for o in outs:
        print(o.read_text())
