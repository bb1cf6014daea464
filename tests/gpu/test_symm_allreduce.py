"""⑦ one-shot symmetric-memory all-reduce on 2 GPUs (DS4F_ALLREDUCE=symm): torch's kernels (copy-in and copy +
reduce) and the push kernel (DS4F_SYMM_PUSH=1, three tiles) give NCCL's sums exactly for T = 1 / 4 / 64 rows of 4096,
eagerly (all_reduce_add too: an fp32 x plus a bf16 term, each rank's sum rounded once), from a CUDA graph of 8
chained calls replayed on new data while the ranks take turns to lag, and 50 replays in a row; prints every path's
microseconds per call (in a graph and eager, NCCL eager beside) and the fastest path per T (PICK lines)."""

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
dev = torch.device("cuda", rank)
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=True)
pg = nccl_group(dist.PrefixStore("model", store), rank, 2, 60.0)
ar = SymmAllReduce(store, rank, 2, dev, backend=pg, push=False)
copy_in = ar.copy_in
# (name, instance, copy_in mode or None): torch's copy-in kernel, copy + torch's reduce, the push kernel per tile
paths = [("torch copy_in=1", ar, True)] if copy_in else []
paths.append(("torch copy_in=0", ar, False))
for block, warps in ((1024, 4), (2048, 4), (4096, 8)):
    p = SymmAllReduce(store, rank, 2, dev, backend=pg, push=True, push_tile=(block, warps), push_timeout_s=20)
    paths.append((f"push {block},{warps}", p, None))
cur = torch.cuda.current_stream()
K, REPS, ROW, M = 8, 20, 50, 32

def nccl(x):
    y = x.clone()
    pg.allreduce([y]).wait()
    return y

def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(cur)
    with torch.cuda.stream(s):
        fn()
    cur.wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = fn()
    return graph, res

lines, best = [], {}
for name, a, mode in paths:
    if mode is not None:
        a.copy_in = mode
    for t in (1, 4, 64):
        g = torch.Generator(device="cuda").manual_seed(100 * t + rank)
        x = torch.randn(t, 4096, device="cuda", generator=g).bfloat16()
        got = a.all_reduce(x.clone())
        assert torch.equal(got, nccl(x)), (name, t, (got.float() - nccl(x).float()).abs().max().item())
        # all_reduce_add (DS4F_SHARED_AT_AR): fp32 x plus a bf16 term, each rank's sum rounded once, then reduced
        x32 = torch.randn(t, 4096, device="cuda", generator=g) * 4
        ex = torch.randn(t, 4096, device="cuda", generator=g).bfloat16()
        assert torch.equal(a.all_reduce_add(x32, ex), nccl((x32 + ex.float()).bfloat16())), (name, t, "add")
        # one graph: K chained calls z <- all_reduce(z + c_k), the ranks taking turns to lag (a GPU sleep before
        # some calls on one rank only), replayed on new data; NCCL's eager chain is the oracle
        base, cs = torch.zeros_like(x), torch.zeros(K, t, 4096, device="cuda", dtype=torch.bfloat16)

        def chain():
            z, outs = base, []
            for k in range(K):
                if (k + rank) % 3 == 0:
                    torch.cuda._sleep(4000)
                z = a.all_reduce(z + cs[k])
                outs.append(z)
            return outs

        graph, outs = capture(chain)

        def want():
            z, ws = base, []
            for k in range(K):
                z = nccl(z + cs[k])
                ws.append(z)
            return ws

        for rep in range(REPS):
            base.copy_(torch.randn(t, 4096, device="cuda", generator=g).bfloat16())
            cs.copy_(torch.randn(K, t, 4096, device="cuda", generator=g).bfloat16())
            graph.replay()
            for k, w in enumerate(want()):
                assert torch.equal(outs[k], w), (name, t, rep, k)
        # many replays in a row, no host sync, one rank now and then a whole replay behind
        ws = want()
        for i in range(ROW):
            if i % 5 == rank:
                torch.cuda._sleep(50000)
            graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, w) for o, w in zip(outs, ws)), (name, t, "in a row")
        # timing: M calls in one graph, replayed; then 200 eager calls
        graph, _ = capture(lambda: [a.all_reduce(x) for _ in range(M)])
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / (20 * M) * 1e6
        lines.append(f"rank {rank} T={t} {name} {us:.1f} us/call in a CUDA graph")
        if us < best.get(t, ("", 1e9))[1]:
            best[t] = (name, us)
        for nm, fn in ((f"{name}", lambda: a.all_reduce(x)), ("nccl", lambda: pg.allreduce([x]).wait())):
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            lines.append(f"rank {rank} T={t} {nm} {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call eager")
    if a.push is not None:
        assert a.push.error() == 0, (name, a.push.error())
lines.append(f"rank {rank} copy-in kernel available: {copy_in}")
lines += [f"rank {rank} PICK T={t} {n} ({us:.1f} us/call in a graph)" for t, (n, us) in sorted(best.items())]
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
