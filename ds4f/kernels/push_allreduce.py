"""⑦ push one-shot all-reduce (Triton) for small bf16 TP messages: x [n] on every rank in, the sum over the ranks
out (a new tensor, the same bits on every rank), in ONE launch with no host sync; CUDA-graph capturable.

Each rank owns a receive region R (torch symmetric memory, mapped into every rank of the node; `addrs[q]` is rank q's
region as mapped in this process):
    data  bf16  [2 parities, W senders, CAP]      then
    flags int32 [2 parities, W senders, MAXB]     (zero before the first call)
Program j of the launch owns elements [j*BLOCK, (j+1)*BLOCK) and keeps its own call counter epoch[j] (local int32,
advanced by the kernel itself, so a graph replay needs no host input). Program j of rank r, call e = epoch[j] + 1,
parity p = e & 1:
    1. stores its x chunk straight into every peer q's R_q.data[p, r, chunk j] (NVLink writes, no local staging);
    2. CTA barrier, then one release store (system scope) of e into R_q.flags[p, r, j] on every peer;
    3. spins (acquire, system scope) until R_r.flags[p, q, j] == e for every peer q, bounded: after `timeout` (ns of
       %globaltimer on a GPU, poll iterations under the interpreter) it writes e into err[0] and traps;
    4. sums the W chunks in rank order in fp32 (own x from registers, the peers' from R_r.data[p, q]) -> out (bf16).

When is a slot free again? Rank r writes R_q.data[p, r, chunk j] at its calls e and e + 2 of program j (p = e & 1);
rank q reads it only in its call e. Rank r starts call e + 2 of program j only after its call e + 1 finished (stream
order: a launch starts after the previous one completes), and that call waited for q's flag e + 1, which q's program
j stored during q's call e + 1, a launch that started after q's call e (its reads of slot p included) completed.
So the slot of parity p is overwritten only after its reader is done: one call of lead is all a fast rank gets, and
that call writes the other parity. The flag word has the same history (value e - 2 is overwritten by e only after e -
1 was seen), and flags are compared for equality, so an old value never passes, and the int32 counter may wrap.
The argument is per program index, and program j always covers the same elements, so calls of different sizes
(different grids) may interleave freely as long as every rank makes the same sequence of calls (a collective).
Nothing is ordered across program indices: no program waits on another of its own rank, so the grid needs no
co-residency (program j only needs the peers' programs j to run eventually). What frees a slot is stream order, so
one instance never runs two launches at once (two streams, or a programmatic dependent launch overlapping the next).

`push_all_reduce_ref` is the pure-torch oracle (rank-order fp32 sum, one bf16 rounding). Two ranks: the sum of two
bf16 numbers rounded once equals NCCL's bf16 sum bit for bit."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU CI without triton: the reference only
    triton = None

HAS_TRITON = triton is not None


def region_numel(world: int, cap: int, block: int) -> int:
    """bf16 elements of one rank's receive region (data, then the flag words as pairs of bf16)."""
    assert cap % block == 0
    return 2 * world * cap + 2 * (2 * world * (cap // block))


def push_all_reduce_ref(xs: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's x (same shape, bf16) -> their sum in rank order in fp32, rounded once to bf16."""
    acc = torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    for x in xs:
        acc += x.float()
    return acc.to(torch.bfloat16)


if triton is not None:

    @triton.jit
    def _now(like):
        # %globaltimer: nanoseconds, any sm_80+ (inline PTX: never under the interpreter)
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [like], dtype=tl.int64, is_pure=False,
                                         pack=1)

    @triton.jit
    def _trap(like):
        return tl.inline_asm_elementwise("trap; mov.u32 $0, $1;", "=r,r", [like], dtype=tl.int32, is_pure=False,
                                         pack=1)

    @triton.jit
    def _rne_bf16(acc, SW_ROUND: tl.constexpr):
        # fp32 -> bf16, round to nearest even (the interpreter's cast truncates: round on the bits first)
        if SW_ROUND:
            u = acc.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            acc = u.to(tl.float32, bitcast=True)
        return acc.to(tl.bfloat16)

    @triton.jit
    def _own_term(x_ptr, extra_ptr, offs, mask, ADD: tl.constexpr, SW_ROUND: tl.constexpr):
        # this rank's term at message elements offs: x's bf16, or with ADD bf16(x + extra) rounded once (x fp32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if ADD:
            x = _rne_bf16(x + tl.load(extra_ptr + offs, mask=mask, other=0.0).to(tl.float32), SW_ROUND)
        return x

    @triton.jit
    def _push_sum(x, e, offs, mask, pid, addr_ptr, epoch_ptr, err_ptr, rank, timeout, W: tl.constexpr,
                  CAP: tl.constexpr, MAXB: tl.constexpr, TIMER: tl.constexpr, TRAP: tl.constexpr):
        # program pid's share of call e = epoch[pid] + 1 (steps 1-4 of the module docstring): this rank's term x
        # [BLOCK] bf16 at message elements offs -> the rank-order fp32 sum over the ranks (round it once to bf16);
        # epoch[pid] = e
        BLOCK: tl.constexpr = x.shape[0]
        par = e & 1
        flag_off = 2 * W * CAP * 2  # bytes: the flag words follow the data
        # 1. push this chunk into every peer's slot [par, rank]
        for i in tl.static_range(1, W):
            q = (rank + i) % W
            base = tl.multiple_of(tl.load(addr_ptr + q), 16)
            dst = base.to(tl.pointer_type(tl.bfloat16), bitcast=True) + (par * W + rank) * CAP
            tl.store(tl.max_contiguous(tl.multiple_of(dst + offs, 16), BLOCK), x, mask=mask)
        # 2. every thread's stores precede the flag (bar.sync + a cumulative release at system scope)
        tl.debug_barrier()
        for i in tl.static_range(1, W):
            q = (rank + i) % W
            fbase = tl.multiple_of(tl.load(addr_ptr + q) + flag_off, 16)
            flag = fbase.to(tl.pointer_type(tl.int32), bitcast=True) + (par * W + rank) * MAXB + pid
            tl.atomic_xchg(flag, e, sem="release", scope="sys")
        # 3. wait for every peer's flag in this rank's region, bounded
        own = tl.multiple_of(tl.load(addr_ptr + rank), 16)
        own_flags = tl.multiple_of(own + flag_off, 16).to(tl.pointer_type(tl.int32), bitcast=True)
        for i in tl.static_range(1, W):
            q = (rank + i) % W
            f = own_flags + (par * W + q) * MAXB + pid
            seen = tl.atomic_add(f, 0, sem="acquire", scope="sys")
            waited = tl.zeros([], dtype=tl.int64)
            if TIMER:
                t0 = _now(e)
            while (seen != e) & (waited < timeout):
                seen = tl.atomic_add(f, 0, sem="acquire", scope="sys")
                if TIMER:
                    waited = _now(e) - t0
                else:
                    waited += 1
            if seen != e:  # the peer never came: report, then fail loudly rather than hang the device
                tl.atomic_xchg(err_ptr, e)
                if TRAP:
                    _trap(e)
        tl.debug_barrier()
        # 4. rank-order fp32 sum: the same bits on every rank
        src = own.to(tl.pointer_type(tl.bfloat16), bitcast=True) + par * W * CAP
        acc = tl.zeros(x.shape, dtype=tl.float32)
        for q in tl.static_range(W):
            if q == rank:
                acc += x.to(tl.float32)
            else:
                ptrs = tl.max_contiguous(tl.multiple_of(src + q * CAP + offs, 16), BLOCK)
                acc += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(epoch_ptr + pid, e)
        return acc

    @triton.jit
    def _push_ar(x_ptr, out_ptr, addr_ptr, epoch_ptr, err_ptr, n, rank, timeout,
                 W: tl.constexpr, CAP: tl.constexpr, MAXB: tl.constexpr, BLOCK: tl.constexpr, TIMER: tl.constexpr,
                 TRAP: tl.constexpr, SW_ROUND: tl.constexpr, ADD: tl.constexpr = False, extra_ptr=None):
        # ADD: x is fp32 and this rank's term is bf16(x + extra) (extra bf16), rounded once as an fp32 sum stored to
        # bf16 would be: the MoE's routed pick sum and its shared expert's output, added here instead of in the
        # down kernel (PushAllReduce.__call__)
        pid = tl.program_id(0)
        e = tl.load(epoch_ptr + pid) + 1
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        mask = offs < n
        x = _own_term(x_ptr, extra_ptr, offs, mask, ADD, SW_ROUND)
        acc = _push_sum(x, e, offs, mask, pid, addr_ptr, epoch_ptr, err_ptr, rank, timeout, W, CAP, MAXB, TIMER, TRAP)
        tl.store(out_ptr + offs, _rne_bf16(acc, SW_ROUND), mask=mask)


def _extra(extra: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    assert extra.dtype == torch.bfloat16 and extra.shape == x.shape, (extra.dtype, extra.shape, x.shape)
    return extra.contiguous()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class PushAllReduce:
    """Rank `rank` of `world`: `addrs[q]` the address (in this process) of rank q's receive region of
    region_numel(world, cap, block) bf16 elements, its flag words zeroed on every rank before any rank's first call.
    `cap`: the largest message in elements. `block` elements per program, `warps` per program. `timeout_s`: how long
    a program waits for a peer before it records the epoch in `err` and traps (on a GPU; under the interpreter,
    `spin_iters` polls and no trap)."""

    def __init__(self, addrs: list[int], rank: int, world: int, cap: int, device: torch.device, block: int = 2048,
                 warps: int = 4, timeout_s: float = 30.0, spin_iters: int = 1 << 20) -> None:
        assert triton is not None, "the push all-reduce needs triton"
        assert len(addrs) == world and 0 <= rank < world and cap % block == 0 and block & (block - 1) == 0
        assert all(a % 16 == 0 for a in addrs)
        self.rank, self.world, self.cap, self.block, self.warps = rank, world, cap, block, warps
        self.maxb = cap // block
        self.addrs = torch.tensor(addrs, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(self.maxb, dtype=torch.int32, device=device)
        self.err = torch.zeros(1, dtype=torch.int32, device=device)
        interp = _interpreting() or device.type != "cuda"
        self.timer, self.trap = not interp, not interp
        self.timeout = spin_iters if interp else int(timeout_s * 1e9)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and x.numel() <= self.cap

    def _args(self, x: torch.Tensor, out: torch.Tensor) -> tuple:
        return (x, out, self.addrs, self.epoch, self.err, x.numel(), self.rank, self.timeout)

    def _consts(self) -> dict:
        return dict(W=self.world, CAP=self.cap, MAXB=self.maxb, BLOCK=self.block, TIMER=self.timer, TRAP=self.trap,
                    SW_ROUND=not self.timer, num_warps=self.warps)

    def warmup(self, x: torch.Tensor) -> None:
        """Compile for x's specialization without launching (so the first real call does not leave a peer spinning
        through a compile)."""
        if not _interpreting():
            _push_ar.warmup(*self._args(x, torch.empty_like(x)), grid=(triton.cdiv(x.numel(), self.block),),
                            **self._consts())

    def __call__(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """x (contiguous bf16, numel <= cap; every rank calls with the same numel, in the same order) -> the sum.
        extra (bf16, x's shape): x is fp32 instead and this rank's term is bf16(x + extra), one rounding (what a
        kernel that added extra to its fp32 x before storing bf16 would have passed in)."""
        assert x.is_contiguous() and x.numel() <= self.cap
        assert x.dtype == (torch.bfloat16 if extra is None else torch.float32), x.dtype
        n = x.numel()
        out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        if n:
            kw = {} if extra is None else dict(ADD=True, extra_ptr=_extra(extra, x))
            _push_ar[(triton.cdiv(n, self.block),)](*self._args(x, out), **self._consts(), **kw)
        return out

    def error(self) -> int:
        """The epoch at which a program gave up waiting for a peer (0: never). Reads the device (host sync)."""
        return int(self.err.item())
