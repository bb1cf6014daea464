"""⑥ kernels, arrival counters: persistent zeroed int32 buffers for kernels whose last-arriving program finishes the
work (the split-K reductions of the FP8 GEMM and the decode GEMV, the decode mHC step, the router). The finishing
program re-arms its counter to 0, so the next launch, or CUDA-graph replay, starts from zero. Allocate outside a graph
capture (a warm-up call does), and never run two launches sharing a key at once on two streams."""

from __future__ import annotations

from collections.abc import Hashable

import torch

_BUFS: dict[tuple[torch.device, Hashable], torch.Tensor] = {}


def counters(device: torch.device, n: int, key: Hashable) -> torch.Tensor:
    """At least n zeroed int32 counters on device for key (the same buffer for every call with that key)."""
    k = (torch.device(device), key)
    buf = _BUFS.get(k)
    if buf is None or buf.numel() < n:
        buf = _BUFS[k] = torch.zeros(n, dtype=torch.int32, device=device)
    return buf


def buffers(kind: str) -> list[torch.Tensor]:
    """Every buffer whose key is kind or a tuple starting with kind (tests: all back at zero after the calls)."""
    return [b for (_, k), b in _BUFS.items() if k == kind or (isinstance(k, tuple) and k[:1] == (kind,))]
