"""⑦ distributed collectives: a rank's partial tensors in, the reduced / gathered tensors out; every call counted."""

from __future__ import annotations

import datetime as dt
import pickle
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


class Comm:
    """The model-side TP group: the only path the sharded model takes to another rank.

    `counts` tallies each collective by kind so tests (and docs/parallel.md) can assert how many one forward issues;
    `nbytes` the bytes this rank put into them (all-reduce: the tensor; all-gather: its own shard).
    `pg` is a c10d process-group backend object (gloo on CPU, NCCL on GPU) or None when world == 1.
    Timing (bench/bench_tp.py) is off unless start_timing() was called: then each collective is bracketed by CUDA
    events on the current stream (wall clock on CPU), i.e. the time the compute stream loses to it, waits included.
    """

    def __init__(self, rank: int, world: int, pg: Any = None, fast_ar: Any = None) -> None:
        assert world == 1 or pg is not None, "a TP group of more than one rank needs a process group"
        self.rank, self.world, self.pg = rank, world, pg
        self.fast_ar = fast_ar  # ds4f.distributed.symm.SymmAllReduce (small bf16 messages on one node) or None
        self.counts: Counter[str] = Counter()
        self.nbytes: Counter[str] = Counter()
        self._spans: list[tuple[str, Any, Any]] | None = None  # None = timing off

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group (in place when x is contiguous); returns the sum."""
        return self._reduce(x, None)

    def all_reduce_add(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """The sum over the group of bf16(x + extra) (x fp32, extra bf16 of x's shape: each rank's term rounded once),
        the add inside the all-reduce's launch where the push kernel takes the message; bf16 out."""
        return self._reduce(x, extra)

    def _reduce(self, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        # extra: the fast path adds it in its own launch when it has the add and takes the (bf16) message; else the
        # term is added and rounded here and the sum goes as a plain all-reduce
        if extra is not None and not (self.world > 1 and hasattr(self.fast_ar, "all_reduce_add")
                                      and self.fast_ar.fits(extra)):
            # one launch: the add in fp32 (x's dtype), rounded once to bf16 as it is written
            x, extra = torch.add(x, extra, out=torch.empty_like(extra)), None
        msg = x if extra is None else extra  # the bf16 message
        self.counts["all_reduce"] += 1
        self.nbytes["all_reduce"] += msg.numel() * msg.element_size()
        if self.world == 1:
            return x
        x = x.contiguous()
        t0 = self._mark(msg) if self._spans is not None else None
        if extra is not None:
            x = self.fast_ar.all_reduce_add(x, extra)
        elif self.fast_ar is not None and self.fast_ar.fits(x):
            x = self.fast_ar.all_reduce(x)
        else:
            self.pg.allreduce([x]).wait()
        if t0 is not None:
            self._close("all_reduce", t0, x)
        return x

    def hc_reducer(self, msg: torch.Tensor) -> Any:
        """Where the next decode mHC launch can all-reduce the sublayer's partial sum itself (ds4f.kernels.mhc_decode,
        DS4F_HC_AR): the push instance to pass it (this all-reduce is counted here; the launch must follow on every
        rank), else None (then all_reduce / all_reduce_add as usual). msg: the bf16 message (the term's shape)."""
        if self.world == 1 or self.fast_ar is None:
            return None
        ar = self.fast_ar.hc_reducer(msg.shape[0], msg.numel())
        if ar is not None:
            self.counts["all_reduce"] += 1
            self.nbytes["all_reduce"] += msg.numel() * msg.element_size()
        return ar

    def all_gather_last(self, x: torch.Tensor, full: int) -> torch.Tensor:
        """x [..., n] (this rank's slice of a last dim split into equal, zero-padded shards) -> [..., full]."""
        self.counts["all_gather"] += 1
        self.nbytes["all_gather"] += x.numel() * x.element_size()
        if self.world == 1:
            return x[..., :full]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        t0 = self._mark(x) if self._spans is not None else None
        self.pg.allgather([parts], [x]).wait()
        if t0 is not None:
            self._close("all_gather", t0, x)
        return torch.cat(parts, dim=-1)[..., :full]

    def reset_counts(self) -> None:
        self.counts.clear()
        self.nbytes.clear()

    def start_timing(self) -> None:
        """Time every collective from now until stop_timing()."""
        self._spans = []

    def stop_timing(self) -> dict[str, float]:
        """Stop timing -> {kind: milliseconds} summed over the collectives since start_timing (syncs the GPU)."""
        spans, self._spans = self._spans or [], None
        if any(isinstance(s, torch.cuda.Event) for _, s, _ in spans):
            torch.cuda.synchronize()
        out: Counter[str] = Counter()
        for kind, s, e in spans:
            out[kind] += s.elapsed_time(e) if isinstance(s, torch.cuda.Event) else (e - s) * 1e3
        return dict(out)

    @staticmethod
    def _mark(x: torch.Tensor) -> Any:
        if x.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _close(self, kind: str, t0: Any, x: torch.Tensor) -> None:
        assert self._spans is not None
        self._spans.append((kind, t0, self._mark(x)))


def gloo_group(store: dist.Store, rank: int, world: int, timeout_s: float, hostname: str = "") -> Any:
    """A gloo process group on `store`; `hostname` = the local address to bind (empty = gloo's default device,
    which honours GLOO_SOCKET_IFNAME). Every operation fails after timeout_s instead of waiting forever."""
    G = dist.ProcessGroupGloo
    opts = G._Options()
    opts._timeout = dt.timedelta(seconds=timeout_s)
    opts._devices = [G.create_device(hostname=hostname) if hostname else G.create_default_device()]
    return G(store, rank, world, opts)


def nccl_group(store: dist.Store, rank: int, world: int, timeout_s: float) -> Any:
    """An NCCL process group on `store` for the current CUDA device (set before calling)."""
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = dt.timedelta(seconds=timeout_s)
    return dist.ProcessGroupNCCL(store, rank, world, opts)


# bytes of a control message's first broadcast (8-byte length + the head of the pickle); a decode step's message is
# well under it, so it takes one gloo round trip instead of two (length, then data): ~110 vs ~200 us on loopback
# (2-core CPU, ping-pong with an 8-byte ack)
BCAST_HEAD = 16384


_HEAD = threading.local()  # .buf: this thread's BCAST_HEAD-byte buffer, .view: its numpy view


def _head() -> tuple[torch.Tensor, np.ndarray]:
    """This thread's persistent head buffer: a broadcast completes before broadcast_object returns, so one buffer
    per thread serves every call (and holds no reference to a group)."""
    buf = getattr(_HEAD, "buf", None)
    if buf is None:
        buf = _HEAD.buf = torch.empty(BCAST_HEAD, dtype=torch.uint8)
        _HEAD.view = buf.numpy()
    return buf, _HEAD.view


def broadcast_object(pg: Any, obj: Any, rank: int) -> Any:
    """Send obj from rank 0 to every rank of a gloo group: one broadcast of a BCAST_HEAD-byte buffer (length + the
    pickle's head), a second for the rest of a longer pickle."""
    buf, view = _head()  # only its first 8 + n bytes are read
    room = BCAST_HEAD - 8
    data = b""
    if rank == 0:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        view[:8] = np.frombuffer(len(data).to_bytes(8, "little"), dtype=np.uint8)
        k = min(len(data), room)
        view[8: 8 + k] = np.frombuffer(data, dtype=np.uint8, count=k)
    pg.broadcast(buf, 0).wait()
    n = int.from_bytes(view[:8].tobytes(), "little")
    if n <= room:
        return obj if rank == 0 else pickle.loads(view[8: 8 + n])
    t = (torch.frombuffer(bytearray(data[room:]), dtype=torch.uint8) if rank == 0
         else torch.empty(n - room, dtype=torch.uint8))
    pg.broadcast(t, 0).wait()
    return obj if rank == 0 else pickle.loads(view[8:].tobytes() + t.numpy().tobytes())
