"""⑥ kernels, block-FP8 GEMM: x [M, K] bf16 + W [N, K] e4m3 with one scale per 128x128 block in, x @ W^T [M, N] out.

Two schemes behind `fp8_linear` (and `fp8_grouped_linear`, G independent [N, K] blocks of one weight, for wo_a):
- "w8" (decode, M <= W8_MAX_M, and every M below sm_89): weight-only dequant in the kernel; each e4m3 tile is
  widened to bf16, dotted with bf16 x, and the fp32 partial is scaled by its block scale. Memory bound: the grid
  splits N, and K too (fp32 partials, one reduce) when N alone would leave SMs idle. On CUDA at M <= 16 the
  swap-AB GEMV of ds4f/kernels/fp8_gemv.py runs instead where its per-shape table picks it (DS4F_FP8_GEMV=0: never).
- "a8w8" (prefill, sm_89+): x quantized per token per 128 columns (e4m3, power-of-two fp32 scales by default, as the
  official reference), then fp8 x fp8 tl.dot per 128-wide K block with both scales applied to the fp32 partial.
Weight scales may be fp32 or UE8M0 bytes (float8_e8m0fnu / uint8). Below sm_89 Triton has no e4m3 type: the weight
is read as bytes and widened through fp16 bit patterns (exact: e4m3 bits << 7 = the fp16 of value / 256).
The pure-torch references (`fp8_linear_ref`, `quant_act_ref`, `fp8_linear_a8_ref`) are the CPU path and the oracle. The
Triton programs are in fp8_gemm_kernels.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ds4f.kernels import arrival
from ds4f.kernels.fp8_gemm_kernels import triton  # None on CPU-only installs: fp8_linear runs the reference
from ds4f.kernels.sparse_attn import sm_count, use_triton
from ds4f.model.quant import FP8_BLOCK, FP8_DTYPE, FP8_MAX, dequant_fp8_block

if triton is not None:
    from ds4f.kernels.fp8_gemm_kernels import _a8w8_kernel, _quant_kernel, _sum_splits, _w8_kernel

W8_MAX_M = 64  # largest M that takes the weight-only scheme on sm_89+
ACT_POW2 = True  # activation scales rounded up to powers of two (official reference); False: amax / 448
AMAX_FLOOR = 1e-4  # all-zero token groups get a finite scale
# K-split reduce: False = a second kernel sums the fp32 partials; True = the last split of each tile sums them
# (one launch; arrival counters per weight shape: two calls of one shape must not run at once on two streams).
# True: at M=1 on H200 it was as fast or faster on every V4 shape (bench/results/fp8_gemm.jsonl, session 3: wq_a
# 10.3 vs 11.7 us, wkv 10.0 vs 11.0, wo_a 22.2 vs 22.7, wo_b 23.3 vs 23.6, head 189.3 vs 189.2) and saves a launch
# per projection in the decode graphs (~190 per step at TP=2); tests/gpu/test_fp8_gemm_gpu.py covers it in graphs.
SERIAL_SPLIT = True


@dataclass(frozen=True)
class Cfg:
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8


# ------------------------------------------------------------------------------------------------ references

def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [..., K] @ dequant(w [N, K], w_scale)^T in fp32 -> [..., N] out_dtype (scheme w8's exact math)."""
    wf = dequant_fp8_block(w, w_scale, torch.float32)
    return (x.float() @ wf.t()).to(out_dtype)


def grouped_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                ref: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """x [T, G, K] against G stacked row groups of w [G * N, K] (w_scale's row blocks split alike) -> [T, G, N]
    fp32: ref (default fp8_linear_ref; fp8_linear_a8_ref for the a8 scheme) per group."""
    ref = ref or fp8_linear_ref
    g = x.shape[1]
    rows, r = w.shape[0] // g, -(-w.shape[0] // g // 128)
    return torch.stack([ref(x[:, i], w[rows * i:rows * (i + 1)], w_scale[r * i:r * (i + 1)], torch.float32)
                        for i in range(g)], 1)


