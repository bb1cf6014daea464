"""⑥ kernels, routed MoE: x [T, D] + expert weights + top-k routing in, Σ_j w_j·expert_j(x) [T, D] out."""

from __future__ import annotations

import torch

from ds4f.kernels.ref import fused_moe_ref
from ds4f.kernels.sparse_attn import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: fused_moe falls back to the reference
    triton = None

if triton is not None:

    @triton.jit
    def _block_rows(sid_ptr, be_ptr, pid_m, rows, M, BLOCK_M: tl.constexpr, PER_PICK: tl.constexpr):
        # (expert, pick ids [BLOCK_M]) of block pid_m; PER_PICK: block m holds pick m alone (be_ptr = topk_ids),
        # which needs no sort for decode-sized batches
        if PER_PICK:
            e = tl.load(be_ptr + pid_m)
            sid = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, M)
        else:
            e = tl.load(be_ptr + pid_m)
            sid = tl.load(sid_ptr + rows)
        return e, sid

    @triton.jit
    def _moe_up(
        x_ptr, w_ptr, sid_ptr, be_ptr, a_ptr, M, I, DM, limit, s_xt, s_we, s_wn, s_at,
        TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PER_PICK: tl.constexpr,
    ):
        # program = (block of BLOCK_M sorted rows of one expert, BLOCK_N columns of gate and the same of up)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        e, sid = _block_rows(sid_ptr, be_ptr, pid_m, rows, M, BLOCK_M, PER_PICK)
        if e >= 0:
            rmask = sid < M  # padding rows hold M
            tok = (sid // TOPK).to(tl.int64)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < I
            wg_ptr = w_ptr + e.to(tl.int64) * s_we + offs_n[:, None].to(tl.int64) * s_wn
            wu_ptr = wg_ptr + I * s_wn
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, DM, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < DM
                xa = tl.load(x_ptr + tok[:, None] * s_xt + offs_k[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0)
                wmask = nmask[:, None] & kmask[None, :]
                wg = tl.load(wg_ptr + offs_k[None, :], mask=wmask, other=0.0)
                wu = tl.load(wu_ptr + offs_k[None, :], mask=wmask, other=0.0)
                acc_g = tl.dot(xa, tl.trans(wg), acc_g)
                acc_u = tl.dot(xa, tl.trans(wu), acc_u)
            # V4 SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit)
            g = tl.minimum(acc_g, limit)
            u = tl.minimum(tl.maximum(acc_u, -limit), limit)
            a = g / (1.0 + tl.exp(-g)) * u
            tl.store(a_ptr + rows.to(tl.int64)[:, None] * s_at + offs_n[None, :], a.to(tl.bfloat16),
                     mask=nmask[None, :])

    @triton.jit
    def _moe_down(
        a_ptr, w_ptr, sid_ptr, be_ptr, tw_ptr, out_ptr, M, DM, I, s_at, s_we, s_wn, s_ot,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_PICK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        e, sid = _block_rows(sid_ptr, be_ptr, pid_m, rows, M, BLOCK_M, PER_PICK)
        if e >= 0:
            rmask = sid < M
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = offs_n < DM
            wd_ptr = w_ptr + e.to(tl.int64) * s_we + offs_n[:, None].to(tl.int64) * s_wn
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, I, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                kmask = offs_k < I
                aa = tl.load(a_ptr + rows.to(tl.int64)[:, None] * s_at + offs_k[None, :], mask=kmask[None, :],
                             other=0.0)
                wd = tl.load(wd_ptr + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
                acc = tl.dot(aa, tl.trans(wd), acc)
            tw = tl.load(tw_ptr + sid, mask=rmask, other=0.0)
            acc = acc * tw[:, None]
            # one output row per (token, pick): the k picks are summed by the caller, deterministically
            tl.store(out_ptr + sid.to(tl.int64)[:, None] * s_ot + offs_n[None, :], acc,
                     mask=rmask[:, None] & nmask[None, :])


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the T*k picks by expert, each expert's run padded to a multiple of block_m, without a host sync.

    Returns sorted_ids [P] int32 (flat pick id t*k+j, or T*k for padding) and block_expert [P // block_m] int32
    (-1 = unused block); P = block_m * (ceil(T*k / block_m) + min(E, T*k)) bounds the padded length."""
    flat = topk_ids.reshape(-1).long()
    M = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    rank = torch.arange(M, device=dev) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    dest = (pend - padded)[e_sorted] + rank
    n_blocks = (M + block_m - 1) // block_m + min(num_experts, M)
    sorted_ids = torch.full((n_blocks * block_m,), M, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(n_blocks, device=dev) * block_m
    be = torch.searchsorted(pend, starts, right=True)  # first expert whose padded run ends after the block start
    block_expert = torch.where(be < num_experts, be, -1).to(torch.int32)
    return sorted_ids, block_expert


PER_PICK_MAX = 64  # up to this many picks, one block per pick (no sort; a repeated expert is read again)


def _config(m_per_expert: float) -> dict[str, int]:
    if m_per_expert <= 16:  # decode: bytes-bound on the picked experts' weights, spread over many N tiles
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3)
    if m_per_expert <= 64:
        return dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    limit: float,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """out [T, D] bf16 = Σ_j topk_weights[t,j] · (swiglu_clamp(x[t] @ w13[e]ᵀ) @ w2[e]ᵀ), e = topk_ids[t,j].

    x [T, D] bf16; w13 [E, 2I, D] bf16 (gate rows then up rows); w2 [E, D, I] bf16; topk_ids [T, k] int32 in [0, E);
    topk_weights [T, k] fp32. Two grouped GEMMs over the expert-sorted picks (no loop over experts); the SwiGLU
    activation is stored bf16 between them. No host sync: CUDA-graph safe."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(-1) == 1, "x must be [T, D] bf16"
    T, DM = x.shape
    assert w13.dim() == 3 and w13.dtype == torch.bfloat16 and w13.is_contiguous() and w13.shape[2] == DM
    E, I2, _ = w13.shape
    assert I2 % 2 == 0
    I = I2 // 2
    assert w2.shape == (E, DM, I) and w2.dtype == torch.bfloat16 and w2.is_contiguous()
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_ids.dtype == torch.int32
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32
    if not use_triton(x):
        return fused_moe_ref(x, w13, w2, topk_ids, topk_weights, limit)
    k = topk_ids.shape[1]
    M = T * k
    if M == 0:
        return torch.zeros_like(x)
    cfg = dict(config or _config(M / E))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    per_pick = cfg.pop("PER_PICK", int(M <= PER_PICK_MAX))
    if per_pick:
        sorted_ids, block_expert = topk_ids, topk_ids.contiguous().view(-1)
        nb = M
    else:
        sorted_ids, block_expert = moe_align(topk_ids, E, bm)
        nb = block_expert.numel()
    a = torch.empty(nb * bm, I, dtype=torch.bfloat16, device=x.device)
    _moe_up[(nb, triton.cdiv(I, bn))](
        x, w13, sorted_ids, block_expert, a, M, I, DM, float(limit), x.stride(0), w13.stride(0), w13.stride(1),
        a.stride(0), TOPK=k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PER_PICK=per_pick, **cfg,
    )
    out = torch.empty(M, DM, dtype=torch.float32, device=x.device)
    tw = topk_weights.contiguous().view(-1)
    _moe_down[(nb, triton.cdiv(DM, bn))](
        a, w2, sorted_ids, block_expert, tw, out, M, DM, I, a.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PER_PICK=per_pick, **cfg,
    )
    return out.view(T, k, DM).sum(1).to(torch.bfloat16)


def moe_bytes(T: int, k: int, E: int, D: int, I: int) -> float:
    """Fewest HBM bytes: each distinct expert hit is read once (expected count for uniform routing), x in, out out."""
    hit = E * (1.0 - (1.0 - 1.0 / E) ** (T * k))
    return hit * 3 * I * D * 2 + T * D * 2 * 2


def moe_flops(T: int, k: int, D: int, I: int) -> float:
    return 2.0 * T * k * 3 * I * D
