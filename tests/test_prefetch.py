"""L2 prefetch (bench/l2_prefetch.py, bench/bench_prefetch.py's tool): the PTX builds for sm_80 and sm_90
(prefetch.global.L2::evict_last in the assembly), its address walk covers every line of a tensor and never passes
its end (the interpreter form counts each line it reaches), and off CUDA it is a no-op that leaves values alone."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("arch", [80, 90])
def test_prefetch_builds(arch: int) -> None:
    from test_kernels_build import build

    from bench import l2_prefetch as pf

    k = build(pf._prefetch, dict(ptr="*u8", nbytes="i64", rec_ptr="*u8"), dict(ASM=True, LINES=pf.LINES), arch)
    assert "prefetch.global.L2::evict_last" in k["ptx"]


def _check_walk() -> None:
    """Under the interpreter: the walk reaches every 128-byte line of the tensor and no address past its end."""
    from bench import l2_prefetch as pf

    for n in (3 * pf.LINES * pf.LINE + 200, 100, 2 * pf.LINES * pf.LINE):
        rec = pf.prefetch_walk(torch.zeros(n, dtype=torch.uint8), programs=2)
        lines = -(-n // pf.LINE)
        assert int(rec[:lines].min()) >= 1, (n, int((rec[:lines] == 0).sum()))
        assert int(rec[lines:].abs().sum()) == 0, n  # nothing past the end
    print("walk ok")


def test_prefetch_walk_covers_lines() -> None:
    from interp import run_interpreted

    assert "walk ok" in run_interpreted("test_prefetch", "_check_walk", timeout=300)


def test_prefetch_cpu_noop() -> None:
    from bench.l2_prefetch import prefetch

    t = torch.arange(10.0)
    prefetch(t)
    assert torch.equal(t, torch.arange(10.0))
