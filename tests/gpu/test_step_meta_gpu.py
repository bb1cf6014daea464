"""Per-step index tensors on CUDA: the one-launch kernel (ds4f.kernels.step_meta via glue.derive) vs the torch
reference glue.derive_ref at the shapes of the 8-layer V4-Flash-width decode bench (window 128, CSA 4 indexed, HCA
128 direct, blocks of 256, the real RoPE tables) at depth 8K, decode buckets 1 / 4 / 16 and mixed chunks of <= 16
tokens; synthetic 1M-context tables (262144 CSA entries, 8192 HCA entries); captured in a CUDA graph and replayed on
new decode buffers; the embedding (D = 4096, 4 streams) folded into the launch.

`python3 tests/gpu/test_step_meta_gpu.py` prints per-call times (CUDA-graph replays of 20 calls) of the kernel and of
the compiled derive_ref at the 8K decode shapes, each also with the embedding (derive_ref + embed: the
reference's F.embedding gather + the copy into the streams, as FastModel.forward runs it now)."""

from __future__ import annotations

import os

import pytest
import torch

from ds4f.kernels.sparse_attn import HAS_TRITON
from ds4f.model.args import CSA, SWA, ModelArgs, flash_config
from ds4f.model.layers import Rope
from ds4f.runner.gpu import glue
from ds4f.runner.gpu.pools import FastCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

RATIOS = [0, 0, 4, 128, 4, 128, 4, 128]  # bench/bench_decode.py's model: 2 SWA, 3 CSA, 3 HCA
BS, DEPTH = 256, 8192
DEV = "cuda"


