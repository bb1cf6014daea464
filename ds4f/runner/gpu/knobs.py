"""⑤ runner GPU fast path: its environment switches (read once per FastModel), each beside what was measured for it."""

from __future__ import annotations

import os


class FastKnobs:
    """FastModel's switches; every DS4F_* variable here has the default the measurements below chose."""

    def read_knobs(self) -> None:
        # HCA attention stops at each token's visible entries (short contexts in 1M pools); DS4F_ATTN_LIVE=0: all
        self.attn_live = os.environ.get("DS4F_ATTN_LIVE", "1") == "1"
        # TP prefill chunks of >= sp_index_min_t tokens split the indexer by tokens (128K TTFT at TP=2: 22.7 vs 29.4 s)
        self.sp_indexer = os.environ.get("DS4F_SP_INDEXER", "1") == "1"
        # from 2048 tokens: >= 1024 rows per rank, so torch.topk ranks both the split and the whole (same order)
        self.sp_index_min_t = int(os.environ.get("DS4F_SP_INDEXER_MIN_T", "2048"))
        # DS4F_INDEX_FP8=1 (fp8 index keys): indexer q per head in e4m3, scores by the fp8 MMA; opt-in until measured
        self.index_fp8 = os.environ.get("DS4F_INDEX_FP8", "0") == "1"
        # the indexer query's RoPE, weight scale and e4m3 rows in one launch (ds4f.kernels.index_q; H200 8-layer 8K
        # step 1.925 vs 1.929 ms, 3 launches fewer per CSA layer); DS4F_INDEX_Q=0: rope_ + scale (+ quant_heads_fp8)
        self.index_q = os.environ.get("DS4F_INDEX_Q", "1") == "1"
        # the top-k kernels write the attention rows (window + pool rows) themselves: the one launch of short pools
        # (ds4f.kernels.indexer.topk_pool_rows), the small kernel + the gather launch's fused pick of long ones
        # (topk_pool_rows_long); DS4F_TOPK_ROWS=0: ids, then glue.topk_rows
        self.topk_rows = os.environ.get("DS4F_TOPK_ROWS", "1") == "1"
        # eager steps of >= prefix_min_t tokens: all-entries layers through prefix_attn; DS4F_PREFIX_ATTN=0: off
        self.prefix_attn = os.environ.get("DS4F_PREFIX_ATTN", "1") == "1"
        self.prefix_min_t = int(os.environ.get("DS4F_PREFIX_MIN_T", "256"))
        # decode steps (<= overlap_max_t tokens) fork side streams (see the module docstring); DS4F_OVERLAP=0: none
        self.overlap = os.environ.get("DS4F_OVERLAP", "1") == "1"
        self.overlap_max_t = 16
        # decode: the compressor kernel stores state rows (+ bf16 pool entries); DS4F_COMPRESS_IN_PLACE=0: launches
        self.compress_in_place = os.environ.get("DS4F_COMPRESS_IN_PLACE", "1") == "1"
        # ... and quantizes its entries into fp8 pools (the attention's and the indexer's keys) itself, instead of a
        # store launch after it on the chains the attention and the indexer's scores wait on; DS4F_COMPRESS_FP8=0
        self.compress_fp8 = os.environ.get("DS4F_COMPRESS_FP8", "1") == "1"
        # decode: q_norm inside the wq_b GEMVs (packed.linear_norm); DS4F_Q_NORM_GEMV=0: a norm launch first
        self.q_norm_gemv = os.environ.get("DS4F_Q_NORM_GEMV", "1") == "1"
        # decode over fp8 pools: the kv norm + RoPE and its scratch / window stores in one launch (ds4f.kernels.
        # kv_store, bit for bit the three launches; H200 12-layer TP=2 rank step with the MXFP4 SUB decode, replay
        # 1.548 vs 1.565 ms at one token, 2.198 vs 2.258 at four); DS4F_KV_FUSED=0: the three launches
        self.kv_fused = os.environ.get("DS4F_KV_FUSED", "1") == "1"
        # decode: q's per-head RMSNorm + RoPE in the attention kernel's prologue instead of a launch of its own
        # (sparse_attn q_norm). Full model, TP=2, two H200s, session 15 (b376d8f, runs 4 and 5): replay 5.636 vs
        # 5.691 ms at b1 (174.8 vs 173.2 tok/s), 8.154 vs 8.177 at b4, 6.558 vs 6.590 after 1M;
        # DS4F_ATTN_Q_NORM=0: the separate launch
        self.attn_q_norm = os.environ.get("DS4F_ATTN_Q_NORM", "1") == "1"
        # decode over packed inputs: the dense (bf16) input run and the compressors after it on a third side stream
        # (see _attn); DS4F_DENSE_SIDE=0: that run on main after the FP8 one, the compressors in the kv / index chains
        self.dense_side = os.environ.get("DS4F_DENSE_SIDE", "1") == "1"
        # decode, CSA layers: the indexer's q GEMV (norm + GEMV) on main before wq_b, so the index chain (q ->
        # scores -> top-k, the attention's critical path: top-k ended a median 16.0 us after wq_b at b1 in session
        # 24) is not queued behind wq_b's 16 MB, which then streams beside the chain's latency-bound kernels;
        # DS4F_IDX_Q_FIRST=0: the q GEMV on the indexer's stream beside wq_b
        self.idx_q_first = os.environ.get("DS4F_IDX_Q_FIRST", "1") == "1"
        # ... and the query's RoPE / weights / e4m3 launch (index_q) waits for the dense GEMV's weights_proj columns
        # only, not for the index compressor after it on that stream (the scores do); DS4F_IDX_PREP_EARLY=0: both
        self.idx_prep_early = os.environ.get("DS4F_IDX_PREP_EARLY", "1") == "1"
        # TP: the shared expert's output added inside the MoE sublayer's all-reduce (Comm.all_reduce_add) instead of
        # in the routed down kernel, which then need not wait for the shared expert's side chain (session 21's TP=2
        # timelines: it ends ~2.7 us after the routed up kernel at batch 1, every layer). Same bits. Full model, TP=2,
        # two H200s, session 22 call 1 (with DS4F_ROUTER_PREWAIT): replay 4.671 vs 4.799 ms at b1, 6.876 vs 6.922 at
        # b4 (session 21's run of record); DS4F_SHARED_AT_AR=0: the add in the down kernel
        self.shared_at_ar = os.environ.get("DS4F_SHARED_AT_AR", "1") == "1"
        # decode: the routed up kernel's x operands (moe_mxfp4_a8's _a8_expand) built on the indexer's side stream
        # beside the router, not between the router and the up kernel; DS4F_EXPAND_SIDE=0: on the chain
        self.expand_side = os.environ.get("DS4F_EXPAND_SIDE", "1") == "1"
        # side streams at high priority: their latency-bound chains (in CSA layers the critical path) get SMs before
        # the next CTAs of the main stream's GEMV waves; DS4F_SIDE_PRIORITY=0: off
        self.side_priority = -1 if os.environ.get("DS4F_SIDE_PRIORITY", "1") == "1" else 0
