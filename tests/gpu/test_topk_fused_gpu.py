"""The one-launch radix top-k (ds4f.kernels.topk_radix._topk_fused: four digit passes and the compaction with the
row's programs meeting at a barrier) against the five-launch passes over the same bodies, on CUDA at the 1M decode
shape (L = 262,144, k = 512): T = 1, 4, 32 rows of mixed valid lengths (past and below the one-program bound, 0),
rows of many tied scores; eager, then 24 calls on distinct scores captured in one CUDA graph and replayed 4 times
(a race at a barrier would show as a wrong pick somewhere). The picks' values as sets (a tied k-th may take another
subset), the -1 padding, and the barrier counters back at zero after every call."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON, arrival, topk_indices

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

K, L = 512, 262144


def _same(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> None:
    for r in range(s.shape[0]):
        x, y = a[r][a[r] >= 0].long(), b[r][b[r] >= 0].long()
        assert x.numel() == y.numel() and x.unique().numel() == x.numel(), r
        assert torch.equal(s[r, x].sort().values, s[r, y].sort().values), r
        assert (a[r][x.numel():] == -1).all(), r


@pytest.mark.parametrize("T", [1, 4, 32])
def test_fused_matches_passes(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from ds4f.kernels import topk_radix

    monkeypatch.setattr(topk_radix, "FUSED", True)  # opt-in (DS4F_TOPK_FUSED=1)
    assert topk_radix.fused_cap(torch.device("cuda")) > 0
    g = torch.Generator(device="cuda").manual_seed(T)
    n = 24
    base = torch.randn(n, T, L, device="cuda", generator=g)
    base[:, T // 2:] = (base[:, T // 2:] * 8).round() / 8  # the upper rows: many ties at the k-th place
    lens = [L, 100000, 9000, 8193, 300, 0, L - 1, 65536]
    vl = torch.tensor([lens[r % len(lens)] for r in range(T)], dtype=torch.int32, device="cuda")
    cols = torch.arange(L, device="cuda")[None, :] >= vl.long()[:, None]
    base.masked_fill_(cols[None], float("-inf"))

    def bars_zero() -> bool:
        return all(int(b.abs().sum()) == 0 for b in arrival.buffers("topk_fused"))

    fused = topk_indices(base[0], K, valid_len=vl)
    assert bars_zero()
    monkeypatch.setattr(topk_radix, "FUSED", False)
    passes = [topk_indices(base[i], K, valid_len=vl) for i in range(n)]
    monkeypatch.setattr(topk_radix, "FUSED", True)
    _same(fused, passes[0], base[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [topk_indices(base[i], K, valid_len=vl) for i in range(n)]
    for _ in range(4):
        for o in outs:
            o.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert bars_zero()
        for i in range(n):
            _same(outs[i], passes[i], base[i])
