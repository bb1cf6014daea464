"""⑥ kernels, the row-tile scaffolding of the FP8 decode GEMVs without tensor cores (fp8_gemv_cc, fp8_gemv_h2): their
grid and register layout, K-split buffers and finish, and config rules.

Program = (BLOCK_N rows inside one 128-row scale block, K slice). The weights are read as int32 words (4 e4m3 bytes),
8 bytes per thread per row of a 128-column block, straight into registers (the next block's while this one is
consumed: a register double buffer); a kernel's x words take the same register layout. A K split's fp32 partials
are summed in split order by the tile's last program to arrive (arrival counters, re-armed: CUDA-graph safe).
"""

from __future__ import annotations

import torch

from ds4f.kernels import arrival

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers take their references first
    triton = None

Cfg = tuple[int, int, int]  # BLOCK_N, SPLIT, num_warps

if triton is not None:

    @triton.jit
    def _store(acc, o_p, part_p, t, T, nmask, SPLIT_K: tl.constexpr):
        # row t of the output (or of the split's partials) from acc [BN, lanes]: its 128-column sums
        y = tl.sum(acc, 1)
        if SPLIT_K:
            tl.store(part_p, y, mask=t < T)
        else:
            tl.store(o_p, y.to(o_p.dtype.element_ty), mask=nmask & (t < T))

    @triton.jit
    def _program(x_ptr, w_ptr, ws_ptr, NT, K, GN, s_xg, s_wsn, k_per, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
        # program (pid_n, pid_s) of the CUDA-core GEMV grids: rows [n0, n0 + BLOCK_N) (rn) over the 128-column blocks
        # [k_lo, k_lo + k_per). w as int32 words [NT, K / 4], x as int64 words [T, G, K / 4] (strides in words); 8
        # bytes of weights per thread per load: the x words' 16-byte loads then take the same layout (2 words per
        # thread, 16 lanes on K). -> the pointers (w_p, x_p, s_p), steps, and the first DEPTH blocks' weight words and
        # scales, loaded here: before the PDL wait (weights and their scales only, ds4f.kernels.pdl)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        k_lo = pid_s * k_per
        w_p = w_ptr + tl.minimum(rn, NT - 1).to(tl.int64)[:, None] * (K // 4) \
            + tl.max_contiguous(k_lo // 4 + tl.arange(0, 32), 2)[None, :]
        x_p = x_ptr + (n0 // GN) * s_xg + k_lo // 4
        s_p = ws_ptr + (n0 // 128) * s_wsn + k_lo // 128
        steps = k_per // 128
        wq = tl.load(w_p)
        sq = tl.load(s_p)
        wq2 = wq
        sq2 = sq
        if DEPTH > 1:  # a second block in flight
            wq2 = tl.load(w_p + 32, mask=steps > 1, other=0)
            sq2 = tl.load(s_p + 1, mask=steps > 1, other=0)
        return pid_n, pid_s, n0, rn, k_lo, w_p, x_p, s_p, steps, wq, sq, wq2, sq2

    @triton.jit
    def _step(w_p, s_p, sq, i, steps, DEPTH: tl.constexpr, SCALE_E8M0: tl.constexpr):
        # step i: block i + DEPTH's weight words and scale (in flight while block i is consumed), and block i's scale
        # sq as fp32 (UE8M0 byte b -> 2^(b-127) as fp32 bits)
        wn = tl.load(w_p + (i + DEPTH) * 32, mask=i + DEPTH < steps, other=0)
        sn = tl.load(s_p + i + DEPTH, mask=i + DEPTH < steps, other=0)
        s = sq
        if SCALE_E8M0:
            s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
        return wn, sn, s

    @triton.jit
    def _rotate(wq, sq, wq2, sq2, wn, sn, DEPTH: tl.constexpr):
        # the register buffer after a step: (next block, its scale, the one after) -> (wq, sq, wq2, sq2)
        if DEPTH > 1:
            return wq2, sq2, wn, sn
        return wn, sn, wq2, sq2

    @triton.jit
    def _finish(a0, a1, a2, a3, out_ptr, part_ptr, lock_ptr, T, NT, s_ot, pid_n, pid_s, rn, BLOCK_N: tl.constexpr,
                TP: tl.constexpr, SPLIT_K: tl.constexpr):
        # the tokens' accumulators [BLOCK_N, lanes] -> out rows (SPLIT_K: partials, the last arrival sums them)
        nmask = rn < NT
        nr = tl.num_programs(0) * BLOCK_N
        pp = part_ptr + pid_s * T * nr + rn  # partials [n_split, T, tiles * BLOCK_N] fp32
        o_p = out_ptr + rn
        _store(a0, o_p, pp, 0, T, nmask, SPLIT_K)
        if TP > 1:
            _store(a1, o_p + s_ot, pp + nr, 1, T, nmask, SPLIT_K)
        if TP > 2:
            _store(a2, o_p + 2 * s_ot, pp + 2 * nr, 2, T, nmask, SPLIT_K)
            _store(a3, o_p + 3 * s_ot, pp + 3 * nr, 3, T, nmask, SPLIT_K)
        if SPLIT_K:  # the last arrival sums the partials in split order
            n_split = tl.num_programs(1)
            tl.debug_barrier()  # every thread's partial is written before the release below
            cnt = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == n_split - 1:
                for t in range(0, T):
                    tot = tl.zeros([BLOCK_N], tl.float32)
                    sp = 0
                    while sp < n_split:
                        tot += tl.load(part_ptr + (sp * T + t) * nr + rn, cache_modifier=".cg")
                        sp += 1
                    tl.store(o_p + t * s_ot, tot.to(out_ptr.dtype.element_ty), mask=nmask)
                tl.store(lock_ptr + pid_n, 0)


def valid(cfg: Cfg, nt: int, k: int, groups: int) -> bool:
    """BLOCK_N a power of two dividing 128 and each group's rows; K in whole 128-column blocks that the split
    divides evenly."""
    bn, split, nw = cfg
    return (8 <= bn <= 128 and 128 % bn == 0 and (nt // groups) % bn == 0 and k % 128 == 0 and split >= 1
            and (k // 128) % split == 0 and nw in (1, 2, 4, 8))


def generic_config(nt: int, k: int, groups: int, sms: int) -> Cfg:
    """64-row tiles (32 where a group has fewer rows), a K split toward ~4 programs per SM."""
    bn = 64
    while bn > 8 and (nt // groups) % bn:
        bn //= 2
    tiles, blocks = nt // bn, k // 128
    split = 1
    while split * 2 <= blocks and blocks % (split * 2) == 0 and tiles * split * 2 <= 4 * sms:
        split *= 2
    return bn, split, 4


def x_ok(x: torch.Tensor) -> bool:
    """x [T, G, K] readable as int64 words of 4 bf16: unit inner stride, 8-byte aligned rows."""
    return (x.dtype == torch.bfloat16 and x.stride(-1) == 1 and x.stride(0) % 4 == 0 and x.stride(1) % 4 == 0
            and x.data_ptr() % 8 == 0)


def token_slots(t: int) -> int:
    """The kernels' token accumulators for t <= 4 tokens: 1, 2 or 4 (TP)."""
    return 1 if t == 1 else 2 if t == 2 else 4


def split_buffers(x: torch.Tensor, out: torch.Tensor, tiles: int, bn: int, split: int,
                  key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A K split's fp32 partials [split * T * tiles * bn] and its arrival counters (keyed by `key`); without a split
    (split 1) the kernel reads neither: out twice."""
    if split == 1:
        return out, out
    part = torch.empty(split * x.shape[0] * tiles * bn, dtype=torch.float32, device=x.device)
    return part, arrival.counters(x.device, tiles, key)


