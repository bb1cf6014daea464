"""KV compressor step on CUDA at V4-Flash widths: the Triton kernel (glue.compress) vs glue.compress_ref, CSA
(attention cd 1024, indexer cd 256, ratio 4) and HCA (cd 512, ratio 128), T = 1, 4, 300 tokens with chunk starts
inside windows (entries read carry-ring and in-chunk rows, and window -1), eager and inside a CUDA graph.

`python3 tests/gpu/test_compress_gpu.py` prints per-call times of both (decode shapes, CUDA-graph replays)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.sparse_attn import HAS_TRITON
from ds4f.model.layers import Rope
from ds4f.runner.gpu.glue import compress, compress_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

KINDS = {"csa": (4, True, 512), "index": (4, True, 128), "hca": (128, False, 512)}  # ratio, overlap, head_dim
ROPE_DIM, BLOCK_SIZE, MAX_POS, EPS = 64, 256, 4096, 1e-6
# sequence chunks (start, tokens) per T; positions chosen so that some tokens complete windows of both ratios
CHUNKS = {
    1: [(639, 1)],
    4: [(127, 1), (1023, 1), (3, 1), (200, 1)],
    300: [(0, 140), (37, 100), (1000, 40), (2047, 1), (250, 19)],
}


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS4F_COMPRESS_KERNEL", "1")  # glue.compress: the Triton kernel (the default)


def make_inputs(kind: str, chunks: list[tuple[int, int]], seed: int = 0, dev: str = "cuda") -> tuple:
    g = torch.Generator().manual_seed(seed)
    m, overlap, hd = KINDS[kind]
    cd = 2 * hd if overlap else hd
    R = 2 * m if overlap else m
    n_seq = len(chunks)
    S1 = n_seq + 3
    slots = torch.randperm(S1 - 1, generator=g)[:n_seq]
    max_blocks = MAX_POS // BLOCK_SIZE
    tables = torch.randperm(n_seq * max_blocks + 7, generator=g)[: n_seq * max_blocks].view(n_seq, max_blocks)
    pos, slot, cs, bt = [], [], [], []
    for b, (c0, n) in enumerate(chunks):
        pos += range(c0, c0 + n)
        slot += [int(slots[b])] * n
        cs += [c0] * n
        bt += [tables[b]] * n
    t = len(pos)
    wide = torch.randn(t, 2 * cd + 96, generator=g).bfloat16().to(dev)
    kvz = wide[:, 32: 32 + 2 * cd]  # a column slice of the stacked projection, as FastModel passes it
    ring = torch.randn(S1 * R, 2 * cd, generator=g)
    rope = Rope(ROPE_DIM, 1.0 / (10000 ** (torch.arange(0, ROPE_DIM, 2, dtype=torch.float32) / ROPE_DIM)))
    cos, sin = rope.cos_sin(torch.arange(MAX_POS))
    et = torch.cat([torch.arange(t), torch.tensor([-1])])
    rest = (torch.randn(m, cd, generator=g), ring, torch.rand(hd, generator=g) + 0.5, et, torch.tensor(pos),
            torch.tensor(cs), torch.tensor(slot), torch.stack(bt), cos, sin)
    return (kvz, *(a.to(dev) for a in rest), m, R, overlap, EPS, 11, n_seq * max_blocks + 7, BLOCK_SIZE // m)


def _check(got: tuple, want: tuple, dummy_row: int) -> None:
    rows, ent, dst = got
    assert torch.equal(rows, want[0]) and torch.equal(dst, want[2])
    assert ent.dtype == want[1].dtype == torch.bfloat16 and ent.shape == want[1].shape
    valid = dst != dummy_row
    assert valid.any() and (~valid).any()
    assert (ent[~valid] == 0).all()
    a, b = ent[valid].float(), want[1][valid].float()
    err = ((a - b).abs() / (b.abs() + 1)).max().item()  # fp32 math both; at most a bf16 rounding step apart
    assert err <= 2**-7, err


@pytest.mark.parametrize("t", sorted(CHUNKS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_compress_kernel_matches_ref(kind: str, t: int) -> None:
    args = make_inputs(kind, CHUNKS[t])
    assert args[0].shape[0] == t
    dummy_row = args[-3] + args[-2] * args[-1]
    want = compress_ref(*args)
    _check(compress(*args), want, dummy_row)
    if t == 4:  # captured in a CUDA graph (as the decode step is) and replayed on new inputs
        compress(*args)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compress(*args)
        fresh = make_inputs(kind, CHUNKS[t], seed=1)
        for a, b in zip(args[:11], fresh[:11]):
            a.copy_(b)
        graph.replay()
        _check(out, compress_ref(*args), dummy_row)


@pytest.mark.parametrize("kind", list(KINDS))
def test_compress_fp8_pool_matches_store(kind: str) -> None:
    # decode (T = 4, one token per sequence) into an fp8 pool: the entries quantized inside the compressor launch
    # (fp8_pool) hold the bits fp8.store_key_rows (indexer keys) / store_kv_rows (attention rows) write from the
    # launch's bf16 entries; also captured in a CUDA graph and replayed on new inputs
    from ds4f.kernels.fp8 import FP8, kv_exp_bytes, store_key_rows, store_kv_rows

    args = list(make_inputs(kind, CHUNKS[4]))
    hd = KINDS[kind][2]
    n = args[-3] + (args[-2] + 1) * args[-1]

    def pool() -> tuple[torch.Tensor, ...]:
        if kind == "index":
            return torch.zeros(n, hd, dtype=FP8, device="cuda"), torch.ones(n, device="cuda")
        return (torch.zeros(n, hd - ROPE_DIM, dtype=FP8, device="cuda"),
                torch.full((n, kv_exp_bytes(hd - ROPE_DIM)), 127, dtype=torch.uint8, device="cuda"),
                torch.zeros(n, ROPE_DIM, dtype=torch.bfloat16, device="cuda"))

    def bits(parts: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [t.view(torch.uint8) if t.dtype == FP8 else t for t in parts]

    # state rows to the ring's last rows: its last slot, which no sequence of make_inputs uses (no candidate reads)
    rr = torch.arange(4, device="cuda") + args[2].shape[0] - 4

    def both() -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        want, got = pool(), pool()
        _, ent, dst = compress(*args)
        (store_key_rows if kind == "index" else store_kv_rows)(*want, dst, ent, fused=True)
        ring = args[2].clone()
        _, none, dst2 = compress(*args[:2], ring, *args[3:], ring_rows=rr, fp8_pool=got)
        assert none is None and torch.equal(dst, dst2)
        return want, got

    want, got = both()
    assert any(t.view(torch.uint8).any() for t in got[:1])  # entries were stored
    for a, b in zip(bits(want), bits(got)):
        assert torch.equal(a, b), kind
    target = pool()
    compress(*args[:2], args[2].clone(), *args[3:], ring_rows=rr, fp8_pool=target)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, _, dstg = compress(*args[:2], args[2], *args[3:], ring_rows=rr, fp8_pool=target)
    fresh = make_inputs(kind, CHUNKS[4], seed=1)
    _, ent_f, dst_f = compress(*fresh)  # before the replay: the replay writes fresh's state rows into args' ring
    for a, b in zip(args[:11], fresh[:11]):
        a.copy_(b)
    graph.replay()
    want = pool()
    (store_key_rows if kind == "index" else store_kv_rows)(*want, dst_f, ent_f, fused=True)
    assert torch.equal(dstg, dst_f)
    for a, b in zip(bits(want), bits(target)):
        assert torch.equal(a[dst_f], b[dst_f]), kind


def _bench() -> None:
    decode = [(p, 1) for p in torch.randint(0, MAX_POS - 1, (32,), generator=torch.Generator().manual_seed(3)).tolist()]
    decode[0], decode[1] = (127, 1), (1023, 1)  # a few complete windows (HCA too)
    for kind in KINDS:
        args = make_inputs(kind, decode)
        for name, fn in (("kernel", compress), ("compress_ref", compress_ref)):
            for _ in range(3):
                fn(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(*args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(200):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            print(f"{kind:6s} T=32 {name:13s} {start.elapsed_time(end) / 200 * 1e3:8.1f} us / call")


if __name__ == "__main__":
    import os

    os.environ["DS4F_COMPRESS_KERNEL"] = "1"
    _bench()
