"""The one-launch decode router (ds4f.kernels.router.route_fused) under TRITON_INTERPRET=1 vs route_ref: learned and
hash layers (hashed rows only, or all scores), shared pick on / off, norm on / off, T = 1 and 3, one and several
expert blocks, channel chunks with a masked tail, repeated calls on the same arrival counter (left at 0 by every
launch), exact score ties; plus a build for sm_80 / sm_90 of each variant (the atomic's acq_rel, the barriers)."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted

pytest.importorskip("triton")


def _case(t: int, d: int, e: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, d, generator=g).bfloat16(), (torch.randn(e, d, generator=g) / d**0.5).bfloat16(),
            torch.randn(e, generator=g) * 0.1, torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(50)]),
            torch.randint(0, 50, (t,), generator=g))


def _want_order(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """The learned pick's order: descending scores + bias, the lowest id first among ties."""
    s = torch.nn.functional.softplus(x.float() @ w.float().T).sqrt() + bias
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k].to(torch.int32)


def check_route_fused() -> None:
    from ds4f.kernels import router as r

    assert r.use_triton(torch.zeros(1))
    cnt = r._counter(torch.device("cpu"))
    k = 3
    for t in (1, 3):
        x, w, bias, tid, ids = _case(t, 300, 12, k, seed=t)  # 300 channels: chunks of 64, the last one masked
        for elems in (8192, 128):  # one expert block; blocks of 2 experts (6 blocks)
            for b, h, rows in ((bias, None, True), (None, tid, True), (None, tid, False)):
                for sh in (-1, 12):
                    for norm in (True, False):
                        got = [r.route_fused(x, w, b, h, ids, k, norm, 1.5, sh, elems=elems, hash_rows=rows)
                               for _ in range(2)]
                        r.PREWAIT = True  # the gate tile read before the PDL wait: the same program otherwise
                        got.append(r.route_fused(x, w, b, h, ids, k, norm, 1.5, sh, elems=elems, hash_rows=rows))
                        r.PREWAIT = False
                        assert int(cnt[0]) == 0, "the last program leaves the counter at 0"
                        assert all(torch.equal(g[0], got[0][0]) and torch.equal(g[1], got[0][1]) for g in got)
                        gi, gw = got[0]
                        wi, ww = r.route_ref(x, w, b, h, ids, k, norm, 1.5, sh)
                        assert gi.shape == wi.shape == gw.shape == (t, k + (sh >= 0)) and gi.dtype == torch.int32
                        # hash: tid2eid's order; learned: descending scores + bias (route_ref's topk is unsorted)
                        want = h[ids].to(torch.int32) if h is not None else _want_order(x, w, b, k)
                        assert torch.equal(gi[:, :k], want), (gi, want)
                        assert sh < 0 or (torch.all(gi[:, k] == sh) and torch.all(gw[:, k] == 1.0))
                        oi, oj = gi.long().sort(dim=1), wi.long().sort(dim=1)
                        assert torch.equal(oi.values, oj.values)
                        err = (gw.gather(1, oi.indices) - ww.gather(1, oj.indices)).abs().max().item()
                        assert err <= 1e-6, err
            # the old two kernels agree to the id order
            for b, h in ((bias, None), (None, tid)):
                gi, gw = r.route_fused(x, w, b, h, ids, k, True, 1.5, 12)
                oi, ow = r.route_two(x, w, b, h, ids, k, True, 1.5, 12)
                assert torch.equal(gi, oi) and (gw - ow).abs().max().item() <= 1e-6
    # exact ties: four equal top rows (duplicates), equal bias, 3 picks -> the lowest ids, in id order
    x, w, bias, _, ids = _case(2, 64, 16, k, seed=7)
    w[2] = (x[0].float() + x[1].float()).bfloat16()
    w[9], w[4], w[13] = w[2], w[2], w[2]
    bias[:] = 0.0
    for elems in (8192, 128):
        gi, _ = r.route_fused(x, w, bias, None, ids, k, True, 1.0, -1, elems=elems)
        assert torch.equal(gi, torch.tensor([[2, 4, 9]] * 2, dtype=torch.int32)), gi
        assert torch.equal(gi, _want_order(x, w, bias, k)), gi
    print("route fused ok")


def test_route_fused_interpreted() -> None:
    assert "route fused ok" in run_interpreted("test_router_fused", "check_route_fused")


@pytest.mark.parametrize("arch", [80, 90, 121])
@pytest.mark.parametrize(("hsh", "rows", "bt", "be", "chunk", "nds"), [
    (False, False, 1, 32, 256, 16),  # decode: T = 1 at E = 256, D = 4096 (fused_config's pick)
    (False, False, 4, 8, 1024, 4),
    (True, True, 1, 1, 256, 16),
    (True, False, 1, 32, 256, 16),
])
def test_route_fused_builds(arch: int, hsh: bool, rows: bool, bt: int, be: int, chunk: int, nds: int) -> None:
    from test_kernels_build import build

    from ds4f.kernels import router as r

    if not rows:
        assert r.fused_config(bt, 256, 4096, 8192, 16) == (be, chunk, nds)
    types = dict(x_ptr="*bf16", w_ptr="*bf16", part_ptr="*fp32", cnt_ptr="*i32", bias_ptr="*fp32",
                 hash_ptr="*i64" if hsh else "*i32", tok_ptr="*i64", ids_ptr="*i32", wo_ptr="*fp32", scaling="fp32")
    k = build(r._router_fused, types, dict(K=6, KO=7, BLOCK_K=8, BLOCK_T=bt, BLOCK_E=be, BLOCK_EA=256, CHUNK=chunk,
                                           NDS=nds, HASH=hsh, ROWS=rows, NORM=True), arch)
    assert "atom.global.gpu.acq_rel.add" in k["ptx"] and "ld.global.cg" in k["ptx"]


@pytest.mark.parametrize("arch", [90, 121])
def test_route_fused_prewait_reads_the_gate_first(arch: int) -> None:
    """PRE (DS4F_ROUTER_PREWAIT): the T = 1 all-scores launch's gate tile loads sit before griddepcontrol.wait, the
    token ids' after it; without PRE the wait comes first."""
    from test_kernels_build import build

    from ds4f.kernels import router as r

    types = dict(x_ptr="*bf16", w_ptr="*bf16", part_ptr="*fp32", cnt_ptr="*i32", bias_ptr="*fp32",
                 hash_ptr="*i32", tok_ptr="*i32", ids_ptr="*i32", wo_ptr="*fp32", scaling="fp32")
    consts = dict(K=6, KO=7, BLOCK_K=8, BLOCK_T=1, BLOCK_E=32, BLOCK_EA=256, CHUNK=256, NDS=16, HASH=False,
                  ROWS=False, NORM=True, PDL=True)
    for pre in (True, False):
        ptx = build(r._router_fused, types, dict(consts, PRE=pre), arch)["ptx"]
        wait = ptx.index("griddepcontrol.wait")
        first_load = ptx.index("ld.global")
        assert (first_load < wait) == pre, pre
