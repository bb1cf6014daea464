"""⑥ prefix attention (all-entries layers in eager prefill steps): the Triton kernel under the interpreter against
sparse_attn_ref over the same window + entry lists, and FastModel's prefix path against its per-token sparse_attn
path (logits of a chunked, multi-sequence prefill and the decode after it)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.prefix_attn import dense_entries, prefix_attn_ref
from ds4f.kernels.ref import sparse_attn_ref
from ds4f.model.args import HCA, ModelArgs, tiny_config
from ds4f.model.deepseek_v4 import Transformer, init_random_
from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache

BLOCK = 32


def _case(g: torch.Generator, h: int, d: int, fp8: bool) -> tuple:
    """3 sequences of 7, 1 and 12 tokens (table rows 2, 0, 1); entries 16 per sequence; window 6 rows per token."""
    lens, rows_of = (7, 1, 12), (2, 0, 1)
    T, L, Wn, n_pool, epb = sum(lens), 16, 6, 200, 4
    seq = torch.cat([torch.full((n,), r, dtype=torch.int32) for n, r in zip(lens, rows_of)])
    vis = torch.randint(0, L + 1, (T,), generator=g, dtype=torch.int32)
    vis[0], vis[5] = 0, L
    win = torch.randint(0, 60, (T, Wn), generator=g, dtype=torch.int32)
    win[torch.rand(T, Wn, generator=g) < 0.3] = -1
    table = torch.randperm(30, generator=g)[: 3 * (L // epb)].view(3, L // epb)  # entries at rows >= 64 + 4 * block
    x = torch.randn(n_pool, d, generator=g)
    pool = quantize_kv_rows(x, 16) if fp8 else x.bfloat16()
    ent = dense_entries(pool, table, 64, epb, L)
    q = torch.randn(T, h, d, generator=g).bfloat16()
    sink = torch.randn(h, generator=g)
    return q, ent, seq, vis, win, pool, sink, table, epb


def check_prefix_attn() -> None:
    from ds4f.kernels.prefix_attn import prefix_attn
    from ds4f.kernels.sparse_attn import use_triton

    g = torch.Generator().manual_seed(0)
    for h, d, fp8, bm in ((3, 64, False, 16), (4, 128, True, 16), (8, 64, True, 32)):
        q, ent, seq, vis, win, pool, sink, *_ = _case(g, h, d, fp8)
        assert use_triton(q)
        want = prefix_attn_ref(q, ent, seq, vis, win, pool, sink, d**-0.5).float()
        got = prefix_attn(q, ent, seq, vis, win, pool, sink, d**-0.5, block_m=bm, block_n=16, num_stages=1)
        torch.testing.assert_close(got.float(), want, atol=1.5e-2, rtol=1e-2)
        print("prefix attn", h, d, "fp8" if fp8 else "bf16", "matches")


@pytest.mark.parametrize("fp8", [False, True])
def test_ref_is_the_sparse_softmax(fp8: bool) -> None:
    # the reference itself against sparse_attn_ref over explicit pool-row lists (window rows, then entry rows)
    g = torch.Generator().manual_seed(3)
    q, ent, seq, vis, win, pool, sink, table, epb = _case(g, 4, 64, fp8)
    L = ent.shape[1]
    k = torch.arange(L)
    erow = 64 + table[seq.long()][:, k // epb] * epb + k % epb  # [T, L] pool rows
    idx = torch.cat([win, torch.where(k[None, :] < vis[:, None].long(), erow, -1).int()], dim=1)
    kv = dequantize_kv_rows(*pool) if fp8 else pool
    want = sparse_attn_ref(q, kv, idx, sink, 0.125)
    assert torch.equal(prefix_attn_ref(q, ent, seq, vis, win, pool, sink, 0.125), want)


def test_prefix_attn_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    out = run_interpreted("test_prefix_attn", "check_prefix_attn")
    assert out.count("matches") == 3


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8"])
@torch.no_grad()
def test_fast_model_prefix_path_equals_sparse_path(kv_dtype: str) -> None:
    args = ModelArgs.from_hf(tiny_config())
    assert any(args.layer_type(i) == HCA for i in range(args.num_hidden_layers))
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=0)
    max_ctx = 512
    fms = {k: FastModel(model, max_pos=max_ctx + BLOCK) for k in ("prefix", "sparse")}
    fms["prefix"].prefix_min_t, fms["sparse"].prefix_attn = 8, False
    caches = {k: FastCache(args, max_seqs=4, num_blocks=2 * (max_ctx // BLOCK), block_size=BLOCK, max_ctx=max_ctx,
                           max_tokens=256, device="cpu", kv_dtype=kv_dtype) for k in fms}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab_size, (n,), generator=g).tolist() for n in (300, 45)]
    steps = [[(0, 0, prompts[0][:100]), (2, 0, prompts[1])], [(0, 100, prompts[0][100:230])],
             [(0, 230, prompts[0][230:])]]
    used: list[int] = []
    orig = FastCache.attend_prefix

    def spy(self: FastCache, layer: int, *a: object, **kw: object) -> torch.Tensor:
        used.append(layer)
        return orig(self, layer, *a, **kw)  # type: ignore[arg-type]

    FastCache.attend_prefix = spy  # type: ignore[method-assign]
    try:
        out: dict[str, list[torch.Tensor]] = {k: [] for k in fms}
        for n_step, st in enumerate(steps + [None] * 2):
            if st is None:  # decode both sequences (below prefix_min_t: the sparse path in both models)
                lg = out["sparse"][-1]
                st = [(0, 300 + n_step - 3, [int(lg[0].argmax())]), (2, 45 + n_step - 3, [int(lg[-1].argmax())])]
            for k, fm in fms.items():
                meta = caches[k].build_meta(st, fm.ratios)
                out[k].append(fm.logits(fm.forward(meta, caches[k]), meta))
    finally:
        FastCache.attend_prefix = orig  # type: ignore[method-assign]
    n_hca = sum(1 for i in range(args.num_hidden_layers) if args.layer_type(i) == HCA)
    assert len(used) == 3 * n_hca  # the three prefill steps, prefix model only
    for a, b in zip(out["prefix"], out["sparse"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fp8", [False, True])
def test_dense_entries_in_row_chunks(monkeypatch: pytest.MonkeyPatch, fp8: bool) -> None:
    # chunked dequantization (a bounded transient) gives the rows a one-shot gather gives
    from ds4f.kernels import prefix_attn as pa

    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 128, generator=g)
    pool = quantize_kv_rows(x, 64) if fp8 else x.bfloat16()
    table = torch.randint(0, 20, (3, 10), generator=g)
    monkeypatch.setattr(pa, "DEQUANT_ROWS", 7)
    got = dense_entries(pool, table, 40, 4, 37)
    w = torch.arange(37)
    rows = (40 + table[:, w // 4] * 4 + w % 4).reshape(-1)
    want = dequantize_kv_rows(pool[0][rows], pool[1][rows], pool[2][rows]) if fp8 else pool[rows]
    assert got.shape == (3, 37, 128) and torch.equal(got.reshape(-1, 128), want)
