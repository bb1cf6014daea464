"""⑥ kernels, a decode step's K=V row into an fp8 pool in one launch: the raw kv projection rows x [T, hd] + kv_norm
weight + cos / sin in, pool rows written (scratch rows and, when given, window-ring rows), nothing returned.

= rope.norm_rope (weighted RMSNorm rounded to bf16, then RoPE of the last rd channels) followed by
fp8.store_kv_rows to each row list, bit for bit: the same per-row code (rope_tile.norm_rope_tile,
fp8._kv_tile_store) in one program instead of three launches (norm + RoPE, the scratch store, the window store) on
the kv chain.
Triton on CUDA (and the interpreter); elsewhere the two-step torch path.
"""

from __future__ import annotations

import torch

from ds4f.kernels import pdl
from ds4f.kernels.fp8 import store_kv_rows
from ds4f.kernels.rope import _blocks, _check, norm_rope
from ds4f.kernels.sparse_attn import use_triton

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.fp8 import _kv_tile_store
    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.rope_tile import norm_rope_tile as _norm_rope_tile
except ImportError:  # CPU-only installs: norm_rope_store_kv runs the two-step path
    triton = None


if triton is not None:

    @triton.jit
    def _norm_rope_store_kv(x_ptr, w_ptr, cos_ptr, sin_ptr, rows_ptr, rows2_ptr, nope_ptr, exp_ptr, rope_ptr, N,
                            s_xt, s_cs, eps, s_nope, s_exp, s_rope, HD: tl.constexpr, HALF: tl.constexpr,
                            BLOCK_R: tl.constexpr, NOPE: tl.constexpr, TWO: tl.constexpr, PDL: tl.constexpr = False):
        # program = BLOCK_R tokens: the normed, rotated bf16 row (as norm_rope returns it), quantized into pool rows
        # rows[t] (and rows2[t] with TWO)
        pdl_enter(PDL)
        t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = t < N
        tok = t.to(tl.int64)
        y, _, _ = _norm_rope_tile(x_ptr, w_ptr, cos_ptr, sin_ptr, rm, tok, tok * s_xt, s_cs, eps, 1.0, HD, HALF,
                                  HD // 2, BLOCK_R, True, True)
        y = y.to(tl.float32)
        dst = tl.load(rows_ptr + t, mask=rm, other=0).to(tl.int64)
        _kv_tile_store(y, rm, dst, nope_ptr, exp_ptr, rope_ptr, s_nope, s_exp, s_rope, HD, NOPE, HD, BLOCK_R)
        if TWO:
            dst2 = tl.load(rows2_ptr + t, mask=rm, other=0).to(tl.int64)
            _kv_tile_store(y, rm, dst2, nope_ptr, exp_ptr, rope_ptr, s_nope, s_exp, s_rope, HD, NOPE, HD, BLOCK_R)


def fits(x: torch.Tensor) -> bool:
    """Whether the one launch runs x [T, hd]: Triton there, bf16 rows, hd a power of two >= 64 (one tile)."""
    hd = x.shape[-1]
    return use_triton(x) and x.dim() == 2 and x.dtype == torch.bfloat16 and hd >= 64 and hd & (hd - 1) == 0


def norm_rope_store_kv(x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                       nope: torch.Tensor, exp: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor,
                       rows2: torch.Tensor | None = None) -> None:
    """(nope, exp, rope)[rows] (and [rows2]) = quantize_kv_rows(norm_rope(x, w, cos, sin, eps)): x [T, hd] bf16 (any
    row stride), w [hd], rows / rows2 [T] int64 pool rows. One launch where fits(x), else norm_rope + store_kv_rows."""
    _check(x, cos, sin)
    assert rows.shape == (x.shape[0],) and (rows2 is None or rows2.shape == rows.shape)
    if not fits(x):
        kv = norm_rope(x, w, cos, sin, eps)
        for r in (rows, rows2):
            if r is not None:
                store_kv_rows(nope, exp, rope, r, kv, fused=None)
        return
    t, hd = x.shape
    if t == 0:
        return
    assert x.stride(1) == 1 and nope.stride(-1) == exp.stride(-1) == rope.stride(-1) == 1
    block_r = _blocks(hd, cos.shape[1], True)[1]
    _norm_rope_store_kv[(triton.cdiv(t, block_r),)](
        x, w.float().contiguous(), cos, sin, rows, rows2 if rows2 is not None else rows, nope.view(torch.uint8), exp,
        rope, t, x.stride(0), cos.stride(0), eps, nope.stride(0), exp.stride(0), rope.stride(0), HD=hd,
        HALF=cos.shape[1], BLOCK_R=block_r, NOPE=nope.shape[1], TWO=rows2 is not None, num_warps=4,
        **pdl.launch(x.device))
