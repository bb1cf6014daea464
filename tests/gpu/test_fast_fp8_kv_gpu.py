"""⑤ GPU fast path with an fp8 KV cache on CUDA: sparse_attn over fp8_ds_mla split rows vs its reference (both e4m3
decodes, decode and prefill shapes, inside a CUDA graph), FastModel over an fp8 FastCache vs the same model over bf16
pools holding the fp8 values, and vs the reference engine's fp8 path (eager and graph-captured decode)."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.kernels.fp8 import dequantize_kv_rows, quantize_kv_rows
from ds4f.kernels.ref import sparse_attn_ref
from ds4f.kernels.sparse_attn import sparse_attn
from ds4f.model.args import tiny_config
from ds4f.runner.gpu.check import mid_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_fast_fp8_kv import (
    FP8,
    ThreeLaunchKVCache,
    check_fused_stores,
    check_vs_reference,
    no_flip_config,
    rel_errors,
    run_steps,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]


def _case(T: int, H: int, hd: int, rope: int, K: int, N: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, hd, device="cuda", generator=g)  # unit-RMS rows like the normed K=V rows
    x[:, -rope:] *= 3.0
    nope, exp, rp = quantize_kv_rows(x, rope)
    q = torch.randn(T, H, hd, device="cuda", generator=g).bfloat16()
    idx = torch.randint(0, N, (T, K), device="cuda", generator=g, dtype=torch.int32)
    idx[:, K - K // 5:] = -1  # a tail of unused ids
    if T > 1:
        idx[1] = -1  # a token with no key: o = 0
    sink = torch.randn(H, device="cuda", generator=g)
    return q, nope, exp, rp, idx, sink


@pytest.mark.parametrize(("T", "H", "hd", "rope", "K"), [(1, 64, 512, 64, 640), (4, 64, 512, 64, 256),
                                                         (64, 64, 512, 64, 640), (3, 6, 192, 32, 100),
                                                         (5, 4, 64, 16, 40)])
@pytest.mark.parametrize("native", [True, False])
def test_sparse_attn_split_rows(T: int, H: int, hd: int, rope: int, K: int, native: bool) -> None:
    if native and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("e4m3 converts need sm_89+")
    q, nope, exp, rp, idx, sink = _case(T, H, hd, rope, K, 4096, seed=T + hd)
    rows = dequantize_kv_rows(nope, exp, rp)  # exact in bf16
    want = sparse_attn_ref(q, rows, idx, sink, hd**-0.5).float()
    got = sparse_attn(q, nope, idx, sink, hd**-0.5, exp, kv_rope=rp, native_fp8=native).float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # the bf16 pool path over the same (dequantized) rows: same math, same bf16 roundings of p
    bf = sparse_attn(q, rows, idx, sink, hd**-0.5).float()
    assert (got - bf).abs().max() <= 2e-2
    if T > 1:
        assert got[1].abs().max() == 0


@pytest.mark.parametrize(("T", "K", "tile"), [(1, 8320, (16, 64, 8, 2)), (1, 8320, (16, 128, 8, 2)),
                                              (4, 640, (16, 64, 8, 2)), (1, 640, (16, 32, 8, 2))])
def test_attn_rope_split_matches(T: int, K: int, tile: tuple[int, int, int, int]) -> None:
    # DS4F_ATTN_ROPE_SPLIT at the decode shapes of one TP=2 rank (32 heads; an HCA list at 1M, a CSA window +
    # top-512 list) with a live bound, at pipelined tiles that only it fits: against the reference over the
    # dequantized rows, and close to the default path (only the logits' sum order differs)
    import importlib

    sa_mod = importlib.import_module("ds4f.kernels.sparse_attn")
    q, nope, exp, rp, idx, sink = _case(T, 32, 512, 64, K, 16384, seed=K + T)
    live = torch.full((T,), K - K // 5, dtype=torch.int32, device="cuda")
    want = sparse_attn_ref(q, dequantize_kv_rows(nope, exp, rp), idx, sink, 512**-0.5).float()
    base = sparse_attn(q, nope, idx, sink, 512**-0.5, exp, kv_rope=rp, live=live).float()
    bh, bk, nw, ns = tile
    sa_mod.ROPE_SPLIT = True
    try:
        got = sparse_attn(q, nope, idx, sink, 512**-0.5, exp, kv_rope=rp, live=live, block_h=bh, block_k=bk,
                          num_warps=nw, num_stages=ns).float()
    finally:
        sa_mod.ROPE_SPLIT = False
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, base, atol=4e-3, rtol=4e-3)
    assert not any(k[-1] for k in sa_mod._FITTED), "a ROPE_SPLIT tile had to shrink"  # (entries: shrunk launches)


def test_sparse_attn_split_rows_in_cuda_graph() -> None:
    q, nope, exp, rp, idx, sink = _case(2, 64, 512, 64, 640, 2048, seed=7)
    want = sparse_attn(q, nope, idx, sink, 512**-0.5, exp, kv_rope=rp)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sparse_attn(q, nope, idx, sink, 512**-0.5, exp, kv_rope=rp)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_fused_stores_bit_exact() -> None:
    check_fused_stores("cuda")


def test_decode_graph_context_classes_match_full() -> None:
    # DecodeGraphs context classes: steps whose positions fit cap 32 / 48 replay graphs scoring only index_len(cap)
    # indexer columns (index bucket 8 of the 16 CSA entries), the rest the full graphs; the same logits as a cache
    # whose graphs always keep every column (max positions 21 -> 51 cross both caps)
    out = run_steps(no_flip_config(), "cuda", prompt_lens=(13, 5, 21), first_chunk=7, decode_steps=30,
                    fast={"cls": FP8["fp8"], "full": FP8["fp8"]}, ref=(), graphs=True,
                    fm_attrs={"index_bucket": 8}, graph_caps={"cls": (32, 48)})
    e = rel_errors(out["cls"], out["full"])
    assert e.max() < 2e-3, e.max()


@pytest.mark.parametrize("graphs", [False, True])
def test_fast_model_fp8_vs_bf16_over_fp8_values(graphs: bool) -> None:
    # fused and torch stores write the same bits: the same logits; bf16 pools holding the fp8 values give them too
    # once both attention paths use the same key blocking (fp8 rows default to 32-key tiles at small T)
    out = run_steps(no_flip_config(), "cuda", prompt_lens=(37, 5, 21), first_chunk=13, decode_steps=20,
                    fast={k: FP8[k] for k in ("fp8", "fp8-torch", "sim", "bf16")}, ref=(), graphs=graphs,
                    attn_kw={"block_k": 64})
    e = rel_errors(out["fp8"], out["sim"])
    lossy = rel_errors(out["fp8"], out["bf16"])
    print(f"fp8 vs sim: max {e.max():.2e}; fp8 vs bf16 median {lossy.median():.4f}")
    for a, b in zip(out["fp8"], out["fp8-torch"]):
        assert torch.equal(a, b)
    assert e.max() < 1e-3
    assert lossy.median() > 5e-3


@pytest.mark.parametrize("graphs", [False, True])
def test_kv_fused_decode_is_bit_identical(graphs: bool) -> None:
    # FastModel.kv_fused (DS4F_KV_FUSED=1): decode steps write the kv row with one launch; the same logits, bit for
    # bit, as the three launches, eagerly and in captured decode graphs
    from ds4f.runner.gpu.pools import FastCache

    took = []

    class Counted(FastCache):
        def put_kv_fused(self, *a: object, **kw: object) -> bool:
            took.append(super().put_kv_fused(*a, **kw))  # type: ignore[arg-type]
            return took[-1]

    out = run_steps(no_flip_config(), "cuda", prompt_lens=(37, 5, 21), first_chunk=13, decode_steps=20,
                    fast={"fused": (Counted, "fp8"), "three": (ThreeLaunchKVCache, "fp8")}, ref=(), graphs=graphs,
                    kv_fused=True)
    assert len(out["fused"]) == 22 and took and all(took)  # the one launch ran (at capture, with graphs)
    for a, b in zip(out["fused"], out["three"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("graphs", [False, True])
def test_compress_fp8_decode_is_bit_identical(graphs: bool) -> None:
    # FastModel.compress_fp8 (DS4F_COMPRESS_FP8=1): decode steps' compressor launches quantize their entries into the
    # fp8 attention and index-key pools themselves; the same logits, bit for bit, as the store launches after them
    import importlib

    fm_mod = importlib.import_module("ds4f.runner.gpu.fast_model")
    took = []
    real = fm_mod.glue.compress

    def counted(*a: object, **kw: object) -> object:
        took.append(len(a) > 20 and a[20] is not None)  # fp8_pool, the last positional argument
        return real(*a, **kw)  # type: ignore[arg-type]

    outs = []
    for on in (False, True):
        fm_mod.glue.compress = counted
        try:
            outs.append(run_steps(no_flip_config(), "cuda", prompt_lens=(37, 5, 21), first_chunk=13, decode_steps=20,
                                  fast={"fp8": FP8["fp8"]}, ref=(), graphs=graphs, kv_fused=True,
                                  fm_attrs={"compress_fp8": on})["fp8"])
        finally:
            fm_mod.glue.compress = real
        assert any(took) == on, "the in-kernel fp8 store ran" if not on else "no compressor launch stored fp8"
        took.clear()
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("graphs", [False, True])
def test_attn_q_norm_decode_matches(graphs: bool) -> None:
    # FastModel.attn_q_norm (DS4F_ATTN_Q_NORM=1): decode steps hand the raw wq_b output to the attention kernel,
    # which RMS-norms and rotates q as it loads it; the same logits up to the row sums' order (the separate launch
    # reduces 8 rows per program, the attention prologue 16)
    import importlib

    sa_mod = importlib.import_module("ds4f.kernels.sparse_attn")  # the module (the package re-exports the function)
    calls = []
    real = sa_mod._launch_tiles

    def counted(*a: object, **kw: object) -> torch.Tensor:
        calls.append(a[-1] is not None)  # q_norm, the last argument
        return real(*a, **kw)  # type: ignore[arg-type]

    outs = []
    for on in (False, True):
        sa_mod._launch_tiles = counted
        try:
            outs.append(run_steps(no_flip_config(), "cuda", prompt_lens=(37, 5, 21), first_chunk=13, decode_steps=20,
                                  fast={"fp8": FP8["fp8"]}, ref=(), graphs=graphs, kv_fused=True,
                                  fm_attrs={"attn_q_norm": on})["fp8"])
        finally:
            sa_mod._launch_tiles = real
    assert any(calls), "no attention call took q_norm"
    errs = rel_errors(outs[1], outs[0])
    print(f"q_norm in the kernel vs its own launch: max {errs.max():.2e}")
    assert errs.max() < 1e-2


@pytest.mark.parametrize("graphs", [False, True])
def test_indexer_hist_decode_matches(graphs: bool) -> None:
    # DS4F_INDEXER_HIST through FastModel (every decode call): with the small top-k's lanes cut to 16, the mid
    # model's CSA decode rows (tens of entries, top-24) take the radix path, the indexer counting its first digit;
    # the same logits up to the picks' order in the attention lists (the gather's atomics order them)
    import importlib

    from ds4f.kernels import indexer as ix

    fm_mod = importlib.import_module("ds4f.runner.gpu.fast_model")
    calls = []
    real = fm_mod.decode_hist_buffer

    def counted(*a: object, **kw: object) -> torch.Tensor | None:
        calls.append(real(*a, **kw))  # type: ignore[arg-type]
        return calls[-1]

    outs = []
    small, hist = ix.SMALL_KNOBS, ix.INDEXER_HIST
    for on in (0, ix.RADIX_MAX_ROWS):
        ix.SMALL_KNOBS, ix.INDEXER_HIST, fm_mod.decode_hist_buffer = (16, 8), on, counted
        try:
            outs.append(run_steps(mid_config(tiny_config()), "cuda", prompt_lens=(150, 9, 97), first_chunk=40,
                                  decode_steps=30, fast={"fp8": FP8["fp8"]}, ref=(), graphs=graphs)["fp8"])
        finally:
            ix.SMALL_KNOBS, ix.INDEXER_HIST, fm_mod.decode_hist_buffer = small, hist, real
    assert any(b is not None for b in calls), "no decode call took the indexer's histogram"
    errs = rel_errors(outs[1], outs[0])
    print(f"indexer hist vs the first digit pass: max {errs.max():.2e}")
    assert errs.max() < 1e-2


@pytest.mark.parametrize("graphs", [False, True])
def test_fast_model_fp8_vs_reference_engine(graphs: bool) -> None:
    # eager with torch stores, graph-captured decode with the fused stores
    kind = FP8["fp8"] if graphs else FP8["fp8-torch"]
    out = run_steps(no_flip_config(), "cuda", prompt_lens=(37, 5, 21), first_chunk=13, decode_steps=20,
                    fast={"fp8": kind}, ref=("fp8", "float32"), graphs=graphs)
    check_vs_reference(out, 0.12)


def test_fast_model_fp8_mid_odd() -> None:
    # head_dim 192 (nope 160: a half-filled last exponent group), CSA top-24 over up to 57 fp8 index keys: top-k
    # picks can flip between bf16 and fp32 activations, so only the bulk is bounded
    out = run_steps(mid_config(tiny_config()), "cuda", prompt_lens=(150, 9, 97), first_chunk=40, decode_steps=30,
                    fast={"fp8": FP8["fp8"], "bf16": FP8["bf16"]}, ref=("fp8",), graphs=True, block_size=64)
    e8 = rel_errors(out["fp8"], out["ref:fp8"])
    e16 = rel_errors(out["fp8"], out["bf16"])
    print(f"mid: fp8 vs ref fp8 median {e8.median():.4f} p90 {e8.quantile(0.9):.4f} max {e8.max():.4f}; "
          f"fp8 vs bf16 median {e16.median():.4f}")
    assert e8.median() < 0.04
    assert (e8 < 0.1).double().mean() > 0.8


def bench_split_rows() -> None:
    """Not a test: sparse_attn at V4-Flash decode shapes (64 heads, 512 dims, 640 keys over 2^20 rows), bf16 pool vs
    fp8 split rows (e4m3 convert and bit-level decode), and FastCache.put's quantize-on-store cost."""
    import triton

    from ds4f.kernels.sparse_attn import attn_bytes
    from ds4f.model.args import ModelArgs, flash_config
    from ds4f.runner.gpu.pools import FastCache

    n, hd, H, K = 1 << 20, 512, 64, 640
    nope, exp, rp = quantize_kv_rows(torch.randn(n, hd, device="cuda"), 64)
    rows = dequantize_kv_rows(nope, exp, rp)
    sink = torch.zeros(H, device="cuda")
    for T in (1, 4, 16, 64):
        q = torch.randn(T, H, hd, device="cuda").bfloat16()
        idx = torch.randint(0, n, (T, K), device="cuda", dtype=torch.int32)
        cases = {"bf16": partial(sparse_attn, q, rows, idx, sink, 0.05),
                 "fp8": partial(sparse_attn, q, nope, idx, sink, 0.05, exp, kv_rope=rp),
                 "fp8-portable": partial(sparse_attn, q, nope, idx, sink, 0.05, exp, kv_rope=rp, native_fp8=False)}
        line = []
        for name, fn in cases.items():
            us = triton.testing.do_bench(fn, warmup=20, rep=200) * 1e3
            gbs = attn_bytes(T, H, hd, K, 1024 if name == "bf16" else 584) / us / 1e3
            line.append(f"{name} {us:.1f} us ({gbs:.0f} GB/s)")
        print(f"sparse_attn T={T}: " + ", ".join(line))
    args = ModelArgs.from_hf(flash_config())
    for kd in ("bfloat16", "fp8"):
        c = FastCache(args, max_seqs=1, num_blocks=4, block_size=256, max_ctx=1024, max_tokens=8192, device="cuda",
                      kv_dtype=kd)
        for fused in ([None, False] if kd == "fp8" else [None]):
            c.fused_quant = fused
            for T in (4, 8192):
                x = torch.randn(T, hd, device="cuda").bfloat16()
                r = c.scratch + torch.arange(T, device="cuda")
                us = triton.testing.do_bench(partial(c.put, c.kv[2], r, x), warmup=10, rep=100) * 1e3
                how = "" if kd != "fp8" else (" torch ops" if fused is False else " fused")
                print(f"FastCache.put {kd}{how} {T} rows: {us:.1f} us")