def quant_act_ref(x: torch.Tensor, pow2: bool = True, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, s [M, ceil(K/block)] fp32), x ≈ q * s per token per `block` columns.

    amax floored at AMAX_FLOOR; pow2: s = the smallest power of two with amax / s <= 448, found from amax's exponent
    and mantissa bits (exact); else s = amax / 448. q = round-to-nearest-even(x / s) clamped to ±448."""
    m, k = x.shape
    kb = -(-k // block)
    xp = torch.zeros(m, kb * block, dtype=torch.float32, device=x.device)
    xp[:, :k] = x.float()
    xg = xp.view(m, kb, block)
    amax = xg.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    if pow2:
        frac, exp = torch.frexp(amax)  # amax = frac * 2^exp, frac in [0.5, 1)
        # amax / 448 = (2 frac / 1.75) * 2^(exp - 9): above 1 * 2^(exp-9) iff frac > 0.875
        s = torch.ldexp(torch.ones_like(amax), exp - 9 + (frac > 0.875).to(exp.dtype))
    else:
        s = amax / FP8_MAX
    q = (xg / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, kb * block)[:, :k]
    return q.contiguous(), s


def fp8_linear_a8_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype = torch.bfloat16, pow2: bool = True) -> torch.Tensor:
    """Scheme a8w8's exact math: x [M, K] quantized by quant_act_ref, dequantized, @ dequant(w)^T in fp32."""
    q, s = quant_act_ref(x, pow2)
    m, k = q.shape
    xd = (q.float() * s.repeat_interleave(FP8_BLOCK, 1)[:, :k])
    return fp8_linear_ref(xd, w, w_scale, out_dtype)


# ------------------------------------------------------------------------------------------------ wrappers

_NATIVE: dict[torch.device, bool] = {}


def fp8_native(device: torch.device) -> bool:
    """Whether Triton has the e4m3 type (and fp8 tl.dot) on `device`: sm_89+ (the interpreter: yes)."""
    if device.type != "cuda":
        return True
    if device not in _NATIVE:
        _NATIVE[device] = torch.cuda.get_device_capability(device) >= (8, 9)
    return _NATIVE[device]


def w8_config(m: int) -> Cfg:
    """Weight-only scheme tiles by M (decode sizes; M > 64 only below sm_89, the prefill fallback)."""
    if m <= 16:
        return Cfg(16, 64, 128, 4, 4)
    if m <= 32:
        return Cfg(32, 64, 128, 4, 4)
    if m <= 64:
        return Cfg(64, 64, 128, 4, 3)
    return Cfg(128, 128, 64, 8, 3)


def a8w8_config(m: int) -> Cfg:
    """fp8 x fp8 scheme tiles (BLOCK_K is the 128-column scale block)."""
    if m <= 128:
        return Cfg(64, 64, 128, 4, 3)
    return Cfg(64, 128, 128, 4, 3)


