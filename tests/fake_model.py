"""Test double of the ⑥ model: Transformer's forward / compute_logits signature, reading and writing an AttnCache the
way V4 attention does (window rows, compressor carry rows, compressed + index entries), with cheap math, so engine
tests exercise the paged cache at full speed. Any misplaced cache row changes its hidden states."""

from __future__ import annotations

import torch

from ds4f.model.args import CSA, HCA, ModelArgs
from ds4f.model.cache import AttnBatch


class FakeModel(torch.nn.Module):
    def __init__(self, args: ModelArgs, vocab: int = 4096, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.args, self.vocab, self.dtype = args, vocab, dtype
        d = args.head_dim
        self.emb = torch.randn(vocab, d, generator=g, dtype=torch.float32).to(dtype)
        self.w = [torch.randn(d, d, generator=g).div(d**0.5).to(dtype) for _ in range(args.num_hidden_layers)]
        self.forward_calls = 0

    def _compress(self, cache, layer: int, b: int, kind: str, width: int, dim: int, m: int, overlap: bool,
                  kv: torch.Tensor, s: int) -> torch.Tensor:
        """Mirror of Compressor.compress with mean pooling: returns the entries visible to each chunk token summed."""
        n, ckind = kv.shape[0], "kv" if kind == "attn" else kind
        rows = kv.float().repeat(1, -(-width // kv.shape[1]))[:, :width]  # [n, width] fp32 state rows
        w_lo, w_hi = s // m, (s + n) // m
        if w_hi > w_lo:
            lo = max((w_lo - 1) * m if overlap else w_lo * m, 0)
            parts = [cache.read_state(layer, b, kind, lo, s)] if lo < s else []
            allrows = torch.cat([*parts, rows[: w_hi * m - s]])
            first = lo  # position of allrows[0]
            new = torch.stack([allrows[w * m - first: (w + 1) * m - first, :dim].mean(0) for w in range(w_lo, w_hi)])
            cache.write_compressed(layer, b, ckind, w_lo, new.to(self.dtype))
        cache.write_state(layer, b, kind, s, rows)
        if w_hi == 0:
            return kv.new_zeros(n, dim)
        ent = cache.read_compressed(layer, b, ckind, 0, w_hi).float()  # entries 0..w_hi-1 (all complete by the end)
        csum = torch.cat([ent.new_zeros(1, dim), ent.cumsum(0)])
        vis = (torch.arange(s, s + n) + 1) // m  # entries visible to each token
        return csum[vis].to(kv.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        self.forward_calls += 1
        a, cache = self.args, batch.cache
        out = []
        for b in range(batch.num_seqs):
            sl, s = batch.seq_slice(b), batch.start_pos[b]
            h = self.emb[input_ids[sl]]
            n = h.shape[0]
            for layer in range(a.num_hidden_layers):
                kv = torch.tanh(h @ self.w[layer])
                lo = max(0, s - (a.sliding_window - 1))
                win = torch.cat([cache.read_window(layer, b, lo, s), kv]) if lo < s else kv
                cache.write_window(layer, b, s, kv)
                csum = torch.cat([win.new_zeros(1, win.shape[1]), win.float().cumsum(0)])
                t = torch.arange(n) + (s - lo)  # row of each token inside win
                start = (t - (a.sliding_window - 1)).clamp_min(0)
                h = h + ((csum[t + 1] - csum[start]) / (t + 1 - start)[:, None]).to(h.dtype)
                kind, m = a.layer_type(layer), a.compress_ratio(layer)
                if kind in (CSA, HCA):
                    csa = kind == CSA
                    h = h + 0.1 * self._compress(cache, layer, b, "attn", 2 * (2 if csa else 1) * a.head_dim,
                                                 a.head_dim, m, csa, kv, s)
                    if csa:
                        ix = self._compress(cache, layer, b, "index", 4 * a.index_head_dim, a.index_head_dim, m,
                                            True, kv, s)
                        h[:, : a.index_head_dim] += 0.1 * ix
            out.append(h)
        return torch.cat(out).unsqueeze(1)  # [T, 1, d] stands in for [T, hc, D]

    def compute_logits(self, streams: torch.Tensor) -> torch.Tensor:
        return (streams[:, 0].float() @ self.emb.float().T)


class GreedySampler:
    """Argmax; stands in for ds4f.sample.Sampler where a test only needs greedy."""

    def __call__(self, logits: torch.Tensor, reqs: list) -> object:
        class _Out:
            token_ids = logits.argmax(-1).tolist()
            logprobs = None

        return _Out()
