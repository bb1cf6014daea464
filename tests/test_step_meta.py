"""The one-launch per-step index tensors (ds4f.kernels.step_meta.derive_fused) under TRITON_INTERPRET=1 vs the torch
reference glue.derive_ref, on StepMetas of a tiny FastCache (window 8, blocks of 16 tokens, three sequences):
prefill chunks and mixed steps (tokens before / after their chunk start, windows crossing position 0 and ring wraps,
entry boundaries), decode steps at window / entry / block edges, graph decode buffers with padding rows; direct and
indexed entry kinds (one, two and three kinds, rings of 4 sizes, RoPE tables of unequal widths); glue.derive's
dispatch (kernel up to 16 tokens, reference above); the embedding rows into the hc streams folded into the
launch. Plus a build for sm_80 / sm_90 without a GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from interp import run_interpreted

pytest.importorskip("triton")


def same(got: Any, want: Any, where: str = "") -> None:
    """Nested tuples of tensors: same structure, shapes, dtypes, values."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.shape == want.shape and got.dtype == want.dtype, (where, got.shape, want.shape, got.dtype,
                                                                     want.dtype)
        assert torch.equal(got, want), (where, got, want)
        return
    assert isinstance(got, tuple) and isinstance(want, tuple) and len(got) == len(want), (where, type(got))
    for i, (g, w) in enumerate(zip(got, want)):
        same(g, w, f"{where}[{i}]")


def _cache(max_tokens: int = 16):
    from ds4f.model.args import ModelArgs, tiny_config
    from ds4f.runner.gpu.pools import FastCache

    a = ModelArgs.from_hf(tiny_config())  # window 8
    return FastCache(a, max_seqs=3, num_blocks=24, block_size=16, max_ctx=128, max_tokens=max_tokens, device="cpu")


# steps of (slot, start position, new tokens); sequence slot s is at the position its previous step left
STEPS = [
    [(0, 0, 5), (1, 0, 11)],  # prefill chunks from 0: windows reach before position 0
    [(0, 5, 7), (1, 11, 6), (2, 0, 3)],  # 16 tokens: rows before the chunk start come from the rings
    [(0, 12, 1), (1, 17, 1), (2, 3, 1)],  # decode: 13 (window wrap), 18, 4 (an entry of ratio 4 completes at 3)
    [(2, 4, 12)],  # to 16: a block edge, entries of 4 and 16 complete
    [(0, 13, 3), (2, 16, 1)],  # 15 completes ratio 16's first entry
    [(1, 18, 14), (0, 16, 1)],
    [(1, 32, 1)],
    [(2, 17, 10), (1, 33, 1), (0, 17, 2)],
]


def _ents(cache, kinds: list[tuple[int, bool]]) -> tuple[tuple[int, int, int, bool], ...]:
    return tuple((m, cache.max_entries(m), cache.epb(m), direct) for m, direct in kinds)


def _cases() -> list[tuple[Any, tuple]]:
    """(StepMeta, tables) over STEPS plus late decode positions and padded decode buffers."""
    cache = _cache()
    g = torch.Generator().manual_seed(0)
    tabs = (tuple(torch.randn(160, 8, generator=g) for _ in range(4)),
            (torch.randn(160, 5, generator=g), torch.randn(160, 3, generator=g)[:, :3],
             torch.randn(160, 12, generator=g)[:, 2:9]))  # unequal widths, a row stride past the width
    metas = [cache.build_meta([(s, p, list(range(n))) for s, p, n in step], [4, 16]) for step in STEPS]
    metas.append(cache.build_meta([(0, 96, [1]), (1, 127, [2]), (2, 111, [3])], [4, 16]))
    buf = cache.decode_buffers(4, [4, 16])
    cache.fill_decode(buf, [(1, 64, 5), (0, 79, 6)])  # two live rows, two padding rows (dummy slot / block)
    metas.append(buf)
    return [(m, tabs[i % 2]) for i, m in enumerate(metas)]


