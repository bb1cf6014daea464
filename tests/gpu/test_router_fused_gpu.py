"""The one-launch decode router (route_fused) on CUDA at V4-Flash widths (E = 256, D = 4096, top-6, shared id 256)
vs route_ref, captured in a CUDA graph and replayed twice on fresh inputs: the arrival counter must come back to 0."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

E, D, K, VOCAB = 256, 4096, 6, 1000


def _check(got: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
           h: torch.Tensor | None, ids: torch.Tensor, sh: int) -> None:
    from ds4f.kernels.router import route_ref

    gi, gw = got
    wi, ww = route_ref(x, w, b, h, ids, K, True, 2.5, sh)
    assert gi.shape == wi.shape and gi.dtype == torch.int32 and gw.dtype == torch.float32
    oi, oj = gi.long().sort(dim=1), wi.long().sort(dim=1)
    assert torch.equal(oi.values, oj.values)
    err = ((gw.gather(1, oi.indices) - ww.gather(1, oj.indices)).abs() / (ww.gather(1, oj.indices).abs() + 1)).max()
    assert err.item() <= 1e-5, err.item()
    if h is not None:
        assert torch.equal(gi[:, :K], h[ids].to(torch.int32))  # tid2eid's order
    else:  # descending scores + bias (to fp32 rounding of the two sum orders)
        sel = torch.nn.functional.softplus(x.float() @ w.float().T).sqrt() + b
        picked = sel.gather(1, gi[:, :K].long())
        assert torch.all(picked[:, 1:] <= picked[:, :-1] + 1e-6)
    if sh >= 0:
        assert torch.all(gi[:, K] == sh) and torch.all(gw[:, K] == 1.0)


@pytest.mark.parametrize("t", [1, 4, 16])
def test_route_fused_graph(t: int) -> None:
    from ds4f.kernels import router as r

    g = torch.Generator(device="cuda").manual_seed(t)
    w = (torch.randn(E, D, device="cuda", generator=g) / D**0.5).bfloat16()
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    tid = torch.rand(VOCAB, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    x = torch.empty(t, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.empty(t, device="cuda", dtype=torch.long)
    # hash layers: the hashed rows only (the default), or all scores as learned layers
    cases = [(b, h, sh, rows) for b, h, rows in ((bias, None, True), (None, tid, True), (None, tid, False))
             for sh in (-1, E)]

    def fill(seed: int) -> None:
        gg = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randn(t, D, device="cuda", generator=gg))
        ids.copy_(torch.randint(0, VOCAB, (t,), device="cuda", generator=gg))

    fill(0)
    for b, h, sh, rows in cases:  # eager (compiles outside the capture), the default route() too
        got = r.route_fused(x, w, b, h, ids, K, True, 2.5, sh, hash_rows=rows)
        _check(got, x, w, b, h, ids, sh)
        if rows and t <= r.FUSED_MAX_T:  # route() takes this path
            gi, gw = r.route(x, w, b, h, ids, K, True, 2.5, sh)
            assert torch.equal(gi, got[0]) and torch.equal(gw, got[1])
        assert int(r._counter(x.device)[0]) == 0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [r.route_fused(x, w, b, h, ids, K, True, 2.5, sh, hash_rows=rows) for b, h, sh, rows in cases]
    cnt = r._counter(x.device)
    for rep in range(2):
        fill(100 + rep)
        graph.replay()
        torch.cuda.synchronize()
        assert int(cnt[0]) == 0
        for (b, h, sh, _), got in zip(cases, outs):
            _check(got, x, w, b, h, ids, sh)
