"""⑥ kernels, pure-torch references: the Triton kernels' inputs in, their exact math out (fp32, any device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequant_rows(pool: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """pool [N, D] (bf16, or fp8 e4m3 with scale [N, D // G] fp32) -> [N, D] fp32."""
    if scale is None:
        return pool.float()
    n, d = pool.shape
    g = d // scale.shape[1]
    return (pool.float().view(n, -1, g) * scale.float()[:, :, None]).view(n, d)


def sparse_attn_ref(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """MQA over per-token slot lists: q [T, H, D], kv_pool [N, D] (K = V), indices [T, K] (-1 = unused),
    sink [H] -> o [T, H, D] in q's dtype.

    o[t,h] = Σ_k exp(s_k - M) v_k / (Σ_k exp(s_k - M) + exp(sink_h - M)), s_k = scale * q[t,h]·kv[idx[t,k]];
    the sink sits in the denominator only, so a token with no valid index gets o = 0.
    """
    kv = dequant_rows(kv_pool, kv_scale)
    valid = indices >= 0
    rows = kv[indices.long().clamp(min=0)]  # [T, K, D]
    s = torch.einsum("thd,tkd->thk", q.float(), rows) * scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    sink_col = sink.float()[None, :, None].expand(s.shape[0], -1, 1)
    p = torch.softmax(torch.cat([s, sink_col], dim=-1), dim=-1)[..., :-1]  # [T, H, K]
    return torch.einsum("thk,tkd->thd", p, rows).to(q.dtype)


def indexer_scores_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    k_pool: torch.Tensor,
    slots: torch.Tensor,
    seq_of: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores: q [T, Hi, d], w [T, Hi], k_pool [N, d], slots [S, L] (slot of candidate entry l of
    sequence s), seq_of [T] (row of `slots` for token t), valid_len [T] (entries l < valid_len[t] are causal)
    -> scores [T, L] fp32, -inf at l >= valid_len[t].

    scores[t, l] = scale * Σ_h w[t,h] * ReLU(q[t,h] · k[slots[seq_of[t], l]]), scale defaults to d^-0.5.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    L = slots.shape[1]
    sl = slots[seq_of.long()].long()  # [T, L]
    valid = torch.arange(L, device=q.device)[None, :] < valid_len.long()[:, None]
    keys = dequant_rows(k_pool, k_scale)[sl.clamp(min=0)]  # [T, L, d]
    dots = torch.einsum("thd,tld->thl", q.float(), keys).relu_()
    s = torch.einsum("th,thl->tl", w.float(), dots) * scale
    return s.masked_fill(~valid, float("-inf"))


def topk_indices_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [T, L] fp32 (-inf = not selectable) -> [T, k] int32 entry ids of the k largest, -1 where fewer valid."""
    T, L = scores.shape
    kk = min(k, L)
    vals, idx = torch.topk(scores, kk, dim=-1)
    idx = idx.to(torch.int32).masked_fill(vals == float("-inf"), -1)
    if kk < k:
        idx = torch.cat([idx, idx.new_full((T, k - kk), -1)], dim=-1)
    return idx


def swiglu_clamp(h: torch.Tensor, limit: float) -> torch.Tensor:
    """h [..., 2I] = [gate | up] -> silu(min(gate, limit)) * clamp(up, -limit, limit) [..., I] (V4 clamp)."""
    g, u = h.chunk(2, dim=-1)
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    limit: float,
) -> torch.Tensor:
    """Routed experts: x [T, D], w13 [E, 2I, D] (rows 0..I-1 = w1 gate, I..2I-1 = w3 up), w2 [E, D, I],
    topk_ids [T, k], topk_weights [T, k] -> [T, D] in x's dtype; out[t] = Σ_j wt[t,j] * expert_{ids[t,j]}(x[t]).

    The activation is rounded to x's dtype between the two GEMMs, as the kernel stores it."""
    T, k = topk_ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1).long()
    for e in flat.unique().tolist():
        pos = (flat == e).nonzero().squeeze(1)  # positions in the flattened [T*k] list
        tok = pos // k
        a = swiglu_clamp(x[tok].float() @ w13[e].float().t(), limit).to(x.dtype).float()
        y = a @ w2[e].float().t()
        out.index_add_(0, tok, y * topk_weights.reshape(-1)[pos].float()[:, None])
    return out.to(x.dtype)
