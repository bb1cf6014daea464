"""⑦ one-shot all-reduce for small TP messages: a bf16 tensor in, its sum over the ranks of one node out, in place.

Through torch's symmetric memory (CUDA backend: buffers mapped into every rank by CUDA IPC, signal pads for the
barrier; peer-to-peer loads over NVLink, no multicast): each rank copies its x into its slot of a shared buffer and
sums every rank's slot in one kernel. One launch and one barrier instead of NCCL's ring for decode-sized messages
(T x hidden bf16, 8 KB per token); larger messages stay on NCCL. The default on one node (DS4F_ALLREDUCE=nccl
reverts): tests/gpu/test_symm_allreduce.py on 2 H200s gave NCCL's sums exactly, eagerly and from a CUDA graph, at
~30 us per eager call against NCCL's ~35. CUDA-graph capturable like the NCCL path.

The push kernel of ds4f/kernels/push_allreduce.py is the default (DS4F_SYMM_PUSH=0: torch's copy-in kernel): every
rank stores its x straight into the peers' receive slots and raises a flag there, waits for the peers' flags in its
own memory and sums locally (one launch, one NVLink crossing, no barrier round trip). 2 H200s (session 16,
tests/gpu/test_symm_allreduce.py, a CUDA graph of 32 calls): 3.8 vs 6.8 us per call at T = 1, 4.0 vs 7.0 at T = 4,
NCCL's sums exactly; in the full model's TP=2 decode step (bench/results/full.jsonl) the 86 all-reduces went from
0.62 to 0.33 ms. Tile DS4F_SYMM_PUSH_TILE="block,warps" (default 1024,4: the graph timing's pick at T = 1 and 4);
messages over DS4F_SYMM_PUSH_MAX_NUMEL elements (default: all that fit) stay on torch's kernel; a rank gives up
waiting after DS4F_SYMM_PUSH_TIMEOUT_S (60) seconds and traps. The first push call of an instance meets every rank on
the host store, so a rank still loading its weights keeps its peer waiting on the host, not spinning on the GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ds4f.kernels.knobs import env_buckets, env_knobs

MAX_BYTES = 512 << 10  # 64 tokens x 4096 x bf16: the largest decode graph bucket's message
# the copy-in one-shot kernel (torch >= 2.7); DS4F_SYMM_COPY_IN=0: a separate copy, then one_shot_all_reduce_out
COPY_IN = os.environ.get("DS4F_SYMM_COPY_IN", "1") == "1"
PUSH_TILE = (1024, 4)  # elements per program, warps (DS4F_SYMM_PUSH_TILE)
# DS4F_HC_AR: token buckets (1: one token, 4: two to fifteen) where a decode sublayer's all-reduce runs inside the
# mHC launch that consumes its sum (ds4f/kernels/mhc_decode.py), on a push instance of its own per bucket whose
# programs own HC_BLOCK[bucket] elements (the mHC kernel's channels per program, fixed per instance as the push
# protocol needs); elsewhere the push kernel's own launch, then the mHC launch; "" none. Two H200s
# (tests/gpu/test_hc_ar_gpu.py, a CUDA graph of chained boundaries, session 24): 11.7 vs 12.9 us per sublayer
# boundary at T = 1; at T = 4 with 32 channels per program 17.4 vs 15.2 (512 programs, each with its own flag over
# NVLink), with 128 (HC_BLOCK[4]) 13.2 vs 14.3 (call 6). Full model, TP=2 (session 24 call 1, both buckets at 32
# channels): replay 4.632 ms at b1 (4.663 / 4.665 in session 23's two runs), 7.275 at b4 (6.856 / 6.870); at 128
# channels (session 25 call 3, DS4F_HC_AR=1,4) b4 6.757 against 6.736 without it in the run of record: hence "1"
HC_AR = frozenset(env_buckets("DS4F_HC_AR", "1"))
HC_BLOCK = {1: 32, 4: 128}  # bucket -> channels per mHC program (four tokens: 128 programs, as one token's 32)


def wanted() -> bool:
    return os.environ.get("DS4F_ALLREDUCE", "symm") == "symm"


class SymmAllReduce:
    """Rank `rank` of `world` on this node; `store` is shared by the group (a PrefixStore keeps its keys apart).
    `backend` (the TP group's NCCL backend, optional) is registered with the group torch's symmetric memory resolves
    by name; no new communicator is made."""

    _made = 0  # group names must be unique in a process

    def __init__(self, store: Any, rank: int, world: int, device: torch.device, max_bytes: int = MAX_BYTES,
                 name: str = "ds4f-tp", backend: Any = None, push: bool | None = None,
                 push_tile: tuple[int, int] | None = None, push_timeout_s: float | None = None) -> None:
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
        self.store, self.rank, self._armed = store, rank, False
        self.push = None
        self.hc_push: dict[int, Any] = {}  # token bucket -> its push instance (DS4F_HC_AR)
        self.regions: list[Any] = []  # the push instances' symmetric buffers and handles (kept alive)
        if os.environ.get("DS4F_SYMM_PUSH", "1") == "1" if push is None else push:
            if push_timeout_s is None:
                push_timeout_s = float(os.environ.get("DS4F_SYMM_PUSH_TIMEOUT_S", "60"))
            block, warps = push_tile or env_knobs("DS4F_SYMM_PUSH_TILE", 2, "1024,4") or PUSH_TILE
            self.push_max = (env_knobs("DS4F_SYMM_PUSH_MAX_NUMEL", 1, "16384") or (self.cap,))[0]
            self.push = self._make_push(device, block, warps, push_timeout_s)
            self.push.warmup(torch.empty(4096, dtype=torch.bfloat16, device=device))
            for b in sorted(HC_AR & HC_BLOCK.keys()):  # own regions and epochs: program j owns HC_BLOCK[b] elements
                self.hc_push[b] = self._make_push(device, HC_BLOCK[b], 4, push_timeout_s)

    def _make_push(self, device: torch.device, block: int, warps: int, timeout_s: float) -> Any:
        """A push instance: its receive region (symmetric memory, flag words zeroed before the rendezvous, which
        returns on no rank before every rank has reached it) and its launcher."""
        import torch.distributed._symmetric_memory as symm_mem

        from ds4f.kernels.push_allreduce import PushAllReduce, region_numel

        region = symm_mem.empty(region_numel(self.world, self.cap, block), dtype=torch.bfloat16, device=device)
        region.zero_()
        torch.cuda.synchronize(device)
        hdl = symm_mem.rendezvous(region, self.name)
        # the region sits at the same offset of every rank's mapped buffer (symmetric allocation)
        off = region.data_ptr() - int(hdl.buffer_ptrs[self.rank])
        size = getattr(hdl, "buffer_size", None)
        assert off >= 0 and (size is None or off < int(size)), (off, size)
        self.regions.append((region, hdl))
        return PushAllReduce([int(p) + off for p in hdl.buffer_ptrs], self.rank, self.world, self.cap, device, block,
                             warps, timeout_s)

    def _arm(self) -> None:
        """Meet every rank on the host store before the first push (once per instance)."""
        import torch.distributed as dist

        st = dist.PrefixStore(f"symm-push/{self.name}", self.store)
        st.set(str(self.rank), "1")
        st.wait([str(r) for r in range(self.world)])
        self._armed = True

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype == torch.bfloat16 and x.numel() <= self.cap

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x (contiguous, fits) -> the sum over the ranks: a new tensor with the push kernel or where torch has the
        copy-in variant (the kernel itself copies x into this rank's slot: one launch instead of a copy + the
        reduce), else x in place."""
        if self._pushes(x):
            return self.push(x)
        n = x.numel()
        b = self.buf[:n]
        if self.copy_in:
            out = torch.empty_like(x)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(b, x.view(-1), "sum", self.name, out.view(-1))
            return out
        b.copy_(x.view(-1))
        torch.ops.symm_mem.one_shot_all_reduce_out(b, "sum", self.name, x.view(-1))
        return x

    def all_reduce_add(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """x fp32 and extra bf16 (x's shape, fits as bf16) -> the sum over the ranks of bf16(x + extra): the push
        kernel adds the term in its launch; otherwise one add, then all_reduce."""
        if self._pushes(x):
            return self.push(x.contiguous(), extra)
        return self.all_reduce((x + extra.float()).to(torch.bfloat16))

    def hc_reducer(self, tokens: int, numel: int) -> Any:
        """The push instance for an all-reduce of tokens rows (numel elements) inside the decode mHC launch
        (mhc_decode.hc_step_decode's ar; armed on first use), or None: tokens' bucket not in DS4F_HC_AR, the push
        kernel off, or past the cap."""
        ar = self.hc_push.get(1 if tokens <= 1 else 4)
        if ar is None or numel > self.push_max:
            return None
        if not self._armed:
            self._arm()
        return ar

    def _pushes(self, x: torch.Tensor) -> bool:
        """Whether x goes through the push kernel (armed on first use)."""
        if self.push is None or x.numel() > self.push_max:
            return False
        if not self._armed:
            self._arm()
        return True


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
        push = getattr(ar, "push", None)
        kind = f"push kernel, tile {push.block},{push.warps}" if push is not None else "torch's kernel"
        log(f"tensor parallel: one-shot symmetric-memory all-reduce ({kind}) for messages up to {MAX_BYTES >> 10} KiB")
    return ar
