"""⑥ kernels, the lightning indexer's query in one launch: its projection's output + head weights in, the scoring
kernel's q and w out (ds4f.kernels.indexer.indexer_scores).

`index_q(q, w, cos, sin, w_scale, fp8)`: q [T, H, d] (the indexer wq_b GEMV's output) has its last 2 * cos.shape[1]
channels rotated in place (rope_'s code: the same bits), w [T, H] (the weights_proj columns, any row stride) becomes
fp32 w * w_scale; with fp8 (e4m3 index keys) q is also quantized per (token, head) as quant_heads_fp8 does and
the power-of-two scale folded into w. Before: rope_ + a scale launch (+ ~12 torch launches for the quantization)
on the CSA layers' index chain, the decode step's critical path there. One program per token (H a power of two);
the torch composition elsewhere."""

from __future__ import annotations

import torch

from ds4f.kernels import pdl
from ds4f.kernels.rope import rope_
from ds4f.kernels.sparse_attn import use_triton

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.rope import _norm_rope_rows
except ImportError:  # CPU-only installs: index_q runs the torch composition
    triton = None

FP8_MAX = 448.0


def quant_heads_fp8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hi, d] -> (e4m3 [T, Hi, d], fp32 scale [T, Hi]) with q ≈ q8 * scale per (token, head): scale = the
    smallest power of two putting the head's amax at or below 448 (exact to fold into the head weights), found from
    amax's exponent and mantissa (amax = f * 2^e, f in [0.5, 1): 2^(e - 9), doubled when f > 0.875)."""
    amax = q.float().abs().amax(dim=-1).clamp(min=1e-30)
    frac, exp = torch.frexp(amax)
    scale = torch.ldexp(torch.ones_like(amax), exp - 9 + (frac > 0.875).to(exp.dtype))
    q8 = (q.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q8, scale


def index_q_ref(q: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_scale: float,
                fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The composition index_q replaces: rope_ in place, w.float() * w_scale, then quant_heads_fp8 (scale into w)."""
    rope_(q, cos, sin)
    wf = w.float() * w_scale
    if not fp8:
        return q, wf
    q8, s = quant_heads_fp8(q)
    return q8, wf * s


if triton is not None:

    @triton.jit
    def _index_q(q_ptr, w_ptr, q8_ptr, wo_ptr, cos_ptr, sin_ptr, z_ptr, N, H, s_qt, s_qh, s_wt, s_8t, s_8h, s_cs,
                 w_scale, z_per, ZN,
                 HD: tl.constexpr, HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                 FP8: tl.constexpr, ZERO: tl.constexpr = False, PDL: tl.constexpr = False):
        # program = token t, its H (= BLOCK_H) heads: rope_'s row code in place, then the head weights and (FP8) the
        # per-head e4m3 rows from the rotated q (re-read after a CTA barrier: other threads wrote them). ZERO:
        # program t also zeroes z[t * z_per, (t + 1) * z_per) (clipped to ZN), the indexer's histogram buffer
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output (and any store)
        t = tl.program_id(0).to(tl.int64)
        if ZERO:
            for z0 in range(t * z_per, tl.minimum((t + 1) * z_per, ZN), 1024):
                offs_z = z0 + tl.arange(0, 1024)
                tl.store(z_ptr + offs_z, tl.zeros([1024], tl.int32), mask=offs_z < tl.minimum((t + 1) * z_per, ZN))
        _norm_rope_rows(q_ptr, q_ptr, cos_ptr, cos_ptr, sin_ptr, t, N, H, s_qt, s_qh, s_qt, s_qh, s_cs, 0.0, 1.0,
                        HD, HALF, BLOCK_P, BLOCK_H, False, False)
        offs_h = tl.arange(0, BLOCK_H)
        w = tl.load(w_ptr + t * s_wt + offs_h).to(tl.float32) * w_scale
        if FP8:
            tl.debug_barrier()
            offs_d = tl.arange(0, HD)
            qv = tl.load(q_ptr + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :]).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(qv), 1), 1e-30)
            bits = amax.to(tl.int32, bitcast=True)
            # the scale's biased exponent: amax's, minus 8 (448 = 1.75 * 2^8), plus 1 when its mantissa > 1.75
            e = ((bits >> 23) & 255) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
            inv = ((254 - e) << 23).to(tl.float32, bitcast=True)  # 1 / scale, exact
            q8 = tl.minimum(tl.maximum(qv * inv[:, None], -448.0), 448.0)
            tl.store(q8_ptr + t * s_8t + offs_h[:, None] * s_8h + offs_d[None, :], q8.to(q8_ptr.dtype.element_ty))
            w = w * (e << 23).to(tl.float32, bitcast=True)
        tl.store(wo_ptr + t * BLOCK_H + offs_h, w)


def index_q(q: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w_scale: float,
            fp8: bool, zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, d] (last dim dense; rotated in place), w [T, H] (unit column stride), cos / sin [T, rd/2] fp32 ->
    (q, or its e4m3 rows with fp8; w_out [T, H] fp32), equal to index_q_ref's. zero (int32, contiguous; the
    indexer's histogram buffer of indexer.decode_hist_buffer(zeroed=False)): zeroed by the same launch, which saves
    the fill kernel between it and the indexer (and keeps their PDL edge)."""
    t, h, hd = q.shape
    assert w.shape == (t, h) and q.stride(2) == 1 and w.stride(1) == 1, (q.shape, q.stride(), w.shape, w.stride())
    assert zero is None or (zero.dtype == torch.int32 and zero.is_contiguous())
    if not use_triton(q) or t == 0 or h & (h - 1) or hd & (hd - 1) or q.stride(0) < h * hd:
        if zero is not None:
            zero.zero_()
        return index_q_ref(q, w, cos, sin, w_scale, fp8)
    assert cos.shape == sin.shape == (t, cos.shape[1]) and cos.stride() == sin.stride() and cos.stride(1) == 1
    half = cos.shape[1]
    wo = torch.empty(t, h, dtype=torch.float32, device=q.device)
    q8 = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device) if fp8 else q
    zn = 0 if zero is None else zero.numel()
    _index_q[(t,)](q, w, q8, wo, cos, sin, zero if zero is not None else wo, t * h, h, q.stride(0), q.stride(1),
                   w.stride(0), q8.stride(0), q8.stride(1), cos.stride(0), float(w_scale), -(-zn // t), zn, HD=hd,
                   HALF=half, BLOCK_P=triton.next_power_of_2(half), BLOCK_H=h, FP8=fp8, ZERO=zero is not None,
                   num_warps=4, **pdl.launch(q.device))
    return q8, wo