def _split_for(progs: int, chunks: int, device: torch.device) -> int:
    """K splits so that about 2 programs per SM stream weights; each split keeps >= 2 K chunks (the caller rounds
    it down to a divisor of `chunks`)."""
    target = 2 * sm_count(device)
    if progs >= target or chunks < 4:
        return 1
    return min(-(-target // progs), chunks // 2)


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, groups: int) -> tuple[int, int]:
    if w.dtype != FP8_DTYPE or w.dim() != 2:
        raise ValueError(f"fp8 weight must be 2-D float8_e4m3fn, got {w.dtype} {tuple(w.shape)}")
    n_all, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight {tuple(w.shape)} expects {k}")
    if n_all % groups or (groups > 1 and (n_all // groups) % FP8_BLOCK):
        raise ValueError(f"weight rows {n_all} do not split into {groups} groups of whole 128-row blocks")
    want = (-(-n_all // FP8_BLOCK), -(-k // FP8_BLOCK))
    if tuple(w_scale.shape) != want:
        raise ValueError(f"block scale shape {tuple(w_scale.shape)}, expected {want} for weight {tuple(w.shape)}")
    return n_all // groups, k


def _scale_arg(w_scale: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if w_scale.dtype == torch.float32:
        return w_scale.contiguous(), False
    if w_scale.dtype in (torch.float8_e8m0fnu, torch.uint8, torch.int8):
        return w_scale.contiguous().view(torch.uint8), True
    return w_scale.float().contiguous(), False


@dataclass(frozen=True)
class Opts:
    """Overrides for tests and sweeps; None = the default (scheme by M and arch, the tile tables, the K split
    heuristic, e4m3 native on sm_89+, ACT_POW2, SERIAL_SPLIT)."""
    scheme: str = "auto"  # "auto" | "w8" | "a8w8"
    cfg: Cfg | None = None
    split: int | None = None
    native: bool | None = None
    pow2: bool | None = None
    serial: bool | None = None
    gemv: bool | None = None  # w8 on the swap-AB GEMV (ds4f/kernels/fp8_gemv.py) for M <= 16: None = its table on
    # CUDA when cfg is None, True = always (split overrides its K split), False = never
    a8: bool | None = None  # that GEMV's a8 form (x quantized per 128 columns): None = fp8_gemv.use_a8's choice


def _counters(device: torch.device, tiles: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Tile arrival counts for the serial split-K reduce, one buffer per weight shape (decode runs the indexer's
    wq_b on a side stream while wq_b runs on the main one: a shared buffer let their splits count each other's
    arrivals); zero between calls (the last split re-arms)."""
    return arrival.counters(device, tiles, ("fp8_gemm", *shape))


def _gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, groups: int, out_dtype: torch.dtype,
          o: Opts) -> torch.Tensor:
    """x [M, G, K] (last dim contiguous) -> [M, G, N]."""
    n, k = _check(x, w, w_scale, groups)
    m, dev = x.shape[0], x.device
    out = torch.empty(m, groups, n, dtype=out_dtype, device=dev)
    if m == 0:
        return out
    native = fp8_native(dev) if o.native is None else o.native
    scheme = o.scheme
    if scheme == "auto":
        scheme = "a8w8" if native and m > W8_MAX_M else "w8"
    if scheme not in ("w8", "a8w8"):
        raise ValueError(f"unknown scheme {scheme!r} (auto | w8 | a8w8)")
    if scheme == "a8w8" and not native:
        raise ValueError("scheme a8w8 needs e4m3 support in Triton (sm_89+)")
    ws, e8m0 = _scale_arg(w_scale)
    w = w.contiguous()
    if x.stride(-1) != 1:
        x = x.contiguous()
    if scheme == "a8w8":
        c = o.cfg or a8w8_config(m)
        if c.bk != FP8_BLOCK:
            raise ValueError(f"a8w8 needs BLOCK_K = {FP8_BLOCK} (one activation scale per K block), got {c.bk}")
        q, s_t = _quant(x, ACT_POW2 if o.pow2 is None else o.pow2)
        grid = (triton.cdiv(m, c.bm) * triton.cdiv(n, c.bn), groups)
        _a8w8_kernel[grid](q, s_t, w, ws, out, m, n, k, q.stride(0), ws.stride(0), out.stride(0),
                           KB=triton.cdiv(k, c.bk), SCALE_E8M0=e8m0, EVEN_K=k % c.bk == 0, BLOCK_M=c.bm,
                           BLOCK_N=c.bn, BLOCK_K=c.bk, GROUP_M=c.group_m, num_warps=c.warps, num_stages=c.stages)
        return out
    from ds4f.kernels import fp8_gemv

    # decode sizes: the swap-AB GEMV where its table (or the generic rule) says it wins; Opts(gemv=True) forces it,
    # Opts(cfg=...) (tiles of _w8_kernel) or gemv=False keep the w8 tiles
    auto = fp8_gemv.USE_GEMV and x.is_cuda and o.cfg is None
    use_gemv = m <= fp8_gemv.MAX_T and (auto if o.gemv is None else o.gemv)
    if use_gemv and fp8_gemv.w8_gemv(x, w, ws, e8m0, out, groups, native, split=o.split, force=o.gemv is True,
                                     a8=o.a8):
        return out
    c = o.cfg or w8_config(m)
    chunks = triton.cdiv(k, c.bk)
    progs = triton.cdiv(n, c.bn) * triton.cdiv(m, c.bm) * groups
    sp = _split_for(progs, chunks, dev) if o.split is None else o.split
    sp = max(d for d in range(1, min(max(sp, 1), chunks) + 1) if chunks % d == 0)
    part = out if sp == 1 else torch.empty(sp, m, groups, n, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, c.bn), sp, triton.cdiv(m, c.bm) * groups)
    serial = sp > 1 and (SERIAL_SPLIT if o.serial is None else o.serial) and grid[0] * grid[2] <= 1 << 16
    cnt = _counters(dev, grid[0] * grid[2], (n, k, groups)) if serial else out
    _w8_kernel[grid](x, w if native else w.view(torch.uint8), ws, out, part, cnt, m, n, k, groups,
                     x.stride(0), x.stride(1), ws.stride(0), m * groups * n, groups * n, n,
                     CHUNKS=chunks // sp, SPLITS=sp, SERIAL=serial, NATIVE=native, SCALE_E8M0=e8m0,
                     EVEN_K=k % c.bk == 0, DOT_F32=not x.is_cuda, BLOCK_M=c.bm, BLOCK_N=c.bn, BLOCK_K=c.bk,
                     num_warps=c.warps, num_stages=c.stages)
    if sp > 1 and not serial:
        total = m * groups * n
        _sum_splits[(triton.cdiv(total, 1024),)](part, out, total, S=sp, BLOCK=1024, num_warps=4)
    return out


def _quant(x: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, G, K] -> (q [M, G*K] e4m3, scales transposed [G*ceil(K/128), M] fp32)."""
    m, groups, k = x.shape
    kb = triton.cdiv(k, FP8_BLOCK)
    q = torch.empty(m, groups * k, dtype=FP8_DTYPE, device=x.device)
    s_t = torch.empty(groups * kb, m, dtype=torch.float32, device=x.device)
    bm = 32
    _quant_kernel[(triton.cdiv(m, bm), groups * kb)](x, q, s_t, m, k, kb, x.stride(0), x.stride(1), q.stride(0),
                                                      POW2=pow2, SW_ROUND=not x.is_cuda, BLOCK_M=bm, num_warps=4)
    return q, s_t


def quant_act(x: torch.Tensor, pow2: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of quant_act_ref: x [M, K] -> (q [M, K] e4m3, s [M, ceil(K/128)] fp32, a transposed view)."""
    pow2 = ACT_POW2 if pow2 is None else pow2
    if not use_triton(x):
        return quant_act_ref(x, pow2)
    q, s_t = _quant(x.reshape(x.shape[0], 1, x.shape[-1]), pow2)
    return q, s_t.t()


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
               opts: Opts | None = None) -> torch.Tensor:
    """x [..., K] (bf16) @ (w [N, K] e4m3 * w_scale [ceil(N/128), ceil(K/128)])^T -> [..., N] out_dtype.

    Scheme w8 for M <= W8_MAX_M or below sm_89, else a8w8 (see the module docstring). CPU without the Triton
    interpreter: fp8_linear_ref."""
    if not use_triton(x):
        return fp8_linear_ref(x, w, w_scale, out_dtype)
    out = _gemm(x.reshape(-1, 1, x.shape[-1]), w, w_scale, 1, out_dtype, opts or Opts())
    return out.view(*x.shape[:-1], w.shape[0])


def fp8_grouped_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16, opts: Opts | None = None) -> torch.Tensor:
    """x [M, G, K] with w [G*N, K] (group g = rows g*N..(g+1)*N-1, N a multiple of 128) -> [M, G, N]:
    out[:, g] = x[:, g] @ W_g^T (V4's wo_a: G = o_groups). Same schemes as fp8_linear."""
    groups = x.shape[1]
    if not use_triton(x):
        wf = dequant_fp8_block(w, w_scale, torch.float32).view(groups, -1, w.shape[1])
        return torch.einsum("mgk,gnk->mgn", x.float(), wf).to(out_dtype)
    return _gemm(x, w, w_scale, groups, out_dtype, opts or Opts())


def gemm_bytes(m: int, n: int, k: int) -> int:
    """HBM bytes of one call: e4m3 weight + fp32 scales + bf16 x in + bf16 out."""
    return n * k + 4 * (-(-n // 128)) * (-(-k // 128)) + 2 * m * k + 2 * m * n


__all__ = ["ACT_POW2", "SERIAL_SPLIT", "W8_MAX_M", "Cfg", "Opts", "a8w8_config", "fp8_grouped_linear", "fp8_linear",
           "fp8_linear_a8_ref", "fp8_linear_ref", "fp8_native", "gemm_bytes", "quant_act", "quant_act_ref",
           "w8_config"]
