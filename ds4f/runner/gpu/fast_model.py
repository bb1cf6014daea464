"""⑤ runner GPU fast path, forward: a reference Transformer's weights + FastCache + StepMeta in, streams / logits out.

Batched over every token of the step and free of host syncs (CUDA-graph safe): per layer one set of projections for
all T tokens, window rows through the scratch region + slot rings, compressor entries for the tokens that complete
a window (candidate lists, masked), indexer scores + top-k over each sequence's entries, one sparse_attn over the
flat pool (inverse RoPE in its epilogue), grouped wo_a / wo_b; MoE through one fused_moe call with the shared expert
as expert E (bf16) or fused_moe_mxfp4 on the packed experts. Between sublayers one mHC step (ds4f.kernels.mhc); q / kv
norm + RoPE in one kernel each; a decode step's router in one kernel (ds4f.kernels.router) and its per-step index
tensors + embedding in one (glue.derive -> ds4f.kernels.step_meta).
Decode steps (<= 16 tokens, CUDA) run each layer's kv / compressor chain and its indexer chain on two side streams
beside the q projection (q_norm inside its GEMV: packed.linear_norm; the indexer's q GEMV before it on main), a packed
checkpoint's bf16 input run (the compressors' wkv / wgate, weights_proj) and the index compressor on a third beside
the FP8 wq_a | wkv run (the compressors quantize their entries into fp8 pools in their own launch), the packed
FP8 shared expert on the first beside the router and routed up GEMM, the routed up kernel's x operands on the second
beside the router, and each mHC step's Sinkhorn on a fourth (joined before the next mHC step reads comb), all at high
priority; under TP a sublayer's all-reduce runs inside the next mHC launch where Comm.hc_reducer allows
(_reduce_hc); bf16 projections of <= 16 tokens go through the Triton GEMV (ds4f.kernels.gemv), FP8 ones through
fp8_gemm's decode GEMV.
An eager step (StepMeta.max_len known on the host) scores only the first glue.index_len index entries of each CSA
layer: at 1M context a chunk early in the prompt sees a few thousand of 262144; decode graphs keep every column.

Weights are the reference modules' parameters. Setup stacks each layer's routed + shared experts into w13 [E+1, 2I, D]
/ w2 [E+1, D, I] and every projection reading the attention input x_n (wq_a, wkv, compressor wkv / wgate, indexer
weights_proj and its compressor) into one [sum(out), D] matrix, the modules' weights becoming views (no extra memory
past one stack's transient). Extra copies: the router weight in fp32 (4 MiB per layer at Flash width) and the RoPE
cos/sin tables. A model loaded packed-only (load_model(keep_dequantized=False)) runs on the checkpoint's tensors
(ds4f.runner.gpu.packed): FP8 projections through fp8_linear / fp8_grouped_linear (the stacked input GEMM in runs),
MXFP4 routed experts stacked packed, the shared expert on its packed FP8 weights.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4f.kernels import fused_moe, gemv, topk_indices
from ds4f.kernels.compress import fp8_fits
from ds4f.kernels.index_q import index_q, quant_heads_fp8
from ds4f.kernels.indexer import decode_hist_buffer, topk_pool_rows, topk_pool_rows_long
from ds4f.kernels.mhc import decode_kernel, hc_step
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4
from ds4f.kernels.rope import norm_rope, norm_rope2, rope_
from ds4f.kernels.router import MAX_TOKENS as ROUTER_MAX_TOKENS
from ds4f.kernels.router import route
from ds4f.kernels.sparse_attn import use_triton
from ds4f.model.args import SWA
from ds4f.model.compressor import Compressor
from ds4f.model.deepseek_v4 import Block, Transformer
from ds4f.model.layers import Rope
from ds4f.runner.gpu import glue, packed
from ds4f.runner.gpu.derived import Derived as _Derived
from ds4f.runner.gpu.derived import derive_step
from ds4f.runner.gpu.knobs import FastKnobs
from ds4f.runner.gpu.pools import FastCache, Fp8Keys, Fp8KV, StepMeta


class FastModel(FastKnobs):
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
        self.index_bucket = glue.INDEX_BUCKET  # indexer column counts of eager steps are multiples of this
        self.read_knobs()
        self._sides: list[torch.cuda.Stream] = []
        self._sink: torch.cuda.Stream | None = None  # the mHC Sinkhorn's stream (decode)
        self._sink_pending = False
        self.gate_w32: list[torch.Tensor] = []
        self.w13: list[torch.Tensor | None] = []  # None: the layer's experts run packed (self.mx)
        self.w2: list[torch.Tensor | None] = []
        self.mx: list[packed.MxMoE | None] = []
        self.w_in: list[torch.Tensor | packed.InProj] = []
        self.w_in_split: list[list[int]] = []
        for blk in model.layers:  # the modules' weights become views of these stacks (packed.stack_*)
            self.gate_w32.append(blk.ffn.gate.weight.float())
            mx, w13, w2 = packed.stack_experts(blk.ffn, self.dtype, self.device)
            self.mx.append(mx)
            self.w13.append(w13)
            self.w2.append(w2)
            w_in, sizes = packed.stack_inputs(blk, self.dtype, self.device)
            self.w_in.append(w_in)
            self.w_in_split.append(sizes)

    def _derive(self, meta: StepMeta, cache: FastCache) -> _Derived:
        return derive_step(self, meta, cache)


    # ---- forward ----
    @torch.no_grad()
    def forward(self, meta: StepMeta, cache: FastCache) -> torch.Tensor:
        """-> streams [T, hc, D] after the last layer."""
        d = self._derive(meta, cache)
        self._sink_pending = False
        layers = self.model.layers
        x = d.x  # = embed(input_ids) in every stream (glue.derive: folded into its launch at decode)
        x, xn, post, comb = self._hc(None, x, None, None, layers[0], "attn")
        comm = getattr(self.model, "tp_comm", None)  # TP: the sublayers' partial sums, as the reference's hooks
        for i, blk in enumerate(layers):
            y = self._attn(i, blk, xn, meta, cache, d)
            x, xn, post, comb = self._reduce_hc(comm, y, None, x, post, comb, blk, "ffn")
            y = self._moe(i, blk, xn, meta.input_ids, comm is not None and self.shared_at_ar)
            sh = None
            if isinstance(y, tuple):  # the routed pick sum (fp32) and the shared expert's output, added in the AR
                y, sh, ready = y
                if ready is not None:
                    torch.cuda.current_stream().wait_stream(ready)
            x, xn, post, comb = self._reduce_hc(comm, y, sh, x, post, comb,
                                                layers[i + 1] if i + 1 < len(layers) else None, "attn")
        return x

    def _reduce_hc(self, comm: Any, y: torch.Tensor, extra: torch.Tensor | None, x: torch.Tensor,
                   post: torch.Tensor | None, comb: torch.Tensor | None, nxt: Block | None,
                   kind: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """A sublayer's output y (TP: this rank's partial sum; extra: y is fp32 and the term is bf16(y + extra))
        summed over the ranks, then _hc. The sum runs inside the decode mHC launch where Comm.hc_reducer gives an
        instance (DS4F_HC_AR), else as its own all-reduce first."""
        ar = None
        if comm is not None and nxt is not None and decode_kernel(x, getattr(nxt, f"hc_{kind}_fn")):
            ar = comm.hc_reducer(y if extra is None else extra)
        if comm is not None and ar is None:
            y, extra = (comm.all_reduce(y) if extra is None else comm.all_reduce_add(y, extra)), None
        return self._hc(y, x, post, comb, nxt, kind, ar, extra)

    def _hc(self, y: torch.Tensor | None, x: torch.Tensor, post: torch.Tensor | None, comb: torch.Tensor | None,
            nxt: Block | None, kind: str, ar: Any = None, extra: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """hc_post of the sublayer that gave y (none: x as is), then the hc_pre + RMSNorm of the next sublayer
        (nxt's `kind`) -> streams, its normed input, post, comb (None after the last sublayer). ar / extra: y is
        this rank's partial sum, all-reduced inside the launch (_reduce_hc)."""
        a = self.args
        if self._sink_pending:  # the previous step's comb (Sinkhorn on the side stream) is read now
            torch.cuda.current_stream().wait_stream(self._sink)
            self._sink_pending = False
        if nxt is None:
            return hc_step(y, x, post, comb, None, None, None, None, a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps,
                           a.rms_norm_eps)
        norm = nxt.attn_norm if kind == "attn" else nxt.ffn_norm
        fn = getattr(nxt, f"hc_{kind}_fn")
        side = None
        if self.overlap and x.shape[0] <= self.overlap_max_t and decode_kernel(x, fn):
            # comb is first read by the next mHC step: its Sinkhorn runs beside the sublayer in between
            side = self._sink = self._sink or torch.cuda.Stream(device=self.device, priority=self.side_priority)
            self._sink_pending = True
        return hc_step(y, x, post, comb, fn, getattr(nxt, f"hc_{kind}_scale"), getattr(nxt, f"hc_{kind}_base"),
                       norm.weight, a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps, a.rms_norm_eps,
                       sinkhorn_stream=side, ar=ar, extra=extra)

    @torch.no_grad()
    def logits(self, streams: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """streams [T, hc, D] -> logits [B, vocab] fp32 at each sequence's last token."""
        m, a = self.model, self.args
        h = glue.head_in(streams, meta.last_tok, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, a.hc_eps,
                         a.rms_norm_eps, m.norm.weight, m.norm.eps)
        return m.head(h).float()

    def _attn(self, i: int, blk: Block, xn: torch.Tensor, meta: StepMeta, cache: FastCache,
              d: _Derived) -> torch.Tensor:
        att, a, ix = blk.attn, self.args, blk.attn.indexer
        T, H, hd = xn.shape[0], att.n_heads, att.head_dim
        cos, sin = d.cs["main" if att.kind == SWA else "compress"]
        w_in = self.w_in[i]
        sides = self._side_streams(T)
        # decode over packed inputs: the bf16 compressor / weights_proj run on a stream of its own beside the FP8
        # wq_a | wkv run (the compressors' chains start from it; the q paths from the FP8 run)
        dense = (sides[2] if sides is not None and self.dense_side and isinstance(w_in, packed.InProj)
                 and w_in.mixed else None)
        y = packed.Cols([gemv.linear(xn, w_in)]) if isinstance(w_in, torch.Tensor) else w_in.cols(xn, dense)
        parts = y.split(self.w_in_split[i])
        o2 = sum(self.w_in_split[i][:2])  # [wkv | wgate] of a compressor are adjacent columns: slice, no copy
        n2 = 2 * att.compressor.wkv.out_features if att.kind != SWA else 0
        qr = None if sides is not None and self.q_norm_gemv else glue.rms_w(parts[0], att.q_norm.weight,
                                                                              a.rms_norm_eps)
        pool = cache.kv[i]
        select = ix is not None and att.ratio not in d.attn_idx  # CSA beyond top-k entries: scores + top-k

        def kv_store(kv: torch.Tensor | None = None) -> torch.Tensor | None:
            """K=V row (normed + roped unless given) to the scratch rows -> kv (None: the fused launch, decode)."""
            fused = kv is None and meta.one_per_seq and self.kv_fused and cache.put_kv_fused(
                i, parts[1], att.kv_norm.weight, cos, sin, att.eps, d.win_write)  # norm, RoPE, both stores
            if not fused:
                if kv is None:
                    kv = norm_rope(parts[1], att.kv_norm.weight, cos, sin, att.eps)  # [T, hd]: K and V
                cache.put_scratch(i, kv)
                if meta.one_per_seq:  # the window-ring row of position p held p - W, which no window reads now
                    cache.put(pool, d.win_write, kv)
            return kv

        def attn_compress() -> None:
            if att.kind != SWA:
                self._compress(att.compressor, y.cols(o2, o2 + n2), meta, cache, d, cache.state[i, "attn"],
                               cache.ring(i), pool, cache.comp_base, att.ratio)

        def index_compress() -> None:
            n4 = 2 * ix.compressor.wkv.out_features
            self._compress(ix.compressor, y.cols(o2 + n2, o2 + n2 + n4), meta, cache, d, cache.state[i, "index"],
                           cache.ring(i), cache.index[i], 0, att.ratio)

        def index_q_raw() -> torch.Tensor:
            # the q norm inside the CUDA-core GEMV with DS4F_FP8_GEMV_CC_NORM=1 (measured slower, off), else its
            # own launch (fused into the MMA GEMV, which then runs unsplit: +17 us per CSA layer at 8K)
            if qr is None and packed.norm_in_gemv(ix.wq_b, parts[0]):
                qi = packed.linear_norm(ix.wq_b, parts[0], att.q_norm.weight, a.rms_norm_eps)
            else:
                qi = packed.linear(ix.wq_b, qr if qr is not None else glue.rms_w(parts[0], att.q_norm.weight,
                                                                                 a.rms_norm_eps))
            return qi.view(T, ix.n_heads, ix.head_dim)

        def index_prep(iq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            """Indexer q (RoPE, head weights from weights_proj's columns) -> (q, weights, top-k histogram)."""
            fp8 = self.index_fp8 and isinstance(cache.index[i], Fp8Keys)  # e4m3 q over e4m3 keys: the fp8 MMA
            # DS4F_INDEXER_HIST (one-token calls by default): the indexer counts the top-k's first radix digit into
            # this buffer (None where that does not apply), which index_q's launch zeroes
            hist = None if self._sp(T) else decode_hist_buffer(iq, d.slots[att.ratio].shape[1], a.index_topk,
                                                                zeroed=not self.index_q)
            if self.index_q:  # RoPE, the head weights' scale and the e4m3 rows in one launch
                iq, iw = index_q(iq, parts[6], cos, sin, ix.n_heads**-0.5, fp8, zero=hist)
            else:
                iq, iw = rope_(iq, cos, sin), glue.scale_f32(parts[6], ix.n_heads**-0.5)
                if fp8:
                    iq, qs = quant_heads_fp8(iq)
                    iw = iw * qs
            return iq, iw, hist

        fold = False  # DS4F_ATTN_Q_NORM: q raw, normed and rotated by the attention kernel
        idx: torch.Tensor | None = None
        if sides is None:  # q's per-head RMSNorm + RoPE and kv's weighted one in one launch
            assert qr is not None
            q, kv0 = norm_rope2(packed.linear(att.wq_b, qr).view(T, H, hd), parts[1], att.kv_norm.weight, cos, sin,
                                att.eps)
            kv = kv_store(kv0)
            attn_compress()
            if ix is not None:
                index_compress()
                idx = self._select(i, att.ratio, d, cache, *index_prep(index_q_raw())) if select else None
        else:  # decode: the latency-bound chains on streams of their own beside the bandwidth-bound wq_b GEMM:
            # kv: stores, then (after the dense run) the attention compressor; indexer: its q GEMM, then (after the
            # index compressor's entries, on the dense stream or its own) scores + top-k. Memory: a side stream's
            # tensors are read on main only after the joins below, and its next allocations come after the next
            # fork (which follows this layer's attention).
            main = torch.cuda.current_stream()
            s_kv, s_ix = sides[0], sides[1]
            s_kv.wait_stream(main)
            with torch.cuda.stream(s_kv):
                kv = kv_store()
                if dense is not None:
                    s_kv.wait_stream(dense)  # the dense GEMV only: enqueued before the index compressor below
                attn_compress()
            if ix is not None:
                gemv_done = dense.record_event() if dense is not None else None  # weights_proj's columns
                if dense is not None:
                    with torch.cuda.stream(dense):
                        index_compress()
                iq = index_q_raw() if select and self.idx_q_first else None  # on main: alive until the join
                s_ix.wait_stream(main)
                with torch.cuda.stream(s_ix):
                    if dense is None:
                        index_compress()
                    if select:
                        iq = iq if iq is not None else index_q_raw()
                        if dense is not None and self.idx_prep_early:  # q's prep reads the dense GEMV's
                            s_ix.wait_event(gemv_done)  # weights_proj columns only
                        elif dense is not None:
                            s_ix.wait_stream(dense)
                        prep = index_prep(iq)
                        if dense is not None:
                            s_ix.wait_stream(dense)  # the scores read the index compressor's entries
                        idx = self._select(i, att.ratio, d, cache, *prep)
            qb = (packed.linear_norm(att.wq_b, parts[0], att.q_norm.weight, a.rms_norm_eps) if qr is None
                  else packed.linear(att.wq_b, qr)).view(T, H, hd)
            fold = self.attn_q_norm and not (att.kind != SWA and att.ratio in d.pvis)  # the attend() below
            q = qb if fold else norm_rope(qb, None, cos, sin, att.eps)
            for st in [s_kv] + ([s_ix] if ix is not None else []) + ([dense] if dense is not None else []):
                main.wait_stream(st)
        if idx is None:
            idx = d.win if att.kind == SWA else d.attn_idx[att.ratio]
        if att.kind != SWA and att.ratio in d.pvis:
            o = rope_(cache.attend_prefix(i, q, d.win, meta.block_table, d.seq32, d.pvis[att.ratio],
                                          d.attn_idx[att.ratio].shape[1] - self.W, att.attn_sink, hd**-0.5),
                      cos, sin, inverse=True)
        else:  # the inverse RoPE inside the kernel that writes o
            live = d.live.get(att.ratio) if att.kind != SWA else None  # set for attn_idx ratios (DS4F_ATTN_LIVE)
            o = cache.attend(i, q, idx, att.attn_sink, hd**-0.5, live, inv_rope=(cos, sin),
                             q_norm=att.eps if fold else None)
        if not meta.one_per_seq:  # after attention: ring rows of this chunk's last W positions
            cache.put(pool, d.win_write, kv)
        o = packed.grouped_out(att.wo_a, o, att.o_groups)  # [T, G*o_lora_rank]
        return packed.linear(att.wo_b, o)

    def _side_streams(self, T: int) -> list[torch.cuda.Stream] | None:
        """The streams the kv / compressor chain, the indexer chain and the dense input run of a decode step (T <=
        overlap_max_t tokens, CUDA) run on beside the q projection; None: one stream (prefill chunks, CPU,
        DS4F_OVERLAP=0)."""
        if not (self.overlap and self.device.type == "cuda" and 0 < T <= self.overlap_max_t):
            return None
        if not self._sides:
            self._sides = [torch.cuda.Stream(device=self.device, priority=self.side_priority) for _ in range(3)]
        return self._sides

    def _sp(self, T: int) -> bool:
        """Whether a call of T tokens splits the indexer by tokens across TP ranks (DS4F_SP_INDEXER)."""
        comm = getattr(self.model, "tp_comm", None)
        return self.sp_indexer and comm is not None and comm.world > 1 and self.sp_index_min_t <= T

    def _select(self, i: int, m: int, d: _Derived, cache: FastCache, iq: torch.Tensor, iw: torch.Tensor,
                hist: torch.Tensor | None) -> torch.Tensor:
        """Indexer scores + top-k -> attention rows [T, W + k] (window rows, then the picks' pool rows). Under TP
        with DS4F_SP_INDEXER=1 and a chunk of at least sp_index_min_t tokens, each rank scores and ranks its own 1/N
        of the tokens (the keys are on every rank) and one all-gather of the [T/N, k] picks gives every rank the
        same [T, k]: the indexer's cost at long context (T x L scores per CSA layer) is split instead of
        replicated."""
        T, k = iq.shape[0], self.args.index_topk
        comm = getattr(self.model, "tp_comm", None)
        lo, hi = 0, T
        sp = self._sp(T)
        if sp:
            per = -(-T // comm.world)
            lo, hi = min(T, comm.rank * per), min(T, (comm.rank + 1) * per)
        vis = d.vis32[m][lo:hi]
        q, w = iq[lo:hi], iw[lo:hi]
        sc = cache.index_scores(i, q, w, d.slots[m], d.seq32[lo:hi], vis, hist)
        rows = (d.bt_tok, d.win, cache.comp_base, cache.epb(m))
        if not sp and self.topk_rows:
            out = topk_pool_rows(sc, k, vis, *rows) if hist is None else None
            out = out if out is not None else topk_pool_rows_long(sc, k, vis, hist, *rows)
            if out is not None:
                return out
        sel = topk_indices(sc, k, valid_len=vis, hist_buf=hist)  # [T, k] entry ids, -1 = none
        if sp:
            part = torch.full((per, k), -1, dtype=sel.dtype, device=sel.device)
            part[: hi - lo] = sel
            # all_gather_last concatenates along the last dim: gather [k, per] shards, back to [N * per, k] rows
            sel = comm.all_gather_last(part.t(), comm.world * per).t()[:T].contiguous()
        return glue.topk_rows(sel, *rows)

    def _compress(self, comp: Compressor, kvz: torch.Tensor, meta: StepMeta, cache: FastCache, d: _Derived,
                  ring: torch.Tensor, R: int, dest: torch.Tensor, dest_base: int, m: int) -> None:
        """State rows of every token -> entries for the tokens that complete a window (written to dest), then the
        carry ring. Candidates are meta.ent_tok[m]; a candidate that completes nothing writes the dummy block."""
        c, s = self.tables["compress"]
        # one token per sequence: the state rows go straight to the ring in the same launch; a plain (bf16) pool
        # takes the entries in the same launch too (fp8 pools quantize through cache.put)
        in_place = meta.one_per_seq and self.compress_in_place
        plain = in_place and cache.plain_store and isinstance(dest, torch.Tensor) and dest.dtype == kvz.dtype
        fp8 = (in_place and self.compress_fp8 and cache.fused_quant is not False and kvz.dtype == torch.bfloat16
               and isinstance(dest, (Fp8KV, Fp8Keys)) and fp8_fits(dest.parts()))
        rows, ent, dst = glue.compress(kvz, comp.ape, ring, comp.norm.weight, meta.ent_tok[m], meta.positions,
                                       meta.chunk_start, meta.tok_slot, d.bt_tok, c, s, m, R, comp.overlap,
                                       self.args.rms_norm_eps, dest_base, cache.dummy_block, cache.epb(m),
                                       d.ring_rows[R] if in_place else None, dest if plain else None,
                                       dest.parts() if fp8 else None)
        if ent is not None:
            cache.put(dest, dst, ent)
        if rows is not None:
            ring.index_copy_(0, d.ring_rows[R], rows)

    def _moe(self, i: int, blk: Block, xn: torch.Tensor, ids: torch.Tensor,
             defer: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.cuda.Stream | None]:
        """Router (fp32 scores, hash or biased top-k) -> one fused_moe over the picks + the shared expert (id E), or
        fused_moe_mxfp4 on the packed experts (shared expert passed beside them). defer (TP, DS4F_SHARED_AT_AR=1):
        where the MXFP4 decode kernels take it, (routed pick sum fp32, shared expert's output, its stream) for the
        all-reduce to add, so the routed down kernel does not wait for the shared expert's side chain."""
        ffn, gate, mx = blk.ffn, blk.ffn.gate, self.mx[i]
        shared = self.E if ffn.shared_experts is not None and mx is None else -1
        lim = self.args.swiglu_limit if self.args.swiglu_limit > 0 else float("inf")
        sh = ready = x_side = None  # decode: the packed shared expert on a side stream beside the router and up GEMM
        sides = self._side_streams(xn.shape[0])
        if mx is not None and sides is not None and self.expand_side:  # the up kernel's x operands: another one
            fork = torch.cuda.Event()
            fork.record()
            x_side = (sides[1], fork)
        if mx is not None and mx.shared_fp8 is not None:
            ready = (sides or [None])[0]
            if ready is not None:
                ready.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(ready):  # None: the current stream
                sh = packed.shared_fp8_out(mx.shared_fp8, xn, lim)
        if xn.shape[0] <= ROUTER_MAX_TOKENS and use_triton(xn):  # decode: one Triton launch
            eid, w = route(xn, gate.weight, gate.bias, gate.tid2eid if gate.hash else None, ids, gate.topk,
                           gate.norm_topk, gate.scaling, shared)
        else:
            hashed = gate.tid2eid[ids] if gate.hash else ids[:, None]
            bias = gate.bias if gate.bias is not None else self.gate_w32[i][:, 0]
            eid, w = glue.route(xn, self.gate_w32[i], bias, hashed, gate.topk, gate.hash, gate.norm_topk,
                                gate.scaling, shared)
        if mx is not None:  # shared_ready: joined before the first kernel that reads sh
            y = fused_moe_mxfp4(xn, mx.w13_q, mx.w13_s, mx.w2_q, mx.w2_s, eid, w, lim, mx.shared, shared_out=sh,
                                shared_ready=ready, defer_shared=defer, x_side=x_side)
            return (y, sh, ready) if y.dtype == torch.float32 else y  # fp32: deferred, sh is the caller's
        w13, w2 = self.w13[i], self.w2[i]
        assert w13 is not None and w2 is not None
        return fused_moe(xn, w13, w2, eid, w, lim)