def same(got: object, want: object, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype, where
        assert torch.equal(got, want), where
        return
    assert isinstance(got, tuple) and isinstance(want, tuple) and len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
        same(g, w, f"{where}[{i}]")


def bench_args() -> ModelArgs:
    cfg = flash_config()
    cfg.pop("quantization_config")
    cfg.update(num_hidden_layers=len(RATIOS), compress_ratios=RATIOS, num_nextn_predict_layers=0, expert_dtype="bf16")
    return ModelArgs.from_hf(cfg)


def setup(a: ModelArgs, batch: int, depth: int = DEPTH) -> tuple[FastCache, tuple, tuple, tuple]:
    """FastCache as bench_decode builds it + FastModel._derive's tables, rings and entry kinds."""
    nbs = -(-(depth + 1) // BS)
    cache = FastCache(a, max_seqs=batch, num_blocks=batch * nbs, block_size=BS, max_ctx=nbs * BS, max_tokens=16,
                      device=DEV)
    ratios = sorted({a.compress_ratio(i) for i in range(a.num_hidden_layers)} - {0})
    pos = torch.arange(depth + 1 + 2 * BS, device=DEV)
    swa = next(i for i in range(a.num_hidden_layers) if a.layer_type(i) == SWA)
    tables = (*Rope.for_layer(a, swa).cos_sin(pos), *Rope.compress(a).cos_sin(pos))
    rings = tuple(sorted({r for m in ratios for r in (m, 2 * m)}))
    ents = []
    for m in ratios:
        n = cache.max_entries(m)
        csa = any(a.compress_ratio(i) == m and a.layer_type(i) == CSA for i in range(a.num_hidden_layers))
        ents.append((m, n, cache.epb(m), not csa or n <= a.index_topk))
    return cache, tables, rings, tuple(ents)


def call(fn, meta, cache: FastCache, tables: tuple, rings: tuple, ents: tuple, *embed: object) -> tuple:
    return fn(meta.positions, meta.tok_slot, meta.chunk_start, meta.chunk_end, meta.tok_seq, meta.block_table,
              tables, cache.scratch, cache.dummy_slot, cache.comp_base, cache.W, rings, ents, *embed)


def embedding(a: ModelArgs, vocab: int = 4099) -> torch.Tensor:
    """An embedding weight of the model's width (a short vocabulary: the ids of the tests are small)."""
    return torch.randn(vocab, a.hidden_size, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV,
                       dtype=torch.bfloat16)


def check_embed(out: tuple, meta, emb: torch.Tensor, hc: int, want: tuple) -> None:
    *got, x = out
    same(tuple(got), want)
    same(x, emb[meta.input_ids].unsqueeze(1).expand(-1, hc, -1).contiguous(), "embed")


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS4F_STEP_META_KERNEL", "1")
    monkeypatch.setenv("DS4F_COMPILE", "0")  # the eager torch reference is the oracle


# decode (slot, position) per bucket: window / entry / block edges near 8K and early positions
DECODE = {1: [(0, DEPTH)], 4: [(0, 8191), (1, 127), (2, 4095)],
          16: [(s, p) for s, p in enumerate([DEPTH, 8191, 0, 1, 3, 127, 128, 255, 256, 511, 4095, 5000, 7000, 8000,
                                             8100])]}


@pytest.mark.parametrize("bucket", [1, 4, 16])
def test_decode_matches_ref(bucket: int) -> None:
    a = bench_args()
    cache, tables, rings, ents = setup(a, 16)
    assert ents == ((4, 2112, 64, False), (128, 66, 2, True)) and rings == (4, 8, 128, 256)
    meta = cache.decode_buffers(bucket, [4, 128])
    cache.fill_decode(meta, [(s, p, 7) for s, p in DECODE[bucket]])  # bucket 4 / 16: padding rows too
    want = call(glue.derive_ref, meta, cache, tables, rings, ents)
    same(call(glue.derive, meta, cache, tables, rings, ents), want)
    emb = embedding(a)  # the embedding folded in: D = 4096, 4 streams
    check_embed(call(glue.derive, meta, cache, tables, rings, ents, (meta.input_ids, emb, a.hc_mult)), meta, emb,
                a.hc_mult, want)


def test_chunks_match_ref() -> None:
    a = bench_args()
    cache, tables, rings, ents = setup(a, 4)
    for step in ([(0, 8000, 5), (1, 125, 6), (2, 0, 3), (3, 8190, 2)], [(0, 8005, 16)], [(1, 131, 9), (3, 8192, 1)]):
        meta = cache.build_meta([(s, p, list(range(n))) for s, p, n in step], [4, 128])
        same(call(glue.derive, meta, cache, tables, rings, ents),
             call(glue.derive_ref, meta, cache, tables, rings, ents))


def test_1m_context_matches_ref() -> None:
    """Full-size pools: [B, 262144] CSA index rows, [T, 128 + 8192] HCA attention rows (many programs)."""
    from ds4f.kernels import step_meta

    g = torch.Generator(device=DEV).manual_seed(0)
    b, mb, W = 4, 4096, 128
    table = torch.randperm(b * mb, generator=g, device=DEV).view(b, mb)
    p = torch.tensor([2**20 - 1, 2**19 + 127, 777, 2**20 - 129], device=DEV)
    slot = torch.tensor([2, 0, 3, 1], device=DEV)
    tables = tuple(torch.randn(2**20 + 1, 32, generator=g, device=DEV) for _ in range(2))
    args = (p, slot, p, p + 1, torch.arange(b, device=DEV), table, tables, (b + 1) * W, b, (b + 1) * W + 16, W,
            (4, 8, 128, 256), ((4, 262144, 64, False), (128, 8192, 2, True)))
    assert step_meta.supported(*args[:7], *args[-2:])
    same(glue.derive(*args), glue.derive_ref(*args))


def test_graph_replay() -> None:
    a = bench_args()
    cache, tables, rings, ents = setup(a, 4)
    meta = cache.decode_buffers(4, [4, 128])
    cache.fill_decode(meta, [(0, 100, 1)])
    emb = (meta.input_ids, embedding(a), a.hc_mult)
    call(glue.derive, meta, cache, tables, rings, ents, emb)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(glue.derive, meta, cache, tables, rings, ents, emb)
    for seqs in ([(s, p, 11 + s) for s, p in DECODE[4]], [(3, 8192, 1), (0, 255, 2), (1, 256, 3), (2, 4096, 4)]):
        cache.fill_decode(meta, seqs)
        graph.replay()
        check_embed(out, meta, emb[1], a.hc_mult, call(glue.derive_ref, meta, cache, tables, rings, ents))


def _bench() -> None:
    a = bench_args()
    for bucket in (1, 4, 16):
        cache, tables, rings, ents = setup(a, 16)
        meta = cache.decode_buffers(bucket, [4, 128])
        cache.fill_decode(meta, [(s, p, 7) for s, p in DECODE[bucket]])
        emb = ((meta.input_ids, embedding(a), a.hc_mult),)
        for name, knob, e in (("kernel", "1", ()), ("derive_ref (compiled)", "0", ()), ("kernel + embed", "1", emb),
                              ("derive_ref + embed", "0", emb)):
            os.environ["DS4F_STEP_META_KERNEL"] = knob
            for _ in range(3):
                call(glue.derive, meta, cache, tables, rings, ents, *e)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    call(glue.derive, meta, cache, tables, rings, ents, *e)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            print(f"bucket {bucket:2d} {name:22s} {start.elapsed_time(end) / 1000 * 1e3:8.2f} us / call", flush=True)


if __name__ == "__main__":
    os.environ["DS4F_COMPILE"] = "1"  # production: derive_ref through torch.compile
    _bench()
