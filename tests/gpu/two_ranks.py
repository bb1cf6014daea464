"""Two GPU ranks as subprocesses for the 2-GPU tests: each runs PRELUDE (rank, dev, store, the TP group pg, an
empty `lines` list, `cur`, `capture`, `graph_us`), the test's worker body, then EPILOGUE (its `lines` to its output
file, a barrier, os._exit: a process group's teardown was seen to hang there); the test reads the files back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

PRELUDE = r"""
import os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from ds4f.distributed.comm import nccl_group
from ds4f.distributed.symm import SymmAllReduce
rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.cuda.set_device(rank)
dev = torch.device("cuda", rank)
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, wait_for_workers=True)
pg = nccl_group(dist.PrefixStore("model", store), rank, 2, 60.0)
lines = []
cur = torch.cuda.current_stream()

def capture(fn):  # -> (a CUDA graph of fn(), fn()'s result inside it), fn warmed up once on a side stream
    s = torch.cuda.Stream()
    s.wait_stream(cur)
    with torch.cuda.stream(s):
        fn()
    cur.wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = fn()
    return graph, res

def graph_us(fn, calls):  # -> microseconds per call of a CUDA graph of fn() (`calls` calls), replayed 20 times
    graph, _ = capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (20 * calls) * 1e6
"""
EPILOGUE = r"""
open(out, "w").write("\n".join(lines) + "\n")
dist.PrefixStore("done", store).set(str(rank), "1")
store.wait([f"done/{r}" for r in range(2)])
os._exit(0)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(worker: str, tmp_path: Path, env: dict[str, str] | None = None, timeout: float = 240) -> list[str]:
    """PRELUDE + worker + EPILOGUE on ranks 0 and 1 -> each rank's output file text; fails with the ranks' logs if
    either exits non-zero, and kills both if they outlive `timeout` (a hung rendezvous must not outlive the test)."""
    root = str(Path(__file__).resolve().parents[2])
    port = free_port()
    outs = [tmp_path / f"r{r}.txt" for r in range(2)]
    full_env = dict(os.environ, PYTHONPATH=root, **(env or {}))
    code = PRELUDE + worker + EPILOGUE
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(port), str(outs[r]), root], env=full_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return [o.read_text() for o in outs]
