"""⑥ kernels, programmatic dependent launch (PDL, sm_90+): a decode kernel's launch and its weight loads overlap the
tail of the kernel before it on the stream, instead of starting after it drains.

Contract of a kernel launched with `**pdl.launch(device)` (constexpr PDL + Triton's launch_pdl), in this order:
- loads of weights and other constants only (the gain: they are in flight while the kernel before drains); nothing
  stored, nothing read that an earlier kernel writes;
- `enter(PDL)`: griddepcontrol.wait, which returns when the kernel before on the stream has finished and its stores
  are visible (every program executes it, also those with nothing to do, so a chain of PDL kernels stays ordered
  transitively), then griddepcontrol.launch_dependents: the next PDL kernel may be scheduled once every program got
  here. After the wait, not before: at most one kernel waits early, so waiting programs never crowd out the side
  streams' kernels.
A kernel after a non-PDL launch (cuBLAS, torch) starts as usual. Off on CPU, in the interpreter, below sm_90 (Ampere,
Ada: the portable path is the plain launch) and with DS4F_PDL=0. CUDA graphs keep the programmatic edges."""

from __future__ import annotations

import os
from functools import cache

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: no kernels to launch
    triton = None

ENABLED = os.environ.get("DS4F_PDL", "1") == "1"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def on(device: torch.device) -> bool:
    """PDL for kernels launched on device."""
    if not ENABLED or _INTERPRET or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch(device: torch.device) -> dict[str, bool]:
    """Kernel-call keywords: the PDL constexpr and Triton's launch option, both on(device)."""
    p = on(device)
    return {"PDL": p, "launch_pdl": p}


if triton is not None:

    @triton.jit
    def enter(PDL: tl.constexpr):
        # see the module docstring; nothing without PDL
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
