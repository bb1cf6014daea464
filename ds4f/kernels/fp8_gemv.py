"""⑥ kernels, block-FP8 GEMV for a few tokens: x [M, G, K] bf16 (M <= GEMV_MAX_M) + W [G*N, K] e4m3 with one scale
per 128x128 block in, x @ W^T out ([M, G, N], or fp32 K-split partials [S, M, G, N] that fp8_gemm sums).

The alternative to fp8_gemm's w8 tiles at decode sizes: no tl.dot (whose M would be padded to 16), CUDA-core FMAs on
a [BLOCK_N, NB, 128] tile per step (NB 128-column scale blocks), one token per program with the tokens of a tile
adjacent in the grid so they share the weight tile in L2. Same math as fp8_linear_ref: each 128x128 block's products
are summed in fp32 and scaled by its block scale. Opt-in (DS4F_FP8_GEMV=1, or Opts(gemv=True)) until its GPU test
and the fp8_gemm bench have run on an H200.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fp8_gemm falls back to the reference before reaching this file
    triton = None

GEMV_MAX_M = 4  # tokens per call the GEMV serves (each token re-reads the weight, from L2 when the grid is lucky)
USE_GEMV = os.environ.get("DS4F_FP8_GEMV", "0") == "1"
BLOCK_N, NB = 16, 4  # 16 rows x 512 columns of e4m3 (8 KiB) per program step

if triton is not None:

    @triton.jit
    def _w8_gemv(
        x_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, G, s_xm, s_xg, s_wsn, s_op, s_om, s_og,
        CHUNKS: tl.constexpr, NATIVE: tl.constexpr, SCALE_E8M0: tl.constexpr, BLOCK_N: tl.constexpr,
        NB: tl.constexpr,
    ):
        # program = (token m, BLOCK_N rows of group g, K split s): CHUNKS steps of NB * 128 columns
        m = tl.program_id(0)
        pid_n = tl.program_id(1) // G
        g = tl.program_id(1) % G
        sp = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        wrow = g * N + tl.minimum(rn, N - 1)  # rows past N re-read row N-1; the store drops them
        b = tl.arange(0, NB)
        j = tl.arange(0, 128)
        acc = tl.zeros([BLOCK_N, NB, 128], tl.float32)
        for i in range(0, CHUNKS):
            kb0 = (sp * CHUNKS + i) * NB  # first 128-column block of this step
            col = (kb0 + b)[:, None] * 128 + j[None, :]  # [NB, 128]
            kmask = col < K
            xa = tl.load(x_ptr + m.to(tl.int64) * s_xm + g * s_xg + col, mask=kmask, other=0.0).to(tl.float32)
            wp = w_ptr + wrow.to(tl.int64)[:, None, None] * K + col[None, :, :]
            if NATIVE:
                wf = tl.load(wp, mask=kmask[None, :, :], other=0.0).to(tl.float32)
            else:  # e4m3 byte -> fp16 bits of value / 256, then x 256
                h = tl.load(wp, mask=kmask[None, :, :], other=0).to(tl.uint16)
                wf = (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32) * 256.0
            sp_ = ws_ptr + (wrow // 128)[:, None] * s_wsn + (kb0 + b)[None, :]  # [BLOCK_N, NB] block scales
            s = tl.load(sp_, mask=((kb0 + b) * 128 < K)[None, :], other=0)
            if SCALE_E8M0:
                s = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            acc += wf * xa[None, :, :] * s[:, :, None]
        y = tl.sum(tl.sum(acc, 2), 1)
        o = out_ptr + sp * s_op + m.to(tl.int64) * s_om + g * s_og + rn
        tl.store(o, y.to(out_ptr.dtype.element_ty), mask=rn < N)


def w8_gemv(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, n: int, k: int,
            groups: int, native: bool, split: int) -> torch.Tensor | None:
    """x [M, G, K] -> out [M, G, N] (split 1) or fp32 partials [split, M, G, N] returned for the caller to sum.
    ws: block scales [ceil(G*N/128), ceil(K/128)] fp32 or UE8M0 bytes (e8m0)."""
    m = x.shape[0]
    steps = triton.cdiv(triton.cdiv(k, 128), NB)
    split = max(d for d in range(1, min(split, steps) + 1) if steps % d == 0)
    part = out if split == 1 else torch.empty(split, m, groups, n, dtype=torch.float32, device=x.device)
    grid = (m, triton.cdiv(n, BLOCK_N) * groups, split)
    _w8_gemv[grid](x, w if native else w.view(torch.uint8), ws, part, m, n, k, groups, x.stride(0), x.stride(1),
                   ws.stride(0), m * groups * n, groups * n, n, CHUNKS=steps // split, NATIVE=native,
                   SCALE_E8M0=e8m0, BLOCK_N=BLOCK_N, NB=NB, num_warps=4, num_stages=3)
    return None if split == 1 else part
