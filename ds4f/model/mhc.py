"""⑥ model mHC (manifold-constrained hyper-connections): 4-stream residual [T, hc, D] in, pre-mix / post-mix out."""

from __future__ import annotations

import torch

from ds4f.model.layers import rms_normalize


def hc_weights(mix: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mix [T, (2+hc)*hc] fp32 -> pre [T, hc], post [T, hc], comb [T, hc, hc] (Sinkhorn: doubly stochastic)."""
    t = mix.shape[0]
    pre_w, post_w, comb_w = mix.split([hc, hc, hc * hc], dim=-1)
    pre_b, post_b, comb_b = base.float().split([hc, hc, hc * hc])
    s = scale.float()
    pre = torch.sigmoid(pre_w * s[0] + pre_b) + eps
    post = 2 * torch.sigmoid(post_w * s[1] + post_b)
    comb = torch.softmax(comb_w.view(t, hc, hc) * s[2] + comb_b.view(hc, hc), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_mix(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
           eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hc, D] -> collapsed [T, D] (x's dtype), post [T, hc] fp32, comb [T, hc, hc] fp32 (doubly stochastic).

    fn [(2+hc)*hc, hc*D], base [(2+hc)*hc], scale [3], all fp32.
    """
    t = x.shape[0]
    mix = torch.nn.functional.linear(rms_normalize(x.reshape(t, -1).float(), norm_eps), fn.float())
    pre, post, comb = hc_weights(mix, scale, base, hc, iters, eps)
    collapsed = (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
    return collapsed, post, comb


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """New streams X'_k = post_k * y + sum_j comb[j, k] * X_j (comb used transposed); fp32 math, x's dtype out.

    y [T, D] sublayer output, x [T, hc, D] streams before the sublayer.
    """
    mixed = torch.matmul(comb.transpose(-1, -2), x.float())
    return (post.unsqueeze(-1) * y.float().unsqueeze(-2) + mixed).to(x.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
            norm_eps: float) -> torch.Tensor:
    """Final collapse: x [T, hc, D] -> [T, D] with pre = sigmoid(mix * scale + base) + eps; no post / comb."""
    t = x.shape[0]
    mix = torch.nn.functional.linear(rms_normalize(x.reshape(t, -1).float(), norm_eps), fn.float())
    pre = torch.sigmoid(mix * scale.float() + base.float()) + eps
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(x.dtype)
