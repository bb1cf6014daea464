"""⑥ model MoE FFN: normed x_n [T, D] (+ token ids for hash routing) in, routed + shared expert output [T, D] out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds4f.model.args import ModelArgs
from ds4f.model.linear import Linear


class Expert(nn.Module):
    """SwiGLU with the asymmetric clamp: silu(min(x.w1, L)) * clamp(x.w3, -L, L), then w2."""

    def __init__(self, dim: int, inter: int, fmt: str, limit: float, dtype: torch.dtype):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, fmt, dtype)
        self.w2 = Linear(inter, dim, fmt, dtype)
        self.w3 = Linear(dim, inter, fmt, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.w1(x), self.w3(x)
        if self.limit > 0:
            g, u = g.clamp(max=self.limit), u.clamp(min=-self.limit, max=self.limit)
        return self.w2(F.silu(g) * u)


class Gate(Linear):
    """Router: scores = sqrt(softplus(x . weight^T)) in fp32. Learned layers pick the top-k of scores + bias (bias
    selects only); hash layers take ids = tid2eid[token]. Weights are the picked raw scores, renormalized, scaled."""

    def __init__(self, args: ModelArgs, layer: int, dtype: torch.dtype):
        super().__init__(args.hidden_size, args.n_routed_experts, "bf16", dtype)
        self.topk, self.scaling, self.norm_topk = (args.num_experts_per_tok, args.routed_scaling_factor,
                                                   args.norm_topk_prob)
        self.hash = args.is_hash_layer(layer)
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.topk, dtype=torch.int64))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> weights [T, topk] fp32, expert ids [T, topk] int64."""
        scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()
        if self.hash:
            assert input_ids is not None, "hash-routed layer needs the token ids"
            ids = self.tid2eid[input_ids].long()
        else:
            ids = torch.topk(scores + self.bias, self.topk, dim=-1, sorted=False).indices
        w = scores.gather(1, ids)
        if self.norm_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * self.scaling, ids


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, dtype: torch.dtype):
        super().__init__()
        d, inter, lim = args.hidden_size, args.moe_intermediate_size, args.swiglu_limit
        self.n_experts = args.n_routed_experts
        self.gate = Gate(args, layer, dtype)
        self.experts = nn.ModuleList(Expert(d, inter, args.expert_format, lim, dtype) for _ in range(self.n_experts))
        self.shared_experts = Expert(d, inter, args.linear_format, lim, dtype) if args.n_shared_experts else None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        w, ids = self.gate(x, input_ids)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts).tolist()
        for e, c in enumerate(counts):
            if c == 0:
                continue
            tok, slot = torch.where(ids == e)
            y.index_add_(0, tok, self.experts[e](x[tok]).float() * w[tok, slot, None])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype)
