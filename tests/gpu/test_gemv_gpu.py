"""Decode GEMV (ds4f/kernels/gemv.py) on CUDA: every projection shape of gemv.CONFIGS (wq_b, the grouped wo_a, wo_b,
the stacked SWA / HCA / CSA input projections, the indexer's wq_b, the head) at T = 1, 4, 16 through linear /
grouped_linear against fp32 math on the same bf16 inputs (and no farther from it than cuBLAS is), then inside a
CUDA graph: replays with new inputs, and a many-way K split replayed until any race in the last-arriving
reduction would show (its fixed summation order makes every replay bit-identical)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ds4f.kernels import arrival, gemv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and gemv.triton is not None), reason="needs CUDA + triton"),
]

TOL = 4e-3  # ‖out - ref‖ / ‖ref‖: fp32 sums rounded once to bf16 (2^-9 per element at worst)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(name: str, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    (n, k, groups), _ = gemv.CONFIGS[name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).bfloat16()
    x = torch.randn(t, k * groups, device="cuda", generator=g).bfloat16()
    return x, (w.view(groups, n // groups, k) if groups > 1 else w), groups


def _call(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    return gemv.grouped_linear(x, w) if groups > 1 else gemv.linear(x, w)


def _want(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    if groups > 1:
        return torch.einsum("tgk,grk->tgr", x.view(x.shape[0], groups, -1).float(), w.float()).flatten(1)
    return x.float() @ w.float().t()


def _cublas(x: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    return gemv.grouped_bmm(x, w) if groups > 1 else F.linear(x, w)


@pytest.mark.parametrize("name", list(gemv.CONFIGS))
def test_shapes_match_fp32(name: str) -> None:
    for t in (1, 4, 16):
        x, w, groups = _case(name, t, seed=t)
        with torch.no_grad():
            out = _call(x, w, groups)
        want = _want(x, w, groups)
        assert out.shape == want.shape and out.dtype == torch.bfloat16
        err, err_cublas = _rel(out, want), _rel(_cublas(x, w, groups), want)
        assert err < TOL and err <= 2 * err_cublas + 1e-4, (name, t, err, err_cublas)
        assert (out.float() - want).abs().max() <= 2e-2 * want.abs().max() + 1e-3, (name, t)


@pytest.mark.parametrize("cfg", [None, (16, 64, 16, 4, 3), (64, 128, 4, 8, 4)])
def test_cuda_graph_replays_and_split_counters(cfg: tuple[int, int, int, int, int] | None) -> None:
    """The table configs of WO_B, W_IN_SWA (K splits) and the grouped WO_A, or a forced config on WO_B: captured
    once, replayed with fresh inputs; each replay matches fp32 math and, for one input, is bit-identical."""
    names = ["WO_B", "W_IN_SWA", "WO_A"] if cfg is None else ["WO_B"]
    cases = [_case(nm, 4, seed=10 + i) for i, nm in enumerate(names)]

    def step() -> list[torch.Tensor]:
        if cfg is None:
            return [_call(x, w, g) for x, w, g in cases]
        x, w, _ = cases[0]
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
        gemv.launch(x, w, out, cfg)
        return [out]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        step()  # compile, allocate the tile counters outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        outs = step()
    for rep in range(3):
        for x, _, _ in cases:
            x.copy_(torch.randn_like(x, dtype=torch.float32).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        for (x, w, g), out in zip(cases, outs):
            assert _rel(out, _want(x, w, g)) < TOL, (rep, x.shape, w.shape)
    first = [o.clone() for o in outs]
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    for o, f in zip(outs, first):
        assert torch.equal(o, f)
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("gemv")), "a split left its tile counter non-zero"


def test_fallbacks() -> None:
    """T > 16, fp32 and a non-unit inner stride take F.linear itself."""
    x, w, _ = _case("IDX_WQ_B", 17, seed=3)
    assert torch.equal(gemv.linear(x, w), F.linear(x, w))
    xf, wf = x[:2].float(), w.float()
    assert torch.equal(gemv.linear(xf, wf), F.linear(xf, wf))
    xs = torch.randn(2, 2 * w.shape[1], device="cuda").bfloat16()[:, ::2]
    assert torch.equal(gemv.linear(xs, w), F.linear(xs, w))


def test_pdl_chain_in_graph_matches_plain_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch (ds4f.kernels.pdl): a chain of GEMVs, each reading the one before's output, in
    one CUDA graph. With PDL a launch starts (and loads its first W tile) before the one before has finished; every
    replay must still equal the chain launched plainly (same tiles, same summation order: bit-identical)."""
    from ds4f.kernels import pdl

    if not pdl.on(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+")
    g = torch.Generator(device="cuda").manual_seed(7)
    dims = [4096, 1536, 4096, 2560, 4096, 8192, 4096]  # split-K tiles (1536, 2560 rows) and full-K ones
    ws = [(torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).bfloat16() for k, n in zip(dims, dims[1:])]
    x = torch.randn(4, dims[0], device="cuda", generator=g).bfloat16()

    def chain() -> torch.Tensor:
        y = x
        for w in ws * 3:
            y = gemv.linear(y, w)
        return y

    with torch.no_grad():
        monkeypatch.setattr(pdl, "ENABLED", False)
        plain = chain()
        monkeypatch.setattr(pdl, "ENABLED", True)
        chain()  # compile + allocate the counters outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        for _ in range(20):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, plain)
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("gemv"))


def test_linear_norm_matches_the_norm_then_the_projection() -> None:
    """gemv.linear_norm (q_norm inside wq_b's GEMV) at the WQ_B shape, T = 1, 4, 16: against the reference norm's
    bf16 rows times W in fp32, no farther from it than the unfused path (norm launch + Triton / cuBLAS GEMV)."""
    (n, k, _), _ = gemv.CONFIGS["WQ_B"]
    g = torch.Generator(device="cuda").manual_seed(3)
    w = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).bfloat16()
    gw = 1 + torch.randn(k, device="cuda", generator=g) / 4
    for t in (1, 4, 16):
        xb = (5 * torch.randn(t, 3 * k, device="cuda", generator=g)).bfloat16()
        x = xb[:, k: 2 * k]  # a column view, as the stacked input projection hands it out
        with torch.no_grad():
            out = gemv.linear_norm(x, gw, 1e-6, w)
            unfused = F.linear(gemv.rms_norm_ref(x, gw, 1e-6), w)
        want = gemv.rms_norm_ref(x, gw, 1e-6).float() @ w.float().t()
        err, err_unfused = _rel(out, want), _rel(unfused, want)
        assert err < TOL and err <= 2 * err_unfused + 1e-4, (t, err, err_unfused)
