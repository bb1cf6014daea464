"""⑥ kernels, MXFP4 routed MoE: x [T, D] bf16 + packed experts + top-k routing in, Σ_j w_j·expert_j(x) [T, D] bf16 out.

Experts stay packed as in the checkpoint: e2m1 nibbles two per byte along K (low nibble = even column) and one UE8M0
byte per 32 values (ds4f/model/quant.py). Each GEMM loads a [BLOCK_N, BLOCK_K/2] byte tile per K step, decodes it to
bf16 in registers (once per BLOCK_M rows) and feeds a bf16 tl.dot with fp32 accumulation; no dequantized copy of an
expert is ever written. The optional bf16 shared expert runs through ds4f.kernels.moe.fused_moe and is added.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ds4f.kernels.moe import fused_moe, moe_align, moe_sum
from ds4f.kernels.moe_mxfp4_kernels import triton  # None on CPU-only installs: the wrapper runs the reference
from ds4f.kernels.ref import fused_moe_ref, swiglu_clamp
from ds4f.model.quant import MXFP4_BLOCK, dequant_mxfp4, e8m0_bytes

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:
    from ds4f.kernels.moe_mxfp4_kernels import _down_gemv, _down_mx, _up_gemv, _up_mx

def _packed(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype == torch.int8:
        t = t.view(torch.uint8)
    assert t.dtype == torch.uint8, f"{name}: packed MXFP4 bytes must be uint8/int8, got {t.dtype}"
    assert t.dim() == 3 and t.is_contiguous(), f"{name}: must be a contiguous [E, N, K/2] tensor"
    return t


def _scales(t: torch.Tensor, q: torch.Tensor, name: str) -> torch.Tensor:
    s = e8m0_bytes(t, name)
    assert tuple(s.shape) == (q.shape[0], q.shape[1], 2 * q.shape[2] // MXFP4_BLOCK) and s.is_contiguous(), (
        f"{name}: UE8M0 scale must be contiguous [E, N, K/32], got {tuple(s.shape)}")
    return s


PER_PICK_MAX = 64  # up to this many picks, one block per pick (no sort; a repeated expert is read again)
# decode on CUDA (M <= PER_PICK_MAX picks): CUDA-core GEMV programs of 8 columns. H200, D=4096, I=1024 (a TP=2
# shard), bench/sweep_mxfp4_decode.py: T=1 43.8 us vs 77.1 us for the tl.dot tiles, T=4 118.9 vs 220.7 us
GEMV_CONFIG = dict(BLOCK_M=16, BLOCK_N=8, BLOCK_K=256, num_warps=4, num_stages=3, GEMV=1, PER_PICK=1)


def default_config(m_per_expert: float) -> dict[str, int]:
    """Tile sizes by the mean number of rows per expert (decode: bytes-bound; prefill: MMA-bound)."""
    if m_per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=3)
    if m_per_expert <= 64:
        # (64, 128, *) with the interleaved tile trips Triton 3.6 OptimizeDotOperands on sm_90 ("Illegal shared layout")
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _fit_k(bk: int, K: int) -> int:
    while bk > 32 and K % bk:
        bk //= 2
    return bk


def fused_moe_mxfp4(
    x: torch.Tensor,
    w13_q: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_q: torch.Tensor,
    w2_scale: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    swiglu_limit: float,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    config: dict[str, Any] | None = None,
    shared_out: torch.Tensor | None = None,
    shared_ready: Any = None,
    defer_shared: bool = False,
    x_side: Any = None,
) -> torch.Tensor:
    """out [T, D] bf16 = Σ_j weights[t,j] · (swiglu_clamp(x[t] @ W13[e]ᵀ) @ W2[e]ᵀ) (+ shared expert), e = ids[t,j].

    x [T, D] bf16; w13_q [E, 2I, D/2] uint8 (gate rows then up rows), w13_scale [E, 2I, D/32] UE8M0 bytes
    (uint8 or float8_e8m0fnu); w2_q [E, D, I/2], w2_scale [E, D, I/32]; ids [T, k] int32 in [0, E); weights [T, k]
    fp32; shared = (w13 [2Is, D], w2 [D, Is]) bf16 or None. Scales must lie in [2, 252] (2^-125..2^125). D and I
    are multiples of 32. No host sync: CUDA-graph safe. config: BLOCK_M/N/K, num_warps, num_stages, ASM (PTX nibble
    decode, CUDA only), SPLIT (even/odd column dots instead of an interleaved tile), PER_PICK, GEMV (with PER_PICK:
    CUDA-core FMAs instead of tl.dot), or DEC (ten ints: moe_mxfp4_decode's up and down tiles; with ASM, SUB, or A8:
    moe_mxfp4_a8's FP8-activation form; without a config moe_mxfp4_a8.a8_default decides). Without
    a config, decode-sized CUDA calls take moe_mxfp4_decode's table (DS4F_MXFP4_DEC=0: the GEMV below).
    shared_out [T, D] bf16: a shared expert's output the caller computed, added as `shared`'s would be (pass one of
    the two); shared_ready: the CUDA stream computing it, joined right before the first launch that reads it (the
    decode path's down kernel), so the routed up GEMM overlaps it. defer_shared (with shared_out): where the FP8-
    activation decode kernels run, the pick sum comes back in fp32 without shared_out and shared_ready is not joined:
    the caller adds shared_out and rounds once (Comm.all_reduce_add, after joining shared_ready), so the down kernel
    does not wait for the shared expert; other paths add it as usual and return bf16 (the dtype tells which).
    x_side: (stream, event): where the FP8-activation decode kernels run, x's operands are built on that stream
    (moe_mxfp4_decode.moe_decode); ignored elsewhere."""
    assert shared is None or shared_out is None, "pass the shared expert's weights or its output, not both"
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(-1) == 1, "x must be [T, D] bf16"
    T, DM = x.shape
    w13_q, w2_q = _packed(w13_q, "w13_q"), _packed(w2_q, "w2_q")
    E, I2, DH = w13_q.shape
    assert 2 * DH == DM and DM % MXFP4_BLOCK == 0, f"w13_q [E, 2I, D/2] does not match D = {DM}"
    I = I2 // 2
    assert I2 % 2 == 0 and I % MXFP4_BLOCK == 0 and tuple(w2_q.shape) == (E, DM, I // 2), "w2_q must be [E, D, I/2]"
    w13_s, w2_s = _scales(w13_scale, w13_q, "w13_scale"), _scales(w2_scale, w2_q, "w2_scale")
    assert ids.dim() == 2 and ids.shape[0] == T and ids.dtype == torch.int32
    assert weights.shape == ids.shape and weights.dtype == torch.float32
    if triton is None or not (x.is_cuda or _INTERPRET):
        y = fused_moe_mxfp4_ref(x, w13_q, w13_s, w2_q, w2_s, ids, weights, swiglu_limit, shared)
        return y if shared_out is None else (y.float() + shared_out.float()).to(x.dtype)
    k = ids.shape[1]
    M = T * k
    out_sh = _shared(x, shared, swiglu_limit) if shared_out is None else shared_out
    if M == 0:
        if shared_ready is not None:
            torch.cuda.current_stream().wait_stream(shared_ready)
        return torch.zeros_like(x) if out_sh is None else out_sh
    from ds4f.kernels import moe_mxfp4_decode as md  # here: it imports this module's jit helpers

    dec = md.tiles_for(config, x.is_cuda and not _INTERPRET, T, k, DM, I)
    if dec is not None:  # decode sizes: swap-AB tensor-core kernels, pick sum fused
        c = config or {}
        from ds4f.kernels import moe_mxfp4_a8 as a8
        from ds4f.kernels import moe_mxfp4_cc as mcc

        # CUDA-core streaming (moe_mxfp4_cc): config CC=1 with its DEC tiles, or DS4F_MXFP4_CC=1 at its table's
        use_cc = bool(c.get("CC", 0)) if config is not None else mcc.cc_default(x.device, DM, I, T)
        cc_tiles = dec if config is not None else mcc.pick(DM, I, T)
        if use_cc and cc_tiles is not None and mcc.fits(cc_tiles, DM, I):
            return md.moe_decode(x, (w13_q, w13_s), (w2_q, w2_s), ids, weights, swiglu_limit, out_sh, cc_tiles,
                                 False, shared_ready=shared_ready, form="cc")

        # FP8 activations, e4m3 MMA: a config's DEC tiles are the bf16 kernels' unless it also says A8
        use_a8 = bool(c.get("A8", 0)) if config is not None else a8.a8_default(x.device, DM, I, T)
        if use_a8 and "DEC" not in c and md._env() == "table":  # its own table unless tiles are forced
            dec = a8.pick(DM, I, T, dec)
        if use_a8 and a8.fits(dec, DM, I):
            defer = defer_shared and shared_out is not None  # the caller adds shared_out: not read here
            return a8.moe_decode_a8(x, (w13_q, w13_s), (w2_q, w2_s), ids, weights, swiglu_limit,
                                    None if defer else out_sh, dec, None if defer else shared_ready, out_f32=defer,
                                    x_side=x_side)
        return md.moe_decode(x, (w13_q, w13_s), (w2_q, w2_s), ids, weights, swiglu_limit, out_sh, dec,
                             bool(c.get("ASM", x.is_cuda and not _INTERPRET)),
                             bool(c.get("SUB", md.sub_default(x.device))),
                             shared_ready)
    if shared_ready is not None:
        torch.cuda.current_stream().wait_stream(shared_ready)
    gemv_ok = x.is_cuda and not _INTERPRET and M <= PER_PICK_MAX and os.environ.get("DS4F_MXFP4_GEMV", "1") == "1"
    cfg = dict(config or (GEMV_CONFIG if gemv_ok else default_config(M / E)))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    per_pick = cfg.pop("PER_PICK", int(M <= PER_PICK_MAX))
    asm = cfg.pop("ASM", int(x.is_cuda and not _INTERPRET))
    gemv = cfg.pop("GEMV", 0) and per_pick
    split, f32 = cfg.pop("SPLIT", 0), int(_INTERPRET)
    tw = weights.contiguous().view(-1)
    out = torch.empty(M, DM, dtype=torch.float32, device=x.device)
    q13 = (w13_q, w13_s, w13_q.stride(0), w13_q.stride(1), w13_s.stride(0), w13_s.stride(1))
    q2 = (w2_q, w2_s, w2_q.stride(0), w2_q.stride(1), w2_s.stride(0), w2_s.stride(1))
    if gemv:  # one pick per program row, CUDA-core FMAs on the decoded tile
        flat = ids.contiguous().view(-1)
        a = torch.empty(M, I, dtype=torch.bfloat16, device=x.device)
        _up_gemv[(M, triton.cdiv(I, bn))](
            x, *q13[:2], flat, a, float(swiglu_limit), x.stride(0), *q13[2:], a.stride(0), I=I, DM=DM, TOPK=k,
            BLOCK_N=bn, BLOCK_K=_fit_k(bk, DM), ASM=asm, F32=f32, **cfg)
        _down_gemv[(M, triton.cdiv(DM, bn))](
            a, *q2[:2], flat, tw, out, a.stride(0), *q2[2:], out.stride(0), DM=DM, I=I, BLOCK_N=bn,
            BLOCK_K=_fit_k(bk, I), ASM=asm, **cfg)
        return _finish(out, T, k, out_sh)
    flags = dict(PER_PICK=per_pick, ASM=asm, SPLIT=split, F32=f32, **cfg)
    if per_pick:
        sorted_ids, block_expert = ids, ids.contiguous().view(-1)
        nb = M
    else:
        sorted_ids, block_expert = moe_align(ids, E, bm)
        nb = block_expert.numel()
    a = torch.empty(nb * bm, I, dtype=torch.bfloat16, device=x.device)
    _up_mx[(nb, triton.cdiv(I, bn))](
        x, *q13[:2], sorted_ids, block_expert, a, M, float(swiglu_limit), x.stride(0), *q13[2:], a.stride(0),
        I=I, DM=DM, TOPK=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_fit_k(bk, DM), **flags,
    )
    _down_mx[(nb, triton.cdiv(DM, bn))](
        a, *q2[:2], sorted_ids, block_expert, tw, out, M, a.stride(0), *q2[2:], out.stride(0), DM=DM, I=I,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_fit_k(bk, I), **flags,
    )
    return _finish(out, T, k, out_sh)


def _finish(out: torch.Tensor, T: int, k: int, out_sh: torch.Tensor | None) -> torch.Tensor:
    """[T*k, D] fp32 rows (weighted per pick) -> Σ over the k picks (+ shared expert) as bf16, one launch."""
    return moe_sum(out, T, k, out_sh, round_by_hand=_INTERPRET)


def _shared(x: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None, limit: float) -> torch.Tensor | None:
    """The bf16 shared expert through the existing bf16 grouped kernel, as a one-expert MoE with weight 1."""
    if shared is None:
        return None
    w13, w2 = shared
    T = x.shape[0]
    ids = torch.zeros(T, 1, dtype=torch.int32, device=x.device)
    ones = torch.ones(T, 1, dtype=torch.float32, device=x.device)
    return fused_moe(x, w13.contiguous()[None], w2.contiguous()[None], ids, ones, limit)


def fused_moe_mxfp4_ref(
    x: torch.Tensor,
    w13_q: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_q: torch.Tensor,
    w2_scale: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    swiglu_limit: float,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Pure-torch reference of fused_moe_mxfp4 (same arguments, any device): each expert hit is dequantized alone
    (fp32, through ds4f.model.quant.dequant_mxfp4) and dropped after use; the activation is rounded to x's dtype
    between the GEMMs, as the kernel stores it; fp32 sums."""
    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1).long()
    for e in flat.unique().tolist():
        pos = (flat == e).nonzero().squeeze(1)  # positions in the flattened [T*k] list
        tok = pos // k
        w13 = dequant_mxfp4(w13_q[e], w13_scale[e], torch.float32, name=f"w13[{e}]")
        w2 = dequant_mxfp4(w2_q[e], w2_scale[e], torch.float32, name=f"w2[{e}]")
        a = swiglu_clamp(x[tok].float() @ w13.t(), swiglu_limit).to(x.dtype).float()
        out.index_add_(0, tok, (a @ w2.t()) * weights.reshape(-1)[pos].float()[:, None])
    if shared is not None:
        zeros = torch.zeros(T, 1, dtype=torch.int32, device=x.device)
        ones = torch.ones(T, 1, dtype=torch.float32, device=x.device)
        out += fused_moe_ref(x, shared[0][None], shared[1][None], zeros, ones, swiglu_limit).float()
    return out.to(x.dtype)


def mxfp4_moe_bytes(ids: torch.Tensor, D: int, I: int) -> float:
    """HBM bytes of one call: each distinct expert hit read once (packed nibbles + UE8M0 scales), x in, out out."""
    hit = int(ids.unique().numel())
    per_expert = 3 * I * D // 2 + 3 * I * D // MXFP4_BLOCK
    return hit * per_expert + ids.shape[0] * D * 2 * 2
