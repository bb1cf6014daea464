"""⑥ kernels, fused_moe's Triton kernels on CPU (TRITON_INTERPRET=1 in a subprocess, tiny shapes) against
fused_moe_ref, and moe_align's invariants (one tier, and the two-tier plan of large batches). Skips the kernel
half when triton is missing (CI)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ds4f.kernels.moe import moe_align, resolve_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("T,k,E,bm", [(9, 3, 6, 4), (40, 7, 17, 16), (1, 2, 300, 8)])
def test_moe_align_runs_are_expert_sorted_padded_and_stable(T, k, E, bm):
    g = torch.Generator().manual_seed(T * E)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    sid, be = moe_align(ids, E, bm)
    M, flat = T * k, ids.view(-1)
    assert sid.numel() == be.numel() * bm and sorted(sid[sid < M].tolist()) == list(range(M))
    seen: list[int] = []
    for b, e in enumerate(be.tolist()):
        blk = sid[b * bm:(b + 1) * bm]
        picks = blk[blk < M].tolist()
        if e < 0:
            assert not picks
            continue
        assert picks and blk[0] < M and all(flat[p] == e for p in picks)  # a used block starts with a pick
        seen.append(e)
        assert picks == sorted(picks)  # flat (token) order inside an expert
    assert seen == sorted(seen) and be[len(seen):].eq(-1).all()  # experts ascending, unused blocks last


def check_tiers(ids: torch.Tensor, E: int, bm: int, tm: int, s1: torch.Tensor, b1: torch.Tensor, s2: torch.Tensor,
                b2: torch.Tensor) -> None:
    """Two-tier plan invariants: every pick once, in flat order per expert (tier 1 first), one expert per block,
    tier 1 = the expert's full bm blocks (+ one partial block when its tail exceeds tm), tier 2 = the rest."""
    flat = ids.reshape(-1).tolist()
    M = len(flat)
    got: dict[int, list[list[int]]] = {e: [[], []] for e in range(E)}
    n_blocks: dict[int, list[int]] = {e: [0, 0] for e in range(E)}
    for tier, (sid, be, blk) in enumerate(((s1, b1, bm), (s2, b2, tm))):
        for b, e in enumerate(be.tolist()):
            picks = [p for p in sid[b * blk:(b + 1) * blk].tolist() if p < M]
            if e < 0:
                assert not picks
                continue
            assert picks and all(flat[p] == e for p in picks)
            got[e][tier] += picks
            n_blocks[e][tier] += 1
    for e in range(E):
        c = flat.count(e)
        want1 = c // bm + int(c % bm > tm)
        rows1 = min(c, want1 * bm)
        assert n_blocks[e] == [want1, int(c > rows1)], (e, c, n_blocks[e])
        assert got[e][0] + got[e][1] == [p for p in range(M) if flat[p] == e]


def test_config_overrides_and_rejects_unknown_keys():
    cfg = resolve_config(8192 * 7, 257, 8192, dict(BLOCK_N=64, down_num_warps=4, GROUP_M=2))
    assert cfg["up_BLOCK_N"] == cfg["down_BLOCK_N"] == 64 and cfg["down_num_warps"] == 4
    assert cfg["up_GROUP_M"] == cfg["down_GROUP_M"] == 2
    assert resolve_config(8192 * 7, 257, 8192, dict(TAIL_M=64, tail_up_BLOCK_N=64))["tail_up_BLOCK_N"] == 64
    assert resolve_config(7, 257, 1)["PER_PICK"] == 1 and resolve_config(14, 257, 2)["PER_PICK"] == 0
    with pytest.raises(AssertionError):
        resolve_config(7, 257, 1, dict(BLOCK_Q=1))


_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from ds4f.kernels import moe
    from ds4f.kernels.ref import fused_moe_ref

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    g = torch.Generator().manual_seed(0)
    cases = [  # (T, E, k, D, I, config): one block per pick, table, grouped order + ragged tiles + chunked align
        (1, 6, 3, 64, 32, None), (5, 6, 3, 48, 40, None),
        (9, 5, 2, 64, 48, dict(BLOCK_M=16, GROUP_M=3, BLOCK_N=32, BLOCK_K=32)),
        (6, 4, 2, 32, 32, dict(BLOCK_M=16, PER_PICK=1, BLOCK_K=16)),
        (40, 5, 3, 64, 32, dict(BLOCK_M=16, TAIL_M=8, BLOCK_N=16, BLOCK_K=32)),  # two tiers
    ]
    for i, (T, E, k, D, I, cfg) in enumerate(cases):
        x = torch.randn(T, D, generator=g).bfloat16()
        w13 = (torch.randn(E, 2 * I, D, generator=g) * (3 / D**0.5)).bfloat16()
        w2 = (torch.randn(E, D, I, generator=g) / I**0.5).bfloat16()
        ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.int()
        wt = torch.rand(T, k, generator=g)
        moe.ALIGN_SMALL_MAX, moe.ALIGN_CHUNK = (0, 16) if i in (2, 4) else (1024, 1024)
        out = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=cfg)
        r = rel(out, fused_moe_ref(x, w13, w2, ids, wt, 2.0))
        assert r < 1.5e-2, (i, r)
    moe.ALIGN_SMALL_MAX, moe.ALIGN_CHUNK = 1024, 1024
    for T, k, E, bm in [(9, 3, 6, 4), (16, 7, 257, 16), (3, 2, 5, 16), (23, 3, 9, 8)]:
        ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.int()
        flat = ids.view(-1)
        nb = moe._align_bound(flat.numel(), E, bm)
        want = moe._align_torch(flat, E, bm, nb)
        for small, chunk in [(1024, 1024), (0, 16), (0, 1024)]:  # one program; three passes, several chunks
            moe.ALIGN_SMALL_MAX, moe.ALIGN_CHUNK = small, chunk
            got = moe.moe_align(ids, E, bm)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (T, k, E, bm, small, chunk)
    moe.ALIGN_SMALL_MAX, moe.ALIGN_CHUNK = 1024, 1024
    rows = torch.randn(12, 40, generator=g).bfloat16()
    r3 = rows.float().view(4, 3, 40)
    want = (r3[:, 0] + r3[:, 1] + r3[:, 2]).bfloat16()  # fp32, in pick order
    assert torch.allclose(moe.moe_sum(rows, 4, 3).float(), want.float(), rtol=2**-7, atol=0)  # interpreter rounds
    tiers = []
    moe.ALIGN_SMALL_MAX, moe.ALIGN_CHUNK = 0, 16
    for T, k, E, bm, tm in [(40, 3, 5, 16, 8), (70, 2, 3, 32, 16), (9, 3, 6, 8, 4)]:
        ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.int()
        flat = ids.view(-1)
        tiers.append((ids, E, bm, tm, moe._align_triton(flat, E, bm, moe._align_bound(flat.numel(), E, bm), tm)))
    torch.save(tiers, sys.argv[1])
    print("ok")
""")


def test_triton_kernels_in_the_interpreter_match_the_reference(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", _SCRIPT, str(tmp_path / "tiers.pt")], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    for ids, E, bm, tm, plan in torch.load(tmp_path / "tiers.pt"):  # the two-tier plan of the three-pass align
        check_tiers(ids, E, bm, tm, *plan)
