"""⑥ model lightning indexer (CSA layers): queries (qr, x_n) + compressed index keys in, top-k entry ids out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds4f.model.args import ModelArgs
from ds4f.model.compressor import Compressor
from ds4f.model.layers import Rope
from ds4f.model.linear import Linear

SCORE_BUDGET = 1 << 26  # fp32 elements of the per-pass [queries, heads, entries] score buffer


class Indexer(nn.Module):
    """I(t, w) = sum_h weight[t, h] * ReLU(q_I[t, h] . k_w) * index_head_dim^-0.5; keeps the top index_topk."""

    def __init__(self, args: ModelArgs, ratio: int, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = (args.index_n_heads, args.index_head_dim,
                                                              args.index_topk, ratio)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, args.linear_format, dtype)
        self.weights_proj = Linear(args.hidden_size, self.n_heads, "bf16", dtype)
        self.compressor = Compressor(args, ratio, self.head_dim, overlap=True, dtype=dtype)

    def query(self, qr: torch.Tensor, x: torch.Tensor, rope: Rope,
              cs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """qr [T, q_lora_rank], x [T, D] -> q [T, n_heads, head_dim] fp32 (roped, no norm), weights [T, n_heads]."""
        q = rope(self.wq_b(qr).view(qr.shape[0], self.n_heads, self.head_dim), cs).float()
        w = self.weights_proj(x).float() * self.n_heads**-0.5
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q [n, H, d], w [n, H], keys [E, d] fp32, positions [n] -> entry ids [n, min(topk, E)], -1 where not visible.

        Entry j is visible to the query at t iff j < (t+1)//ratio. Ties go to the lower entry id, so the pick does not
        depend on how many (masked) entries a forward happens to hold.
        """
        n, e = q.shape[0], keys.shape[0]
        visible = (positions + 1) // self.ratio  # [n]
        ids = torch.arange(e, device=q.device)
        if e <= self.topk:  # everything visible is selected; no scoring needed
            sel = ids.expand(n, e)
            return torch.where(sel < visible[:, None], sel, -1)
        step = max(1, SCORE_BUDGET // (self.n_heads * e))  # queries per pass: bounds the [step, H, E] buffer
        sel = torch.empty(n, self.topk, dtype=torch.long, device=q.device)
        for i in range(0, n, step):
            j = min(n, i + step)
            scores = F.relu(torch.einsum("nhd,ed->nhe", q[i:j], keys)) * self.head_dim**-0.5
            scores = (scores * w[i:j].unsqueeze(-1)).sum(dim=1)
            scores = scores.masked_fill(ids[None, :] >= visible[i:j, None], float("-inf"))
            sel[i:j] = _topk_lowest_id_on_ties(scores, self.topk)
        return torch.where(sel < visible[:, None], sel, -1)


def _topk_lowest_id_on_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [n, k] (ascending) of the k largest scores per row; among equal scores at the cut the lower id wins."""
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]
    above = scores > kth
    at = scores == kth
    keep = above | (at & (at.cumsum(dim=-1) <= k - above.sum(dim=-1, keepdim=True)))
    return torch.nonzero(keep)[:, 1].view(scores.shape[0], k)
