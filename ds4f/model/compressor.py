"""⑥ model KV compressor (CSA overlapping / HCA disjoint): a chunk's x_n + cached state rows in, new entries out."""

from __future__ import annotations

import torch
from torch import nn

from ds4f.model.args import ModelArgs
from ds4f.model.cache import AttnCache
from ds4f.model.layers import RMSNorm, Rope
from ds4f.model.linear import Linear


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one `head_dim` entry with a per-channel softmax gate.

    overlap=True (CSA and the indexer): projections are 2*head_dim wide, Ca = first half (feeds the next window),
    Cb = second half (feeds its own window); entry w pools Ca of window w-1 with Cb of window w (2*ratio slots).
    overlap=False (HCA): entry w pools the ratio rows of window w.
    State rows (what the cache keeps, position-indexed, fp32): K | Z + ape[pos % ratio], width 2 * c * head_dim.
    """

    def __init__(self, args: ModelArgs, ratio: int, head_dim: int, overlap: bool, dtype: torch.dtype):
        super().__init__()
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        cd = (2 if overlap else 1) * head_dim
        self.wkv = Linear(args.hidden_size, cd, "bf16", dtype)
        self.wgate = Linear(args.hidden_size, cd, "bf16", dtype)
        self.ape = nn.Parameter(torch.zeros(ratio, cd, dtype=torch.float32), requires_grad=False)
        self.norm = RMSNorm(head_dim, args.rms_norm_eps)

    @property
    def state_width(self) -> int:
        return 2 * self.wkv.out_features

    def project(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, D], positions [T] -> state rows [T, 2*c*head_dim] fp32."""
        k = self.wkv(x).float()
        z = self.wgate(x).float() + self.ape[positions % self.ratio]
        return torch.cat([k, z], dim=-1)

    def compress(self, rows: torch.Tensor, start: int, layer: int, seq: int, kind: str, cache: AttnCache,
                 rope: Rope, dtype: torch.dtype) -> torch.Tensor:
        """Close the entries this chunk completes. rows [n, width]: the chunk's state rows at positions start.. .

        Reads earlier rows of the entries' windows from the cache, writes the chunk's rows, and returns the new
        entries [w_hi - w_lo, head_dim] (normed, roped at position w*ratio, in `dtype`) for w in [start//ratio, w_hi).
        """
        m, n = self.ratio, rows.shape[0]
        w_lo, w_hi = start // m, (start + n) // m
        if w_hi > w_lo:
            first = (w_lo - 1) * m if self.overlap else w_lo * m
            lo = max(first, 0)
            parts = []
            if first < 0:  # window -1 does not exist: its Ca slots get logit -inf and value 0
                pad = rows.new_zeros(m, rows.shape[1])
                pad[:, rows.shape[1] // 2:] = float("-inf")
                parts.append(pad)
            if lo < start:
                parts.append(cache.read_state(layer, seq, kind, lo, start).to(rows.device, torch.float32))
            parts.append(rows[: w_hi * m - start])
            entries = self.pool(torch.cat(parts, dim=0), w_hi - w_lo)
            positions = torch.arange(w_lo, w_hi, device=rows.device) * m
            entries = rope(entries, rope.cos_sin(positions)).to(dtype)
        else:
            entries = rows.new_zeros(0, self.head_dim).to(dtype)
        cache.write_state(layer, seq, kind, start, rows)
        return entries

    def pool(self, rows: torch.Tensor, n_entries: int) -> torch.Tensor:
        """rows [(n_entries + overlap) * ratio, width], window-aligned, fp32 -> normed entries [n_entries, head_dim]."""
        m, d = self.ratio, self.head_dim
        if self.overlap:
            w = rows.view(n_entries + 1, m, 4 * d)
            kv = torch.cat([w[:-1, :, :d], w[1:, :, d: 2 * d]], dim=1)  # [E, 2m, d]: Ca of w-1, then Cb of w
            z = torch.cat([w[:-1, :, 2 * d: 3 * d], w[1:, :, 3 * d:]], dim=1)
        else:
            w = rows.view(n_entries, m, 2 * d)
            kv, z = w[..., :d], w[..., d:]
        pooled = (kv * z.softmax(dim=1)).sum(dim=1)
        return self.norm(pooled)
