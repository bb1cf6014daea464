"""Decode GEMV / skinny GEMM in bf16: x [T, K] (T <= 16) @ W[N, K]^T -> [T, N] with fp32 accumulation, and the
grouped wo_a form (o [T, G*Kg] per group @ wa [G, r, Kg] -> [T, G*r], glue.grouped_out's contract).

One Triton kernel, swap-AB: each program holds a [BLOCK_N, BLOCK_K] tile of W (contiguous along K, the A operand of
tl.dot, pipelined over num_stages) against x^T [BLOCK_K, 16] (T zero-padded to 16), so the weight is read once at
full width whatever T is. Enough programs to fill the GPU come from BLOCK_N and, for short N, a K split whose
partials (fp32 scratch) are summed by the last program of each N tile to arrive (a per-tile counter that it resets
to 0, so the next call and every CUDA-graph replay find it zeroed): no separate reduce kernel, no memset.
The grouped form is the same kernel over W = wa.view(G*r, Kg) where a tile's rows (inside one group) read x's
columns of that group.

Tile configs (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) come per shape from CONFIGS (filled by
bench/sweep_gemv.py on an H200), an env override DS4F_GEMV_<NAME>=bn,bk,split,nw,ns ("0": cuBLAS), or a generic
rule for other shapes. DS4F_GEMV=0 turns the whole path off (F.linear / torch.bmm). Falls back on CPU, T > 16,
dtypes other than bf16/fp16, non-unit inner strides. Concurrent calls of one shape on two streams would share the
tile counters: not supported (the decode graph runs its projections in order on one stream).
"""

from __future__ import annotations

import os
from functools import cache

import torch
import torch.nn.functional as F

from ds4f.kernels import arrival, pdl
from ds4f.kernels.knobs import env_knobs
from ds4f.model.layers import rms_normalize

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: linear / grouped_linear fall back to torch
    triton = None

MAX_T = 16
BLOCK_T = 16  # tl.dot's smallest N: T rows padded with zeros
ENABLED = os.environ.get("DS4F_GEMV", "1") != "0"

Cfg = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages

# name -> ((N, K, G), config or None for cuBLAS). G > 1: the grouped wo_a form (N = G*r, K = Kg).
# Shapes of the V4-Flash decode projections; H200 sweeps (bench/sweep_gemv.py, 2026-11-28, T = 1): WO_A 17.6 vs
# cuBLAS 18.5 us, WO_B 18.5 vs 21.2, W_IN_CSA 11.8 vs 13.6, W_IN_HCA 9.7 vs 10.3; cuBLAS kept where it was not slower
# (IDX_WQ_B, HEAD). WQ_B: 17.8 vs cuBLAS 18.6 us (2026-11-29, graphs of PDL launches; its q norm fused: linear_norm),
# then 2 stages instead of 3 (8-layer 8K step 1.918 vs 1.929 / 1.926 ms, 2026-11-29: 3 CTAs per SM instead of 2,
# so the CSA layers' side-stream kernels wait less for a free SM while it runs); IDX_WQ_B on the Triton GEMV in
# 32-row tiles beside it (1.900 vs 1.917 / 1.910 ms in one call; 64-row tiles: 1.956 vs 1.929).
CONFIGS: dict[str, tuple[tuple[int, int, int], Cfg | None]] = {
    "WQ_B": ((32768, 1024, 1), (64, 128, 1, 4, 2)),
    "WO_A": ((8192, 4096, 8), (64, 128, 1, 4, 5)),
    "WO_B": ((4096, 8192, 1), (64, 256, 1, 4, 5)),
    "W_IN_SWA": ((1536, 4096, 1), (32, 256, 4, 4, 4)),
    "W_IN_HCA": ((2560, 4096, 1), (32, 256, 3, 4, 4)),
    "W_IN_CSA": ((4160, 4096, 1), (32, 256, 2, 4, 4)),
    "IDX_WQ_B": ((8192, 1024, 1), (32, 128, 1, 4, 2)),
    "HEAD": ((129280, 4096, 1), None),
}

