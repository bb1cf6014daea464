"""⑥ kernels, fused_moe on CUDA against fused_moe_ref: every tile-table regime, the shared expert appended as id E,
explicit configs (grouped order, ragged tiles, one block per pick with repeated experts), moe_align's one-program
paths against its torch path, moe_sum, and replay from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON, moe
from ds4f.kernels.ref import fused_moe_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

MOE_TOL = 1.5e-2  # bf16 activation in both; the kernel also rounds each pick's weighted row to bf16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(T: int, E: int, k: int, D: int, I: int, shared: bool, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = E + int(shared)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    w13 = (torch.randn(n, 2 * I, D, device="cuda", generator=g) * (3 / D**0.5)).bfloat16()
    w2 = (torch.randn(n, D, I, device="cuda", generator=g) / I**0.5).bfloat16()
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    if shared:
        ids = torch.cat([ids, torch.full((T, 1), E, dtype=torch.int32, device="cuda")], 1)
    wt = torch.rand(ids.shape, device="cuda", generator=g)
    return x, w13, w2, ids, wt


@pytest.mark.parametrize(
    "T,E,k,D,I",
    [
        (1, 256, 6, 4096, 2048),  # decode, one block per pick
        (16, 256, 6, 4096, 2048),  # batched decode, one-program align
        (300, 64, 6, 1024, 512),  # ~28 picks per expert
        (1000, 64, 6, 1024, 512),  # ~94 picks per expert
        (2048, 32, 4, 512, 256),  # ~256 picks per expert, torch align
        (37, 10, 3, 200, 96),  # ragged N and K tiles
    ],
)
def test_fused_moe_regimes_with_shared_expert(T, E, k, D, I):
    x, w13, w2, ids, wt = _case(T, E, k, D, I, shared=True, seed=T + E)
    cfg = moe.resolve_config(ids.numel(), E + 1, T)
    out = moe.fused_moe(x, w13, w2, ids, wt, 2.0)  # a small limit so the clamp is exercised
    assert torch.isfinite(out).all()
    assert _rel(out, fused_moe_ref(x, w13, w2, ids, wt, 2.0)) < MOE_TOL, cfg


@pytest.mark.parametrize(
    "cfg",
    [
        dict(BLOCK_M=16, PER_PICK=1),  # repeated experts read again, one block each
        dict(BLOCK_M=64, GROUP_M=3, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=32, GROUP_M=1, up_BLOCK_N=32, down_BLOCK_N=128, BLOCK_K=64),
        dict(BLOCK_M=128, GROUP_M=16, up_BLOCK_N=128, down_BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    ],
)
def test_fused_moe_explicit_configs(cfg):
    x, w13, w2, ids, wt = _case(23, 6, 3, 192, 160, shared=False, seed=5)  # 160 % 64 and 192 % 128 are ragged
    out = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=cfg)
    assert _rel(out, fused_moe_ref(x, w13, w2, ids, wt, 2.0)) < MOE_TOL


@pytest.mark.parametrize("T,k,E,bm", [(1, 7, 257, 16), (16, 7, 257, 16), (9, 3, 6, 4), (146, 7, 257, 32),
                                      (8192, 7, 257, 128), (3000, 4, 33, 64)])
@pytest.mark.parametrize("small", [1024, 0])
def test_align_triton_paths_match_torch_path(T, k, E, bm, small, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    monkeypatch.setattr(moe, "ALIGN_SMALL_MAX", small)  # 0: the three-pass chunked path even for a few picks
    got = moe.moe_align(ids, E, bm)
    want = moe._align_torch(ids.view(-1), E, bm, moe._align_bound(ids.numel(), E, bm))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("T,k,E,bm,tm", [(8192, 7, 257, 128, 64), (3000, 4, 33, 64, 32)])
def test_align_two_tiers(T, k, E, bm, tm):
    g = torch.Generator(device="cuda").manual_seed(T)
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    s1, b1, s2, b2 = moe._align_triton(ids.view(-1), E, bm, moe._align_bound(ids.numel(), E, bm), tm)
    flat = ids.view(-1).tolist()
    M = len(flat)
    got: dict[int, list[int]] = {}
    blocks: dict[int, list[int]] = {e: [0, 0] for e in range(E)}
    for tier, (sid, be, blk) in enumerate(((s1, b1, bm), (s2, b2, tm))):
        sid, be = sid.tolist(), be.tolist()
        for b, e in enumerate(be):
            picks = [p for p in sid[b * blk:(b + 1) * blk] if p < M]
            assert (e < 0) == (not picks) and all(flat[p] == e for p in picks)
            if e >= 0:
                got.setdefault(e, []).extend(picks)
                blocks[e][tier] += 1
    want: dict[int, list[int]] = {}
    for p, e in enumerate(flat):
        want.setdefault(e, []).append(p)
    assert got == want  # every pick once, flat order inside an expert, tier 1 before tier 2
    for e, picks in want.items():
        c = len(picks)
        n1 = c // bm + int(c % bm > tm)
        assert blocks[e] == [n1, int(c > n1 * bm)], (e, c)


def test_fused_moe_two_tiers_match_one_tier():
    x, w13, w2, ids, wt = _case(3000, 32, 6, 512, 256, shared=True, seed=3)
    assert moe.resolve_config(ids.numel(), 33, 3000)["BLOCK_M"] == 128
    two = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=dict(TAIL_M=64, tail_up_BLOCK_N=128))
    one = moe.fused_moe(x, w13, w2, ids, wt, 2.0)
    ref = fused_moe_ref(x, w13, w2, ids, wt, 2.0)
    assert _rel(two, ref) < MOE_TOL and _rel(two, one) < 5e-3


def test_moe_sum_matches_fp32_sum():
    rows = torch.randn(300 * 7, 4096, device="cuda").bfloat16()
    for T in (1, 300):
        r = rows[: T * 7].float().view(T, 7, -1)
        want = r[:, 0]
        for j in range(1, 7):
            want = want + r[:, j]  # fp32, in pick order
        assert torch.equal(moe.moe_sum(rows[: T * 7], T, 7), want.bfloat16())


@pytest.mark.parametrize("T", [1, 8])
def test_fused_moe_replays_from_a_cuda_graph(T):
    x, w13, w2, ids, wt = _case(T, 64, 6, 512, 256, shared=True, seed=T)
    want = moe.fused_moe(x, w13, w2, ids, wt, 2.0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe.fused_moe(x, w13, w2, ids, wt, 2.0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, w13, w2, ids, wt, 2.0)
    ids.copy_(ids.flip(0))  # new routing in the same buffers
    x.copy_(x.flip(0))
    wt.copy_(wt.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want.flip(0))


# decode rows (moe.DECODE_TABLE layout): BLOCK_M, PER_PICK, FUSE_SUM, SPLIT_K, up BN/BK/GM/warps/stages, down same
DECODE_ROWS = [
    (16, 1, 1, 1, 16, 256, 1, 4, 4, 16, 256, 1, 4, 4),  # down sums a token's picks in registers, no sum launch
    (16, 1, 1, 2, 32, 128, 64, 4, 6, 64, 128, 64, 4, 6),  # + K split in two (fp32 partials, moe_sum)
    (16, 1, 0, 2, 64, 256, 64, 8, 3, 32, 256, 64, 8, 4),  # one block per pick, K split, N-major order
    (16, 0, 0, 2, 32, 128, 8, 2, 4, 32, 128, 1, 2, 4),  # sorted picks, K split
    (16, 0, 0, 1, 16, 64, 1, 4, 6, 64, 256, 1, 4, 3),
]


@pytest.fixture(scope="module")
def flash_experts():
    g = torch.Generator(device="cuda").manual_seed(7)
    w13 = (torch.randn(257, 4096, 4096, device="cuda", generator=g) * (3 / 4096**0.5)).bfloat16()
    w2 = (torch.randn(257, 4096, 2048, device="cuda", generator=g) / 2048**0.5).bfloat16()
    return w13, w2


@pytest.mark.parametrize("T", [1, 4, 16])
def test_fused_moe_decode_rows_at_flash_width(T, flash_experts):
    w13, w2 = flash_experts
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g).bfloat16()
    ids = torch.rand(T, 256, device="cuda", generator=g).topk(6, dim=1).indices.int()
    ids = torch.cat([ids, torch.full((T, 1), 256, dtype=torch.int32, device="cuda")], 1)
    wt = torch.rand(ids.shape, device="cuda", generator=g)
    ref = fused_moe_ref(x, w13, w2, ids, wt, 2.0)
    base = moe.fused_moe(x, w13, w2, ids, wt, 2.0)
    for row in DECODE_ROWS:
        out = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=moe.decode_row_config(row))
        assert _rel(out, ref) < MOE_TOL and _rel(out, base) < 1e-2, row


@pytest.mark.parametrize("row", DECODE_ROWS[:3])
def test_fused_moe_decode_rows_replay_from_a_cuda_graph(row):
    x, w13, w2, ids, wt = _case(3, 64, 6, 512, 256, shared=True, seed=11)
    cfg = moe.decode_row_config(row)
    want = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=cfg)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=cfg)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=cfg)
    ids.copy_(ids.flip(0))
    x.copy_(x.flip(0))
    wt.copy_(wt.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want.flip(0))
    assert _rel(out, fused_moe_ref(x, w13, w2, ids, wt, 2.0)) < MOE_TOL
