"""⑤ runner GPU fast path, forward: a reference Transformer's weights + FastCache + StepMeta in, streams / logits out.

Batched over every token of the step and free of host syncs (CUDA-graph safe): per layer one set of projections for
all T tokens, window rows through the scratch region + slot rings, compressor entries for the tokens that complete
a window (candidate lists, masked), indexer scores + top-k over each sequence's entries, one sparse_attn over the
flat pool, inverse RoPE, grouped wo_a / wo_b; MoE through one fused_moe call with the shared expert as expert E.

Weights are the reference modules' parameters. Setup changes layout once: each layer's routed experts plus the
shared expert are moved into w13 [E+1, 2I, D] / w2 [E+1, D, I] and the modules' weights become views of those
(no extra memory once set up; one layer's stack is the transient peak). Likewise every projection that reads the
attention input x_n (wq_a, wkv, compressor wkv / wgate, indexer weights_proj and its compressor) is stacked into one
[sum(out), D] matrix per layer: one GEMM instead of up to seven. Extra copies: the router weight in fp32
(E x D x 4 bytes per layer, 4 MiB at Flash width) and the two RoPE cos/sin tables ([max_pos, rope_dim/2] fp32 each).
"""

from __future__ import annotations

import torch

from ds4f.kernels import fused_moe, indexer_scores, sparse_attn, topk_indices
from ds4f.model.args import CSA, SWA
from ds4f.model.compressor import Compressor
from ds4f.model.deepseek_v4 import Block, Transformer
from ds4f.model.layers import Rope
from ds4f.model.linear import Linear
from ds4f.model.mhc import hc_head
from ds4f.runner.gpu import glue
from ds4f.runner.gpu.hc import hc_pre
from ds4f.runner.gpu.pools import FastCache, StepMeta


class _Derived:
    """Per-forward index tensors shared by all layers (computed on the device from StepMeta)."""

    win: torch.Tensor  # [T, W] int32 window rows (scratch or ring, -1 = none)
    bt_tok: torch.Tensor  # [T, max_blocks] int64 block table row of each token's sequence
    cs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # rope table -> cos, sin [T, rope/2] at the tokens' positions
    attn_idx: dict[int, torch.Tensor]  # HCA ratio -> [T, W + L] int32; CSA with L <= topk likewise
    slots: dict[int, torch.Tensor]  # CSA ratio -> [B, L] int32 index-pool rows per sequence
    vis32: dict[int, torch.Tensor]  # CSA ratio -> [T] int32 visible entries (t+1)//ratio, clipped to L
    seq32: torch.Tensor  # [T] int32 tok_seq
    ring_rows: dict[int, torch.Tensor]  # ring size R -> [T] int64 carry-ring row each token writes
    win_write: torch.Tensor  # [T] int64 window-ring row each token writes (dummy slot unless in its last W)