if triton is not None:

    @triton.jit
    def _xtile(x_p, tmask, km, g_p, ss, NORM: tl.constexpr):
        # x tile [BLOCK_T, BLOCK_K] (rows tmask [BLOCK_T, 1], columns km [BLOCK_K]) -> (tile, ss); NORM: the tile
        # times the norm weight g (rounded to x's dtype; the rows' 1 / rms scales the sums after the loop) and ss
        # [BLOCK_T] += the rows' squares
        xv = tl.load(x_p, mask=tmask & km[None, :], other=0.0)
        if NORM:
            xf = xv.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            xv = (tl.load(g_p, mask=km, other=0.0).to(tl.float32)[None, :] * xf).to(x_p.dtype.element_ty)
        return xv, ss

    @triton.jit
    def _gemv(
        x_ptr, w_ptr, out_ptr, part_ptr, lock_ptr, g_ptr, T, N, K, s_xt, s_wn, s_ot, GN, s_xg, k_per, eps,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr,
        EVEN_K: tl.constexpr, NORM: tl.constexpr = False, PDL: tl.constexpr = False,
    ):
        # program (pid_n, pid_s): rows [n0, n0 + BLOCK_N) of W over columns [k_lo, k_lo + k_per) of K. NORM (no
        # groups, no K split): RMSNorm_g(x) @ W^T as r * ((g * x) @ W^T), r [T] the rows' 1 / rms from the squares
        # of the x tiles the loop loads anyway (g_ptr is any pointer without NORM)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        rn = n0 + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, BLOCK_T)
        rk = tl.arange(0, BLOCK_K)
        rows = tl.minimum(rn, N - 1)  # rows past N re-read row N-1 (unmasked loads); the store drops them
        k_lo = pid_s * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
        w_p = w_ptr + rows.to(tl.int64)[:, None] * s_wn + (k_lo + rk)[None, :]
        x_p = x_ptr + (n0 // GN) * s_xg + rt[:, None] * s_xt + (k_lo + rk)[None, :]  # grouped: the tile's group
        tmask = rt[:, None] < T
        g_p = g_ptr + k_lo + rk  # NORM only
        acc = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
        ss = tl.zeros([BLOCK_T], tl.float32)
        k0 = k_lo
        if PDL:  # (ds4f.kernels.pdl) the first W tile is read while the kernel before drains; x after the wait
            km = (k_lo + rk) < k_hi
            w = tl.load(w_p, mask=km[None, :], other=0.0)
            pdl_enter(PDL)
            xv, ss = _xtile(x_p, tmask, km, g_p, ss, NORM)
            acc = tl.dot(w, tl.trans(xv), acc)
            w_p += BLOCK_K
            x_p += BLOCK_K
            g_p += BLOCK_K
            k0 = k_lo + BLOCK_K
        for k in range(k0, k_hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_p)
                xv, ss = _xtile(x_p, tmask, rk < BLOCK_K, g_p, ss, NORM)
            else:
                km = (k + rk) < k_hi
                w = tl.load(w_p, mask=km[None, :], other=0.0)
                xv, ss = _xtile(x_p, tmask, km, g_p, ss, NORM)
            acc = tl.dot(w, tl.trans(xv), acc)  # [BLOCK_N, BLOCK_T]
            w_p += BLOCK_K
            x_p += BLOCK_K
            g_p += BLOCK_K
        if NORM:
            acc = acc * tl.rsqrt(ss / K + eps)[None, :]
        omask = (rn[:, None] < N) & (rt[None, :] < T)
        o_p = out_ptr + rt[None, :] * s_ot + rn[:, None]
        if SPLIT_K:
            # partials [n_split, n_tiles * BLOCK_N, BLOCK_T] fp32; the last arriving program of the tile sums them
            n_split = tl.num_programs(1)
            tile = (rn[:, None] - n0) * BLOCK_T + rt[None, :]
            stride_s = tl.num_programs(0) * BLOCK_N * BLOCK_T
            pmask = rt[None, :] < T  # only the T live columns of the partials travel
            tl.store(part_ptr + pid_s * stride_s + n0 * BLOCK_T + tile, acc, mask=pmask)
            tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
            cnt = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == n_split - 1:
                tot = tl.zeros([BLOCK_N, BLOCK_T], tl.float32)
                for s in range(0, n_split):  # fixed order: the sum does not depend on arrival order
                    tot += tl.load(part_ptr + s * stride_s + n0 * BLOCK_T + tile, mask=pmask, other=0.0,
                                   cache_modifier=".cg")
                tl.store(o_p, tot.to(out_ptr.dtype.element_ty), mask=omask)
                tl.store(lock_ptr + pid_n, 0)  # every program of this tile has counted: reset for the next call
        else:
            tl.store(o_p, acc.to(out_ptr.dtype.element_ty), mask=omask)


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T in fp32, rounded to x's dtype (what the kernel computes)."""
    return (x.float() @ w.float().t()).to(x.dtype)


def grouped_ref(o: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """o [T, G*Kg] (any [T, ...] of that size) with wa [G, r, Kg] -> [T, G*r] in fp32, rounded to o's dtype."""
    t, g, r = o.shape[0], wa.shape[0], wa.shape[1]
    y = torch.einsum("tgk,grk->tgr", o.reshape(t, g, -1).float(), wa.float())
    return y.reshape(t, g * r).to(o.dtype)


@cache
def _device_limits(index: int) -> tuple[int, int]:
    """(SM count, opt-in shared memory per block in bytes) of CUDA device `index`."""
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, int(getattr(p, "shared_memory_per_block_optin", 99 * 1024))


def _limits(dev: torch.device) -> tuple[int, int]:
    if dev.type != "cuda":
        return 132, 227 * 1024
    return _device_limits(dev.index if dev.index is not None else torch.cuda.current_device())


def generic_config(n: int, k: int, sms: int) -> Cfg:
    """A config for a shape the table lacks: full-K programs when N alone gives >= 2 per SM, else a K split."""
    bk = 256 if k >= 2048 else next(b for b in (128, 64, 32, 16) if k >= b or b == 16)
    bn = 64 if n >= 64 * 2 * sms else 32 if n >= 32 else 16
    tiles, chunks = -(-n // bn), -(-k // bk)
    split = max(1, min(chunks, 8, -(-2 * sms // tiles)))
    return bn, bk, split, 4, 4


@cache
def _env_config(name: str) -> Cfg | None | str:
    """DS4F_GEMV_<name>: "0" -> None (cuBLAS), five ints -> that config, unset -> "table"."""
    var = f"DS4F_GEMV_{name}"
    if os.environ.get(var, "") == "0":
        return None
    v = env_knobs(var, 5, "32,256,2,4,4")
    return v if v else "table"  # type: ignore[return-value]


def pick(n: int, k: int, groups: int, dev: torch.device) -> Cfg | None:
    """The config for (N, K, G) on dev: env override, then the table, then generic_config; None = cuBLAS."""
    sms, _ = _limits(dev)
    for name, (shape, cfg) in CONFIGS.items():
        if shape == (n, k, groups):
            env = _env_config(name)
            return cfg if env == "table" else env  # type: ignore[return-value]
    return generic_config(n, k, sms)


def _fit(cfg: Cfg, smem: int, itemsize: int, pdl_on: bool = False) -> Cfg:
    """Fewer pipeline stages where `smem` bytes of shared memory per block (e.g. ~99 KB on sm_86 / sm_12x) cannot
    hold them (with PDL the tile loaded before the wait takes one stage's worth more)."""
    bn, bk, split, nw, ns = cfg
    while ns > 2 and (ns + pdl_on) * (bn + BLOCK_T) * bk * itemsize > smem - 4096:
        ns -= 1
    return bn, bk, split, nw, ns


def _locks(dev: torch.device, key: tuple[int, int, int, int, int], tiles: int) -> torch.Tensor:
    """Per (device, shape, BLOCK_N) tile counters; zero between calls (the kernel resets them)."""
    return arrival.counters(dev, tiles, ("gemv", *key))


def launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cfg: Cfg, gn: int = 0, s_xg: int = 0,
           norm: tuple[torch.Tensor, float] | None = None) -> None:
    """out [T, N] = x @ w^T (gn = 0) or the grouped form (tiles of gn rows read x's columns from (row // gn) * s_xg).
    x [T, *] and w [N, K] with unit inner stride; runs wherever triton does (the interpreter on CPU too).
    norm = (g [K], eps), not grouped: out = RMSNorm_g(x) @ w^T (model.layers.RMSNorm's math on each row of x)."""
    t, (n, k) = x.shape[0], w.shape
    pk = pdl.launch(x.device)
    bn, bk, split, nw, ns = _fit(cfg, _limits(x.device)[1], x.element_size(), pk["PDL"])
    chunks = -(-k // bk)
    per = -(-chunks // max(1, split))
    split = -(-chunks // per)  # no empty K slice
    if norm is not None:  # the rows' squares are summed inside one program: the whole of K, no split
        assert gn == 0 and norm[0].shape == (k,) and norm[0].stride(0) == 1, "norm: not grouped, g [K]"
        split, per = 1, chunks
    tiles = -(-n // bn)
    if split > 1:
        part = torch.empty(split * tiles * bn * BLOCK_T, dtype=torch.float32, device=x.device)
        lock = _locks(x.device, (n, k, gn, bn, split), tiles)
    else:
        part = lock = out  # unused
    _gemv[(tiles, split)](x, w, out, part, lock, x if norm is None else norm[0], t, n, k, x.stride(0), w.stride(0),
                          out.stride(0), gn or n, s_xg, per * bk, 0.0 if norm is None else float(norm[1]),
                          BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=BLOCK_T, SPLIT_K=split > 1, EVEN_K=k % bk == 0,
                          NORM=norm is not None, num_warps=nw, num_stages=ns, **pk)


def _usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (ENABLED and triton is not None and x.is_cuda and w.device == x.device and x.dtype == w.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and 1 <= x.shape[0] <= MAX_T
            and x.stride(-1) == 1 and w.stride(-1) == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ w [N, K]^T -> [T, N] (F.linear without bias); Triton for CUDA bf16/fp16 with T <= 16."""
    if x.dim() != 2 or w.dim() != 2 or not _usable(x, w) or w.shape[1] != x.shape[1] or w.shape[1] < 16:
        return F.linear(x, w)
    cfg = pick(w.shape[0], w.shape[1], 1, x.device)
    if cfg is None:
        return F.linear(x, w)
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    launch(x, w, out, cfg)
    return out


def rms_norm_ref(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """= model.layers.RMSNorm.forward on the rows of x [T, K] with weight g [K]."""
    return (g * rms_normalize(x.float(), eps)).to(x.dtype)


def linear_norm(x: torch.Tensor, g: torch.Tensor, eps: float, w: torch.Tensor) -> torch.Tensor:
    """RMSNorm_g(x) @ w^T -> [T, N] with the norm inside the GEMV (no launch, no round trip for the normed rows):
    Triton where linear's conditions hold (a shape the table gives to cuBLAS takes generic_config), else the
    reference norm and F.linear."""
    if (x.dim() != 2 or w.dim() != 2 or not _usable(x, w) or w.shape[1] != x.shape[1] or w.shape[1] < 16
            or g.shape != (x.shape[1],) or g.stride(0) != 1):
        return F.linear(rms_norm_ref(x, g, eps), w)
    n, k = w.shape
    cfg = pick(n, k, 1, x.device) or generic_config(n, k, _limits(x.device)[0])
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    launch(x, w, out, cfg, norm=(g, eps))
    return out


def grouped_bmm(o: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """glue.grouped_out's strided bmm (the fallback): o [T, G*Kg] per group @ wa [G, r, Kg] -> [T, G*r]."""
    t, g, r = o.shape[0], wa.shape[0], wa.shape[1]
    out = torch.empty(t, g * r, dtype=o.dtype, device=o.device)
    torch.bmm(o.reshape(t, g, -1).transpose(0, 1), wa.transpose(1, 2), out=out.view(t, g, r).transpose(0, 1))
    return out


def grouped_linear(o: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    """Grouped wo_a: o [T, ...] holding G*Kg values per token (group g = columns [g*Kg, (g+1)*Kg)) with
    wa [G, r, Kg] -> [T, G*r] (out[:, g*r:(g+1)*r] = o_g @ wa[g]^T). Triton where linear's conditions hold."""
    t, (g, r, kg) = o.shape[0], wa.shape
    x = o.reshape(t, -1)
    if (x.shape[1] != g * kg or not wa.is_contiguous() or not _usable(x, wa) or kg < 16):
        return grouped_bmm(o, wa)
    cfg = pick(g * r, kg, g, o.device)
    if cfg is None:
        return grouped_bmm(o, wa)
    bn = cfg[0]
    while bn > 16 and r % bn:  # a tile must stay inside one group
        bn //= 2
    if r % bn:
        return grouped_bmm(o, wa)
    out = torch.empty(t, g * r, dtype=o.dtype, device=o.device)
    launch(x, wa.view(g * r, kg), out, (bn, *cfg[1:]), gn=r, s_xg=kg)  # type: ignore[arg-type]
    return out
