"""⑦ one-shot all-reduce for small TP messages: a bf16 tensor in, its sum over the ranks of one node out, in place.

Through torch's symmetric memory (CUDA backend: buffers mapped into every rank by CUDA IPC, signal pads for the
barrier; peer-to-peer loads over NVLink, no multicast): each rank copies its x into its slot of a shared buffer and
sums every rank's slot in one kernel. One launch and one barrier instead of NCCL's ring for decode-sized messages
(T x hidden bf16, 8 KB per token); larger messages stay on NCCL. The default on one node (DS4F_ALLREDUCE=nccl
reverts): tests/gpu/test_symm_allreduce.py on 2 H200s gave NCCL's sums exactly, eagerly and from a CUDA graph, at
~30 us per eager call against NCCL's ~35. CUDA-graph capturable like the NCCL path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

MAX_BYTES = 512 << 10  # 64 tokens x 4096 x bf16: the largest decode graph bucket's message
# the copy-in one-shot kernel (torch >= 2.7); DS4F_SYMM_COPY_IN=0: a separate copy, then one_shot_all_reduce_out
COPY_IN = os.environ.get("DS4F_SYMM_COPY_IN", "1") == "1"


def wanted() -> bool:
    return os.environ.get("DS4F_ALLREDUCE", "symm") == "symm"


class SymmAllReduce:
    """Rank `rank` of `world` on this node; `store` is shared by the group (a PrefixStore keeps its keys apart).
    `backend` (the TP group's NCCL backend, optional) is registered with the group torch's symmetric memory resolves
    by name; no new communicator is made."""

    _made = 0  # group names must be unique in a process

    def __init__(self, store: Any, rank: int, world: int, device: torch.device, max_bytes: int = MAX_BYTES,
                 name: str = "ds4f-tp", backend: Any = None) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C import _distributed_c10d as c10d

        SymmAllReduce._made += 1
        self.name, self.world = f"{name}-{SymmAllReduce._made}", world
        # torch >= 2.6 resolves the group by its registered name (rank, size and store from the ProcessGroup)
        pg = dist.ProcessGroup(dist.PrefixStore(f"symm/{self.name}", store), rank, world)
        if backend is not None:
            pg._register_backend(torch.device(device.type), dist.ProcessGroup.BackendType.NCCL, backend)
            pg._set_default_backend(dist.ProcessGroup.BackendType.NCCL)
        pg._set_group_name(self.name)
        c10d._register_process_group(self.name, pg)
        self.pg = pg
        self.cap = max_bytes // 2
        self.buf = symm_mem.empty(self.cap, dtype=torch.bfloat16, device=device)
        self.copy_in = COPY_IN and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        symm_mem.rendezvous(self.buf, self.name)

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype == torch.bfloat16 and x.numel() <= self.cap

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x (contiguous, fits) -> the sum over the ranks: a new tensor where torch has the copy-in variant (the
        kernel itself copies x into this rank's slot: one launch instead of a copy + the reduce), else x in place."""
        n = x.numel()
        b = self.buf[:n]
        if self.copy_in:
            out = torch.empty_like(x)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(b, x.view(-1), "sum", self.name, out.view(-1))
            return out
        b.copy_(x.view(-1))
        torch.ops.symm_mem.one_shot_all_reduce_out(b, "sum", self.name, x.view(-1))
        return x


def try_symm(ctrl: Any, store: Any, rank: int, world: int, device: torch.device, single_node: bool,
             agree: Any, backend: Any = None) -> SymmAllReduce | None:
    """A SymmAllReduce unless DS4F_ALLREDUCE=nccl: CUDA, one node, and every rank built one (agreed over the control
    group, so no rank takes a path the others did not); else None (NCCL)."""
    if not (wanted() and device.type == "cuda" and single_node and world > 1):
        return None
    from ds4f.distributed.rendezvous import log

    ar: SymmAllReduce | None
    try:
        ar = SymmAllReduce(store, rank, world, device, backend=backend)
    except Exception as e:  # an older torch, no P2P between the GPUs, ...: NCCL does the job
        log(f"rank {rank}: DS4F_ALLREDUCE=symm unavailable ({type(e).__name__}: {str(e)[:200]}); using NCCL")
        ar = None
    if agree(ctrl, 1 if ar is not None else 0) == 0:
        return None
    if rank == 0:
        log(f"tensor parallel: one-shot symmetric-memory all-reduce for messages up to {MAX_BYTES >> 10} KiB")
    return ar