class FastModel:
    def __init__(self, model: Transformer, max_pos: int) -> None:
        self.model, self.args = model, model.args
        a = self.args
        self.device = model.embed.weight.device
        self.dtype = model.embed.weight.dtype
        self.hc, self.W, self.E = a.hc_mult, a.sliding_window, a.n_routed_experts
        self.ratios = sorted({a.compress_ratio(i) for i in range(a.num_hidden_layers)} - {0})
        pos = torch.arange(max_pos, device=self.device)
        rm = Rope.for_layer(a, next((i for i in range(a.num_hidden_layers) if a.layer_type(i) == SWA), 0))
        self.tables = {"main": rm.cos_sin(pos), "compress": Rope.compress(a).cos_sin(pos)}
        del pos
        # -(id + 1) * 1e-30: below 0, above any negative score a bf16 product can give; lower id ranks higher
        n_idx = -(-max_pos // min(self.ratios)) if self.ratios else 0
        self.zero_rank = -(torch.arange(n_idx, device=self.device, dtype=torch.float32) + 1) * 1e-30
        self.gate_w32: list[torch.Tensor] = []
        self.w13: list[torch.Tensor] = []
        self.w2: list[torch.Tensor] = []
        self.w_in: list[torch.Tensor] = []
        self.w_in_split: list[list[int]] = []
        for blk in model.layers:
            self._stack_experts(blk)
            self._stack_inputs(blk)

    def _in_linears(self, blk: Block) -> list[Linear]:
        att = blk.attn
        lins = [att.wq_a, att.wkv]
        if att.compressor is not None:
            lins += [att.compressor.wkv, att.compressor.wgate]
        if att.indexer is not None:
            ic = att.indexer.compressor
            lins += [ic.wkv, ic.wgate, att.indexer.weights_proj]
        return lins

    @torch.no_grad()
    def _stack_inputs(self, blk: Block) -> None:
        lins = self._in_linears(blk)
        sizes = [lin.out_features for lin in lins]
        w = torch.empty(sum(sizes), lins[0].in_features, dtype=self.dtype, device=self.device)
        o = 0
        for lin, n in zip(lins, sizes):
            w[o: o + n].copy_(lin.weight)
            lin.weight.data = w[o: o + n]
            o += n
        self.w_in.append(w)
        self.w_in_split.append(sizes)

    @torch.no_grad()
    def _stack_experts(self, blk: Block) -> None:
        ffn = blk.ffn
        experts = list(ffn.experts) + ([ffn.shared_experts] if ffn.shared_experts is not None else [])
        inter, d = experts[0].w1.out_features, experts[0].w1.in_features
        w13 = torch.empty(len(experts), 2 * inter, d, dtype=self.dtype, device=self.device)
        w2 = torch.empty(len(experts), d, inter, dtype=self.dtype, device=self.device)
        for e, ex in enumerate(experts):
            w13[e, :inter].copy_(ex.w1.weight)
            w13[e, inter:].copy_(ex.w3.weight)
            w2[e].copy_(ex.w2.weight)
            ex.w1.weight.data, ex.w3.weight.data, ex.w2.weight.data = w13[e, :inter], w13[e, inter:], w2[e]
        self.w13.append(w13)
        self.w2.append(w2)
        self.gate_w32.append(ffn.gate.weight.float())

    # ---- per-step index tensors ----
    def _derive(self, meta: StepMeta, cache: FastCache) -> _Derived:
        d = _Derived()
        p, W = meta.positions, self.W
        T = p.shape[0]
        ti = torch.arange(T, device=p.device)
        j = torch.arange(W, device=p.device)
        q = p[:, None] - j[None, :]
        ring = meta.tok_slot[:, None] * W + q % W
        d.win = torch.where(q >= meta.chunk_start[:, None], cache.scratch + ti[:, None] - j[None, :],
                            torch.where(q >= 0, ring, -1)).to(torch.int32)
        keep = p >= meta.chunk_end - W
        d.win_write = torch.where(keep, meta.tok_slot, cache.dummy_slot) * W + p % W
        d.ring_rows = {}
        for m in self.ratios:
            for R in {m, 2 * m}:
                slot = torch.where(p >= meta.chunk_end - R, meta.tok_slot, cache.dummy_slot)
                d.ring_rows[R] = slot * R + p % R
        d.bt_tok = meta.block_table[meta.tok_seq]
        d.cs = {k: (c[p], s[p]) for k, (c, s) in self.tables.items()}
        d.attn_idx, d.slots, d.vis32 = {}, {}, {}
        a = self.args
        for m in self.ratios:
            n_ent, epb = cache.max_entries(m), cache.epb(m)
            w = torch.arange(n_ent, device=p.device)
            vis = (p + 1) // m
            is_csa = any(a.compress_ratio(i) == m and a.layer_type(i) == CSA for i in range(a.num_hidden_layers))
            if not is_csa or n_ent <= a.index_topk:
                rows_tok = d.bt_tok[:, w // epb] * epb + w % epb  # [T, L]
                ent = torch.where(w[None, :] < vis[:, None], cache.comp_base + rows_tok, -1)
                d.attn_idx[m] = torch.cat([d.win, ent.to(torch.int32)], dim=1)
            if is_csa and n_ent > a.index_topk:
                d.slots[m] = (meta.block_table[:, w // epb] * epb + w % epb).to(torch.int32)
                d.vis32[m] = vis.clamp(max=n_ent).to(torch.int32)
                d.seq32 = meta.tok_seq.to(torch.int32)
        return d

    # ---- forward ----
    @torch.no_grad()
    def forward(self, meta: StepMeta, cache: FastCache) -> torch.Tensor:
        """-> streams [T, hc, D] after the last layer."""
        d = self._derive(meta, cache)
        x = self.model.embed(meta.input_ids).unsqueeze(1).expand(-1, self.hc, -1).contiguous()
        for i, blk in enumerate(self.model.layers):
            a = self.args
            c, post, comb = hc_pre(x, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base, a.hc_mult,
                                   a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps)
            y = self._attn(i, blk, glue.rms_w(c, blk.attn_norm.weight, a.rms_norm_eps), meta, cache, d)
            x = glue.hc_post(y, x, post, comb)
            c, post, comb = hc_pre(x, blk.hc_ffn_fn, blk.hc_ffn_scale, blk.hc_ffn_base, a.hc_mult,
                                   a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps)
            y = self._moe(i, blk, glue.rms_w(c, blk.ffn_norm.weight, a.rms_norm_eps), meta.input_ids)
            x = glue.hc_post(y, x, post, comb)
        return x

    @torch.no_grad()
    def logits(self, streams: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """streams [T, hc, D] -> logits [B, vocab] fp32 at each sequence's last token."""
        m, a = self.model, self.args
        h = hc_head(streams[meta.last_tok], m.hc_head_fn, m.hc_head_scale, m.hc_head_base, a.hc_eps, a.rms_norm_eps)
        return m.head(m.norm(h)).float()

    def _attn(self, i: int, blk: Block, xn: torch.Tensor, meta: StepMeta, cache: FastCache,
              d: _Derived) -> torch.Tensor:
        att, a = blk.attn, self.args
        T, H, hd = xn.shape[0], att.n_heads, att.head_dim
        cos, sin = d.cs["main" if att.kind == SWA else "compress"]
        y = torch.nn.functional.linear(xn, self.w_in[i])
        parts = y.split(self.w_in_split[i], dim=1)
        o2 = sum(self.w_in_split[i][:2])  # [wkv | wgate] of a compressor are adjacent columns: slice, no copy
        qr = glue.rms_w(parts[0], att.q_norm.weight, a.rms_norm_eps)
        q, kv = glue.q_kv(att.wq_b(qr), parts[1], att.kv_norm.weight, cos, sin, H, att.eps)  # kv [T, hd]: K and V
        pool = cache.kv[i]
        pool[cache.scratch: cache.scratch + T] = kv
        if att.kind == SWA:
            idx = d.win
        else:
            m = att.ratio
            n2 = 2 * att.compressor.wkv.out_features
            self._compress(att.compressor, y[:, o2: o2 + n2], meta, cache, d, cache.state[i, "attn"],
                           cache.ring(i), pool, cache.comp_base, m)
            if att.indexer is not None:
                n4 = 2 * att.indexer.compressor.wkv.out_features
                self._compress(att.indexer.compressor, y[:, o2 + n2: o2 + n2 + n4], meta, cache, d,
                               cache.state[i, "index"], cache.ring(i), cache.index[i], 0, m)
            if m in d.attn_idx:
                idx = d.attn_idx[m]
            else:  # CSA beyond top-k entries: indexer scores + top-k, entry ids -> pool rows
                ix = att.indexer
                iq = glue.rope(ix.wq_b(qr).view(T, ix.n_heads, ix.head_dim), cos, sin, False)
                iw = parts[6].float() * ix.n_heads**-0.5
                sc = indexer_scores(iq, iw, cache.index[i], d.slots[m], d.seq32, d.vis32[m])
                # exact-zero scores (every head's ReLU at 0) tie; the reference keeps the lowest ids among them
                sc = torch.where(sc == 0, self.zero_rank[: sc.shape[1]], sc)
                sel = topk_indices(sc, a.index_topk)  # [T, k] entry ids, -1 = none
                idx = glue.topk_rows(sel, d.bt_tok, d.win, cache.comp_base, cache.epb(m))
        o = sparse_attn(q, pool, idx, att.attn_sink, hd**-0.5)
        pool.index_copy_(0, d.win_write, kv)  # after attention: ring rows of this chunk's last W positions
        wa = att.wo_a.weight.view(att.o_groups, -1, att.wo_a.in_features)  # [G, o_lora_rank, H*hd/G]
        return att.wo_b(glue.attn_out(o, cos, sin, wa))

    def _compress(self, comp: Compressor, kvz: torch.Tensor, meta: StepMeta, cache: FastCache, d: _Derived,
                  ring: torch.Tensor, R: int, dest: torch.Tensor, dest_base: int, m: int) -> None:
        """State rows of every token -> entries for the tokens that complete a window (written to dest), then the
        carry ring. Candidates are meta.ent_tok[m]; a candidate that completes nothing writes the dummy block."""
        c, s = self.tables["compress"]
        rows, ent, dst = glue.compress(kvz, comp.ape, ring, comp.norm.weight, meta.ent_tok[m], meta.positions,
                                       meta.chunk_start, meta.tok_slot, d.bt_tok, c, s, m, R, comp.overlap,
                                       self.args.rms_norm_eps, dest_base, cache.dummy_block, cache.epb(m))
        dest.index_copy_(0, dst, ent)
        ring.index_copy_(0, d.ring_rows[R], rows)

    def _moe(self, i: int, blk: Block, xn: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Router (fp32 scores, hash or biased top-k) -> one fused_moe over the picks + the shared expert (id E)."""
        ffn, gate = blk.ffn, blk.ffn.gate
        hashed = gate.tid2eid[ids] if gate.hash else ids[:, None]
        bias = gate.bias if gate.bias is not None else self.gate_w32[i][:, 0]
        eid, w = glue.route(xn, self.gate_w32[i], bias, hashed, gate.topk, gate.hash, gate.norm_topk, gate.scaling,
                            self.E if ffn.shared_experts is not None else -1)
        lim = self.args.swiglu_limit if self.args.swiglu_limit > 0 else float("inf")
        return fused_moe(xn, self.w13[i], self.w2[i], eid, w, lim)
