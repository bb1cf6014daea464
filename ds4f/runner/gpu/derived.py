"""⑤ runner GPU fast path, per-step index tensors: StepMeta + FastCache -> the window rows, block-table rows, RoPE
tables, attention / indexer rows and the first streams every layer of a FastModel forward reads (one launch at
decode: glue.derive -> ds4f.kernels.step_meta)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ds4f.model.args import CSA
from ds4f.runner.gpu import glue
from ds4f.runner.gpu.pools import FastCache, StepMeta

if TYPE_CHECKING:
    from ds4f.runner.gpu.fast_model import FastModel


class Derived:
    """Per-forward index tensors shared by all layers (computed on the device from StepMeta)."""

    win: torch.Tensor  # [T, W] int32 window rows (scratch or ring, -1 = none)
    bt_tok: torch.Tensor  # [T, max_blocks] int64 block table row of each token's sequence
    cs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # rope table -> cos, sin [T, rope/2] at the tokens' positions
    attn_idx: dict[int, torch.Tensor]  # HCA ratio -> [T, W + L] int32; CSA with L <= topk likewise (eager steps: L
    # cut to the entries the step can see, as for slots)
    live: dict[int, torch.Tensor]  # ratio of attn_idx -> [T] int32 W + visible entries: attn_idx[t, live[t]:] = -1
    pvis: dict[int, torch.Tensor]  # ratio of attn_idx -> [T] int32 visible entries (prefix_attn steps only)
    slots: dict[int, torch.Tensor]  # CSA ratio -> [B, L] int32 index-pool rows per sequence (a view of the first
    # L = glue.index_len(meta.max_len, ...) columns: eager steps score only the entries they can see)
    vis32: dict[int, torch.Tensor]  # CSA ratio -> [T] int32 visible entries (t+1)//ratio, clipped to L
    seq32: torch.Tensor  # [T] int32 tok_seq
    ring_rows: dict[int, torch.Tensor]  # ring size R -> [T] int64 carry-ring row each token writes
    win_write: torch.Tensor  # [T] int64 window-ring row each token writes (dummy slot unless in its last W)
    x: torch.Tensor  # [T, hc, D] the tokens' embedding rows in every stream (the first hc step's input)

def derive_step(fm: FastModel, meta: StepMeta, cache: FastCache) -> Derived:
    """The step's Derived tensors for fm's layers (eager steps: indexer and attention rows cut to what they see)."""
    d, a = Derived(), fm.args
    rings = tuple(sorted({r for m in fm.ratios for r in (m, 2 * m)}))
    ents = []
    for m in fm.ratios:
        n_ent = cache.max_entries(m)
        is_csa = any(a.compress_ratio(i) == m and a.layer_type(i) == CSA for i in range(a.num_hidden_layers))
        ents.append((m, n_ent, cache.epb(m), not is_csa or n_ent <= a.index_topk))
    names = list(fm.tables)
    flat = tuple(t for k in names for t in fm.tables[k])
    d.win, d.win_write, ring_rows, d.bt_tok, cs, per, d.seq32, d.x = glue.derive(
        meta.positions, meta.tok_slot, meta.chunk_start, meta.chunk_end, meta.tok_seq, meta.block_table, flat,
        cache.scratch, cache.dummy_slot, cache.comp_base, fm.W, rings, tuple(ents),
        (meta.input_ids, fm.model.embed.weight, fm.hc))
    d.ring_rows = dict(zip(rings, ring_rows))
    d.cs = {k: (cs[2 * n], cs[2 * n + 1]) for n, k in enumerate(names)}
    d.attn_idx, d.slots, d.vis32, d.live, d.pvis = {}, {}, {}, {}, {}
    prefix = fm.prefix_attn and meta.max_len is not None and meta.positions.shape[0] >= fm.prefix_min_t
    for (m, n_ent, _, direct), v in zip(ents, per):
        if direct:
            rows, live = v
            d.attn_idx[m] = rows[:, : fm.W + glue.index_len(meta.max_len, m, n_ent, 0, fm.index_bucket)]
            if prefix:
                n = d.attn_idx[m].shape[1] - fm.W
                d.pvis[m] = ((meta.positions + 1) // m).clamp(max=n).to(torch.int32)
            if fm.attn_live:  # the kernel skips the key splits past W + the visible entries
                d.live[m] = live
        else:  # vis32 <= max_len // m <= the columns kept
            slots, d.vis32[m] = v
            d.slots[m] = slots[:, : glue.index_len(meta.max_len, m, slots.shape[1], a.index_topk,
                                                   fm.index_bucket)]
    return d
