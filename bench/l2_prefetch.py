"""bench tool, L2 prefetch (bench/bench_prefetch.py): a tensor in, nothing out: its bytes pulled into L2 (each 128-byte
line, evict_last), so a kernel that reads it soon after (a decode GEMV's weight) hits L2 instead of HBM.

Meant for a side stream beside latency-bound kernels (attention, RoPE, norms, mHC, all-reduce), when HBM sits idle.
A small grid (PROGRAMS) keeps it from taking SMs the main stream needs. Values never change; off CUDA (or without
Triton) it is a no-op. Kept with the benches, not in the package: on the H200 (bench/results/prefetch.jsonl,
2026-11-29) the TP=2 FP8 decode GEMVs were no faster from L2 than from HBM (wq_b 15.6 us hot vs 16.6 cold for 16 MB:
the kernel, not HBM, bounds them), and a prefetch beside a latency-bound chain cost 2-3 us more than chain + GEMV in
series.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: prefetch is a no-op
    triton = None

PROGRAMS = int(os.environ.get("DS4F_PREFETCH_PROGRAMS", "16"))
LINES = 512  # 128-byte lines per program step (4 per thread at 4 warps)
LINE = 128

if triton is not None:

    @triton.jit
    def _prefetch(ptr, nbytes, rec_ptr, ASM: tl.constexpr, LINES: tl.constexpr):
        # program p walks steps p, p + P, ... of LINES lines; past-the-end lines clamp to the last byte
        step = LINES * 128
        offs = tl.arange(0, LINES) * 128
        for base in range(tl.program_id(0) * step, nbytes, tl.num_programs(0) * step):
            o = tl.minimum(base + offs, nbytes - 1)
            p = ptr + o
            if ASM:
                tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\nmov.u32 $0, 0;", "=r,l", [p],
                                          dtype=tl.int32, is_pure=False, pack=1)
            else:  # the interpreter (no inline PTX there): count each line the walk reaches into rec [lines] int32
                tl.atomic_add(rec_ptr + o // 128, 1)


def prefetch(t: torch.Tensor, programs: int | None = None) -> None:
    """Pull t's bytes (contiguous storage from its data pointer) into L2; no-op off CUDA or for empty tensors."""
    nbytes = t.numel() * t.element_size()
    if triton is None or nbytes == 0 or not t.is_cuda:
        return
    u8 = t.view(torch.uint8) if t.is_contiguous() else t.contiguous().view(torch.uint8)
    grid = (max(1, min(programs or PROGRAMS, -(-nbytes // (LINES * LINE)))),)
    _prefetch[grid](u8.view(-1), nbytes, u8, ASM=True, LINES=LINES, num_warps=4)


def prefetch_walk(t: torch.Tensor, programs: int = 2) -> torch.Tensor:
    """The kernel's address walk (run it under the Triton interpreter) -> per 128-byte line of t, how often the
    walk reached it, then LINES guard counts for lines past t's end (tests: every line >= 1, every guard 0)."""
    nbytes = t.numel() * t.element_size()
    rec = torch.zeros(-(-nbytes // LINE) + LINES, dtype=torch.int32)
    _prefetch[(programs,)](t.view(torch.uint8).view(-1), nbytes, rec, ASM=False, LINES=LINES)
    return rec


__all__ = ["PROGRAMS", "prefetch", "prefetch_walk"]
