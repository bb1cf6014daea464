"""⑥ kernels, per-step index tensors: StepMeta fields (positions, tok_slot, chunk_start, chunk_end, tok_seq,
block_table) + the RoPE tables in, every output of ds4f.runner.gpu.glue.derive_ref out (same values, dtypes, shapes),
in ONE Triton launch (decode steps: the compiled reference is ~12 small launches, ~22 us of a graph replay).

Programs [0, T): one per token: its window row [W] int32, window-ring write row, carry-ring write row per ring size
(int64), block-table row [max_blocks], a row of each RoPE table at its position, the visible-entry count of each
(ratio, n_entries, epb, direct) and tok_seq as int32. Then, per entry kind, BLOCK-element programs over its flat
rows: direct -> attention rows [T, W + n] int32 (window, then comp_base + pool row of each visible entry, -1 past
them); indexed -> index-pool rows [B, n] int32 of every block-table row. Optionally (embed) EMB_BLOCK-element
programs copy each token's embedding row into its hc streams [T, hc, D] (the forward's first step, so the step
starts with one launch instead of ~14). Outputs are allocated here with sizes from shapes only (CUDA-graph capture
safe; no host syncs, no scratch state). Limits: MAX_RINGS ring sizes, MAX_TABLES
tables, MAX_ENTS entry kinds, int64 metadata, unit last-dim strides (`supported`); glue falls back to derive_ref.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: glue.derive_ref
    triton = None

MAX_RINGS, MAX_TABLES, MAX_ENTS = 6, 4, 3
BLOCK = 1024  # elements per entry-row program
PAD = 16  # row stride (elements) of the stacked ring / count outputs: each [T] view starts 64 B aligned

EMB_BLOCK = 1024  # embedding elements per program
Ents = tuple[tuple[int, int, int, bool], ...]
Embed = tuple[torch.Tensor, torch.Tensor, int]  # input_ids [T] int64, embedding weight [V, D], streams hc


def supported(p: torch.Tensor, slot: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, seq: torch.Tensor,
              table: torch.Tensor, tables: tuple[torch.Tensor, ...], rings: tuple[int, ...], ents: Ents,
              embed: Embed | None = None) -> bool:
    """Whether derive_fused serves these inputs (else the torch reference)."""
    ints = (p, slot, c0, c1, seq, table) + ((embed[0],) if embed is not None else ())
    if embed is not None and not (embed[1].dim() == 2 and embed[1].stride(1) == 1 and embed[2] >= 1
                                  and embed[0].shape == p.shape and embed[1].device == p.device):
        return False
    return (triton is not None and len(rings) <= MAX_RINGS and len(tables) <= MAX_TABLES and len(ents) <= MAX_ENTS
            and all(x.dtype == torch.int64 and x.stride(-1) == 1 for x in ints)
            and all(x.dim() == 1 for x in ints if x is not table) and table.dim() == 2
            and all(tb.dim() == 2 and tb.stride(1) == 1 for tb in tables)
            and all(x.device == p.device for x in (*ints, *tables)))


if triton is not None:

    @triton.jit
    def _win_val(p, s, c0, t, j, W, scratch):
        """Window row j of a token at position p (slot s, chunk start c0, step index t): this forward's scratch row,
        else its window-ring row, -1 before position 0 (the value at q < 0 is discarded, so C-style % is fine)."""
        q = p - j
        return tl.where(q >= c0, scratch + t - j, tl.where(q >= 0, s * W + q % W, -1))

    @triton.jit
    def _ring(ring_ptr, k, r, p, s, c1, dummy, t, TP):
        tl.store(ring_ptr + k * TP + t, tl.where(p >= c1 - r, s, dummy) * r + p % r)

    @triton.jit
    def _count(cnt_ptr, e, m, n, W, p, t, TP, DIRECT: tl.constexpr):
        vis = tl.minimum((p + 1) // m, n)
        if DIRECT:
            vis = vis + W
        tl.store(cnt_ptr + e * TP + t, vis.to(tl.int32))

    @triton.jit
    def _cs(tb_ptr, ts, tw, cs_ptr, p, t, BLOCK_C: tl.constexpr):
        c = tl.arange(0, BLOCK_C)
        tl.store(cs_ptr + t * tw + c, tl.load(tb_ptr + p * ts + c, mask=c < tw), mask=c < tw)

    @triton.jit
    def _ent(q, out_ptr, p_ptr, slot_ptr, c0_ptr, seq_ptr, tbl_ptr, ts, T, B, W, scratch, comp_base, m, n, epb,
             DIRECT: tl.constexpr, BLOCK: tl.constexpr):
        """Elements [q * BLOCK, + BLOCK) of one entry kind's flat output."""
        i = q.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        if DIRECT:  # [T, W + n]: window rows, then the visible entries' pool rows
            L = W + n
            ok = i < T * L
            t = i // L
            k = i - t * L
            p = tl.load(p_ptr + t, mask=ok, other=0)
            s = tl.load(slot_ptr + t, mask=ok, other=0)
            c0 = tl.load(c0_ptr + t, mask=ok, other=0)
            sq = tl.load(seq_ptr + t, mask=ok, other=0)
            w = tl.maximum(k - W, 0)
            live = ok & (k >= W) & (w < (p + 1) // m)
            blk = tl.load(tbl_ptr + sq * ts + w // epb, mask=live, other=0)
            ent = tl.where(live, comp_base + blk * epb + w % epb, -1)
            val = tl.where(k < W, _win_val(p, s, c0, t, k, W, scratch), ent)
        else:  # [B, n]: every block-table row's index-pool rows
            ok = i < B * n
            b = i // n
            w = i - b * n
            blk = tl.load(tbl_ptr + b * ts + w // epb, mask=ok, other=0)
            val = blk * epb + w % epb
        tl.store(out_ptr + i, val.to(tl.int32), mask=ok)

    @triton.jit
    def _emb(q, ids_ptr, emb_ptr, es, x_ptr, D, HC, NCH, BLOCK_D: tl.constexpr):
        """Chunk q % NCH of token q // NCH: its embedding row chunk, copied into each of the HC streams."""
        t = q // NCH
        d = (q - t * NCH) * BLOCK_D + tl.arange(0, BLOCK_D)
        row = tl.load(emb_ptr + tl.load(ids_ptr + t) * es + d, mask=d < D)
        for h in range(HC):
            tl.store(x_ptr + (t * HC + h) * D + d, row, mask=d < D)

    @triton.jit
    def _step_meta(p_ptr, slot_ptr, c0_ptr, c1_ptr, seq_ptr, tbl_ptr, tb0, tb1, tb2, tb3,
                   win_ptr, ww_ptr, ring_ptr, bt_ptr, cs0, cs1, cs2, cs3, e0_ptr, e1_ptr, e2_ptr, cnt_ptr, seq32_ptr,
                   ids_ptr, emb_ptr, x_ptr, es, D, HC, NCH,
                   T, B, MB, ts, W, scratch, dummy, comp_base, TP,
                   r0, r1, r2, r3, r4, r5, tw0, tw1, tw2, tw3, tst0, tst1, tst2, tst3,
                   m0, n0, k0, m1, n1, k1, m2, n2, k2, s1, s2, s3,
                   NR: tl.constexpr, NTAB: tl.constexpr, NE: tl.constexpr,
                   D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
                   EMB: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        if pid < T:  # token t = pid
            t = pid
            p = tl.load(p_ptr + t)
            s = tl.load(slot_ptr + t)
            c0 = tl.load(c0_ptr + t)
            c1 = tl.load(c1_ptr + t)
            sq = tl.load(seq_ptr + t)
            j = tl.arange(0, BLOCK_W)
            tl.store(win_ptr + t * W + j, _win_val(p, s, c0, t, j, W, scratch).to(tl.int32), mask=j < W)
            tl.store(ww_ptr + t, tl.where(p >= c1 - W, s, dummy) * W + p % W)
            if NR > 0:
                _ring(ring_ptr, 0, r0, p, s, c1, dummy, t, TP)
            if NR > 1:
                _ring(ring_ptr, 1, r1, p, s, c1, dummy, t, TP)
            if NR > 2:
                _ring(ring_ptr, 2, r2, p, s, c1, dummy, t, TP)
            if NR > 3:
                _ring(ring_ptr, 3, r3, p, s, c1, dummy, t, TP)
            if NR > 4:
                _ring(ring_ptr, 4, r4, p, s, c1, dummy, t, TP)
            if NR > 5:
                _ring(ring_ptr, 5, r5, p, s, c1, dummy, t, TP)
            for b0 in range(0, MB, BLOCK_B):
                b = b0 + tl.arange(0, BLOCK_B)
                tl.store(bt_ptr + t * MB + b, tl.load(tbl_ptr + sq * ts + b, mask=b < MB), mask=b < MB)
            if NTAB > 0:
                _cs(tb0, tst0, tw0, cs0, p, t, BLOCK_C)
            if NTAB > 1:
                _cs(tb1, tst1, tw1, cs1, p, t, BLOCK_C)
            if NTAB > 2:
                _cs(tb2, tst2, tw2, cs2, p, t, BLOCK_C)
            if NTAB > 3:
                _cs(tb3, tst3, tw3, cs3, p, t, BLOCK_C)
            if NE > 0:
                _count(cnt_ptr, 0, m0, n0, W, p, t, TP, D0)
            if NE > 1:
                _count(cnt_ptr, 1, m1, n1, W, p, t, TP, D1)
            if NE > 2:
                _count(cnt_ptr, 2, m2, n2, W, p, t, TP, D2)
            tl.store(seq32_ptr + t, sq.to(tl.int32))
        elif pid < s3:
            if NE > 0:
                if pid < s1:
                    _ent(pid - T, e0_ptr, p_ptr, slot_ptr, c0_ptr, seq_ptr, tbl_ptr, ts, T, B, W, scratch, comp_base,
                         m0, n0, k0, D0, BLOCK)
                else:
                    if NE > 1:
                        if pid < s2:
                            _ent(pid - s1, e1_ptr, p_ptr, slot_ptr, c0_ptr, seq_ptr, tbl_ptr, ts, T, B, W, scratch,
                                 comp_base, m1, n1, k1, D1, BLOCK)
                        else:
                            if NE > 2:
                                _ent(pid - s2, e2_ptr, p_ptr, slot_ptr, c0_ptr, seq_ptr, tbl_ptr, ts, T, B, W,
                                     scratch, comp_base, m2, n2, k2, D2, BLOCK)
        else:
            if EMB:
                _emb(pid - s3, ids_ptr, emb_ptr, es, x_ptr, D, HC, NCH, BLOCK_D)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def derive_fused(p: torch.Tensor, slot: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, seq: torch.Tensor,
                 table: torch.Tensor, tables: tuple[torch.Tensor, ...], scratch: int, dummy_slot: int, comp_base: int,
                 W: int, rings: tuple[int, ...], ents: Ents, embed: Embed | None = None,
                 block: int = BLOCK) -> tuple[Any, ...]:
    """= glue.derive_ref's outputs (see there) from one launch; inputs must pass `supported`. embed = (input_ids
    [T], weight [V, D], hc): one more output, the streams x [T, hc, D] = weight[input_ids] in every stream."""
    t, (b, mb), dev = p.shape[0], table.shape, p.device
    tp = -(-max(t, 1) // PAD) * PAD
    win = torch.empty(t, W, dtype=torch.int32, device=dev)
    ww = torch.empty(t, dtype=torch.int64, device=dev)
    ring = torch.empty(max(len(rings), 1), tp, dtype=torch.int64, device=dev)
    bt = torch.empty(t, mb, dtype=table.dtype, device=dev)
    cs = tuple(torch.empty(t, tb.shape[1], dtype=tb.dtype, device=dev) for tb in tables)
    cnt = torch.empty(max(len(ents), 1), tp, dtype=torch.int32, device=dev)
    seq32 = torch.empty(t, dtype=torch.int32, device=dev)
    mains = [torch.empty(t, W + n, dtype=torch.int32, device=dev) if direct
             else torch.empty(b, n, dtype=torch.int32, device=dev) for _, n, _, direct in ents]
    ids, emb, hc = embed if embed is not None else (p, win, 0)
    d = emb.shape[1] if embed is not None else 0
    x = torch.empty(t, hc, d, dtype=emb.dtype, device=dev) if embed is not None else win
    starts, nprog = [], t  # first program of each entry kind, then of the embedding chunks
    for main in mains:
        starts.append(nprog)
        nprog += triton.cdiv(main.numel(), block)
    starts += [nprog] * (MAX_ENTS + 1 - len(starts))
    nch = triton.cdiv(d, EMB_BLOCK) if embed is not None else 0
    nprog += t * nch
    if nprog:
        rg = list(rings) + [1] * (MAX_RINGS - len(rings))
        tbs = list(tables) + [p] * (MAX_TABLES - len(tables))
        css = list(cs) + [win] * (MAX_TABLES - len(cs))
        tws = [tb.shape[1] if i < len(tables) else 0 for i, tb in enumerate(tbs)]
        tst = [tb.stride(0) if i < len(tables) else 0 for i, tb in enumerate(tbs)]
        ent_args = [v for m, n, epb, _ in ents for v in (m, n, epb)] + [1] * 3 * (MAX_ENTS - len(ents))
        dirs = [bool(di) for *_, di in ents] + [False] * (MAX_ENTS - len(ents))
        outs = mains + [win] * (MAX_ENTS - len(mains))
        _step_meta[(nprog,)](p, slot, c0, c1, seq, table, *tbs, win, ww, ring, bt, *css, *outs, cnt, seq32,
                             ids, emb, x, emb.stride(0), d, hc, nch,
                             t, b, mb, table.stride(0), W, scratch, dummy_slot, comp_base, tp, *rg, *tws, *tst,
                             *ent_args, *starts[1:], NR=len(rings), NTAB=len(tables), NE=len(ents),
                             D0=dirs[0], D1=dirs[1], D2=dirs[2], BLOCK=block, BLOCK_W=_pow2(W),
                             BLOCK_C=_pow2(max(tws + [1])), BLOCK_B=min(_pow2(max(mb, 1)), 1024),
                             EMB=embed is not None, BLOCK_D=EMB_BLOCK, num_warps=4)
    per = tuple((main, cnt[e, :t]) for e, main in enumerate(mains))
    out = (win, ww, tuple(ring[k, :t] for k in range(len(rings))), bt, cs, per, seq32)
    return out + (x,) if embed is not None else out
