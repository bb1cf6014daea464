"""⑥ model attention (SWA / CSA / HCA): normed x_n [T, D] + AttnBatch (cache) in, attention output [T, D] out."""

from __future__ import annotations

import torch
from torch import nn

from ds4f.model.args import CSA, SWA, ModelArgs
from ds4f.model.cache import AttnBatch
from ds4f.model.compressor import Compressor
from ds4f.model.indexer import Indexer
from ds4f.model.layers import RMSNorm, Rope, rms_normalize
from ds4f.model.linear import Linear

QUERY_TILE = 128  # queries per attention tile: bounds the [tile, H, keys] score and [tile, topk, hd] gather buffers


class Attention(nn.Module):
    """MQA with one shared K=V head, a sliding window, optional compressed entries (all for HCA, indexer top-k for
    CSA), a per-head sink in the softmax denominator, inverse RoPE on the output and a grouped low-rank wo."""

    def __init__(self, args: ModelArgs, layer: int, dtype: torch.dtype):
        super().__init__()
        self.layer, self.kind, self.ratio = layer, args.layer_type(layer), args.compress_ratio(layer)
        self.n_heads, self.head_dim, self.window = args.num_attention_heads, args.head_dim, args.sliding_window
        self.o_groups, self.eps = args.o_groups, args.rms_norm_eps
        d, lf = args.hidden_size, args.linear_format
        self.wq_a = Linear(d, args.q_lora_rank, lf, dtype)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, lf, dtype)
        self.wkv = Linear(d, self.head_dim, lf, dtype)
        self.kv_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.wo_a = Linear(self.n_heads * self.head_dim // self.o_groups, self.o_groups * args.o_lora_rank, lf, dtype)
        self.wo_b = Linear(self.o_groups * args.o_lora_rank, d, lf, dtype)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32), requires_grad=False)
        self.rope = Rope.for_layer(args, layer)
        self.compressor: Compressor | None = None
        self.indexer: Indexer | None = None
        if self.kind != SWA:
            self.compressor = Compressor(args, self.ratio, self.head_dim, overlap=self.kind == CSA, dtype=dtype)
        if self.kind == CSA:
            self.indexer = Indexer(args, self.ratio, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """x [T, D] normed input, positions [T] (sequence b: start_pos[b] + arange(n_b)) -> [T, D]."""
        t, h, hd = x.shape[0], self.n_heads, self.head_dim
        cs = self.rope.cos_sin(positions)
        qr = self.q_norm(self.wq_a(x))
        q = rms_normalize(self.wq_b(qr).view(t, h, hd).float(), self.eps).to(x.dtype)
        q = self.rope(q, cs)
        kv = self.rope(self.kv_norm(self.wkv(x)), cs)  # [T, hd]: K and V
        comp_rows = self.compressor.project(x, positions) if self.compressor is not None else None
        iq = iw = idx_rows = None
        if self.indexer is not None:
            iq, iw = self.indexer.query(qr, x, self.rope, cs)
            idx_rows = self.indexer.compressor.project(x, positions)

        out = torch.empty(t, h, hd, dtype=torch.float32, device=x.device)
        cache = batch.cache
        for b in range(batch.num_seqs):
            sl = batch.seq_slice(b)
            s, n = batch.start_pos[b], sl.stop - sl.start
            if n == 0:
                continue
            # window: earlier rows [lo, s) from the cache, then this chunk's rows
            lo = max(0, s - self.window + 1)
            win = kv[sl]
            if lo < s:
                win = torch.cat([cache.read_window(self.layer, b, lo, s).to(kv.device, kv.dtype), win])
            cache.write_window(self.layer, b, s, kv[sl])
            comp = keys = None
            if self.compressor is not None:
                comp = self._entries(self.compressor, comp_rows[sl], s, b, "attn", "kv", batch, x.dtype)
            if self.indexer is not None:
                keys = self._entries(self.indexer.compressor, idx_rows[sl], s, b, "index", "index", batch, x.dtype)
                keys = keys.float()
            out[sl] = self._attend(q[sl], positions[sl], s, win, lo, comp, keys,
                                   None if iq is None else iq[sl], None if iw is None else iw[sl])

        o = self.rope(out, cs, inverse=True).to(x.dtype)
        g = self.o_groups
        wa = self.wo_a.weight.view(g, -1, self.wo_a.in_features)  # [G, o_lora_rank, H*hd/G]
        z = torch.einsum("tgi,gri->tgr", o.reshape(t, g, -1), wa)
        return self.wo_b(z.reshape(t, -1))

    def _entries(self, comp: Compressor, rows: torch.Tensor, s: int, b: int, state_kind: str, kind: str,
                 batch: AttnBatch, dtype: torch.dtype) -> torch.Tensor:
        """All compressed entries [0, (s+n)//ratio) of one sequence: cached ones, then the ones this chunk closes."""
        cache, w_lo = batch.cache, s // self.ratio
        new = comp.compress(rows, s, self.layer, b, state_kind, cache, self.rope, dtype)
        if new.shape[0]:
            cache.write_compressed(self.layer, b, kind, w_lo, new)
        if w_lo == 0:
            return new
        old = cache.read_compressed(self.layer, b, kind, 0, w_lo).to(new.device, dtype)
        return torch.cat([old, new])

    def _attend(self, q: torch.Tensor, pos: torch.Tensor, s: int, win: torch.Tensor, win_lo: int,
                comp: torch.Tensor | None, keys: torch.Tensor | None, iq: torch.Tensor | None,
                iw: torch.Tensor | None) -> torch.Tensor:
        """One sequence's chunk: q [n, H, hd], pos [n] = s + arange(n), win [L, hd] = K=V rows at positions
        win_lo.., comp [E, hd] compressed entries, keys [E, ihd] fp32 index keys (CSA). Returns [n, H, hd] fp32."""
        n, scale = q.shape[0], self.head_dim**-0.5
        sink = self.attn_sink.float()
        wpos = torch.arange(win_lo, win_lo + win.shape[0], device=q.device)
        hca = comp.float() if comp is not None and self.indexer is None else None
        hca_ids = torch.arange(hca.shape[0], device=q.device) if hca is not None else None
        out = torch.empty(n, self.n_heads, self.head_dim, dtype=torch.float32, device=q.device)
        for i0 in range(0, n, QUERY_TILE):
            i1 = min(n, i0 + QUERY_TILE)
            qt, tp = q[i0:i1].float(), pos[i0:i1]
            # window keys that any query of this tile can see: positions [first - W + 1, last]
            k0 = max(0, s + i0 - self.window + 1 - win_lo)
            k1 = s + i1 - win_lo
            kw, kp = win[k0:k1].float(), wpos[k0:k1]
            logits = [torch.einsum("qhd,kd->qhk", qt, kw) * scale
                      + _mask((kp[None, :] > tp[:, None]) | (kp[None, :] <= tp[:, None] - self.window))[:, None]]
            vals: list[torch.Tensor] = [kw]
            if hca is not None:  # HCA: every complete entry
                logits.append(torch.einsum("qhd,ed->qhe", qt, hca) * scale
                              + _mask(hca_ids[None, :] >= ((tp + 1) // self.ratio)[:, None])[:, None])
                vals.append(hca)
            elif comp is not None and comp.shape[0]:  # CSA: the indexer's top-k
                sel = self.indexer.select(iq[i0:i1], iw[i0:i1], keys, tp)  # [nt, k], -1 = none
                g = comp[sel.clamp(min=0)].float()  # [nt, k, hd]
                logits.append(torch.einsum("qhd,qkd->qhk", qt, g) * scale + _mask(sel < 0)[:, None])
                vals.append(g)
            logits.append(sink.view(1, -1, 1).expand(i1 - i0, -1, 1))
            lg = torch.cat(logits, dim=-1)
            p = torch.softmax(lg - lg.amax(dim=-1, keepdim=True), dim=-1)
            nw = kw.shape[0]
            o = torch.einsum("qhk,kd->qhd", p[..., :nw], kw)
            if len(vals) > 1:
                pc = p[..., nw:-1]
                v = vals[1]
                o = o + (torch.einsum("qhk,kd->qhd", pc, v) if v.dim() == 2 else torch.einsum("qhk,qkd->qhd", pc, v))
            out[i0:i1] = o
        return out


def _mask(bad: torch.Tensor) -> torch.Tensor:
    """Boolean 'not allowed' -> additive fp32 bias (0 / -inf)."""
    return torch.zeros(bad.shape, dtype=torch.float32, device=bad.device).masked_fill(bad, float("-inf"))