def check_step_meta() -> None:
    from ds4f.kernels import step_meta
    from ds4f.runner.gpu import glue

    cache = _cache()
    W = cache.W
    rings = (4, 8, 16, 32)
    fused, calls = step_meta.derive_fused, []

    def counted(*a: Any, **k: Any) -> tuple:
        calls.append(1)
        return fused(*a, **k)

    step_meta.derive_fused = counted  # glue.derive must route every step here (<= 16 tokens, interpreter)
    kinds = [[(4, False), (16, True)], [(4, True), (16, True)], [(16, False)], [(4, False), (8, True), (16, False)]]
    n = 0
    for meta, tabs in _cases():
        args = (meta.positions, meta.tok_slot, meta.chunk_start, meta.chunk_end, meta.tok_seq, meta.block_table)
        for ki, kind in enumerate(kinds):
            ents = _ents(cache, kind)
            rg = rings[: 1 + ki % 4]
            tail = (tabs, cache.scratch, cache.dummy_slot, cache.comp_base, W, rg, ents)
            assert step_meta.supported(*args, tabs, rg, ents)
            want = glue.derive_ref(*args, *tail)
            for blk in (1024, 16):  # one program per entry kind; several, the last one masked
                same(step_meta.derive_fused(*args, *tail, block=blk), want, f"meta {n} kinds {kind} block {blk}")
            same(glue.derive(*args, *tail), want)  # the dispatch (kernel at <= 16 tokens)
        # the embedding rows into hc streams: one chunk (masked), several chunks (the last one masked)
        for d, hc in ((40, 3), (2 * step_meta.EMB_BLOCK + 8, 1)):
            emb = torch.randn(50, d + 3).bfloat16()[:, 1: d + 1]  # a row stride past the width
            ids = meta.input_ids
            *got, x = glue.derive(*args, *tail, (ids, emb, hc))
            same(tuple(got), want)
            same(x, emb[ids].unsqueeze(1).expand(-1, hc, -1).contiguous(), "embed")
        n += 1
        assert len(calls) == n * (3 * len(kinds) + 2), len(calls)
    # no rings, no tables, no entry kinds
    meta, _ = _cases()[2]
    args = (meta.positions, meta.tok_slot, meta.chunk_start, meta.chunk_end, meta.tok_seq, meta.block_table)
    tail = ((), cache.scratch, cache.dummy_slot, cache.comp_base, W, (), ())
    same(step_meta.derive_fused(*args, *tail), glue.derive_ref(*args, *tail))
    print(f"step meta ok {n}")


def test_step_meta_interpreted() -> None:
    assert f"step meta ok {len(STEPS) + 2}" in run_interpreted("test_step_meta", "check_step_meta")


def test_dispatch_cpu() -> None:
    """Without the interpreter on CPU, and above 16 tokens, glue.derive is derive_ref."""
    from ds4f.runner.gpu import glue

    cache = _cache(max_tokens=17)
    meta = cache.build_meta([(0, 0, list(range(17)))], [4, 16])
    args = (meta.positions, meta.tok_slot, meta.chunk_start, meta.chunk_end, meta.tok_seq, meta.block_table,
            (torch.randn(160, 8),), cache.scratch, cache.dummy_slot, cache.comp_base, cache.W, (4, 8),
            _ents(cache, [(4, False), (16, True)]))
    same(glue.derive(*args), glue.derive_ref(*args))
    emb = torch.randn(20, 6)
    *out, x = glue.derive(*args, (meta.input_ids, emb, 2))
    same(tuple(out), glue.derive_ref(*args))
    same(x, emb[meta.input_ids].unsqueeze(1).expand(-1, 2, -1).contiguous())


@pytest.mark.parametrize("arch", [80, 90])
def test_step_meta_builds(arch: int) -> None:
    from test_kernels_build import build

    from ds4f.kernels import step_meta as sm

    ptrs = ("p_ptr", "slot_ptr", "c0_ptr", "c1_ptr", "seq_ptr", "tbl_ptr", "ww_ptr", "ring_ptr", "bt_ptr")
    types = {n: "*i64" for n in ptrs}
    types |= {n: "*fp32" for n in ("tb0", "tb1", "tb2", "tb3", "cs0", "cs1", "cs2", "cs3")}
    types |= {n: "*i32" for n in ("win_ptr", "e0_ptr", "e1_ptr", "e2_ptr", "cnt_ptr", "seq32_ptr")}
    types |= dict(ids_ptr="*i64", emb_ptr="*bf16", x_ptr="*bf16")
    # the 8-layer V4-Flash-width decode step: window 128, rings 4 / 8 / 128 / 256, four RoPE tables, CSA indexed
    k = build(sm._step_meta, types, dict(NR=4, NTAB=4, NE=2, D0=False, D1=True, D2=False, BLOCK=sm.BLOCK,
                                         BLOCK_W=128, BLOCK_C=32, BLOCK_B=64, EMB=True,
                                         BLOCK_D=sm.EMB_BLOCK), arch)
    assert "st.global" in k["ptx"]
    build(sm._step_meta, types, dict(NR=6, NTAB=1, NE=3, D0=True, D1=False, D2=True, BLOCK=sm.BLOCK, BLOCK_W=32,
                                     BLOCK_C=16, BLOCK_B=1024, EMB=False, BLOCK_D=sm.EMB_BLOCK), arch)
