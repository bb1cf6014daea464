"""The indexer query kernel (ds4f/kernels/index_q.py) on CUDA at V4-Flash's indexer shape (64 heads of 128, 64 rope
channels), T = 1 / 4 / 16, bf16 and e4m3: bit for bit against the composition it replaces (rope_, the head weights'
scale, quant_heads_fp8: the e4m3 bytes too), eagerly and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.index_q import index_q, index_q_ref, triton

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and triton is not None), reason="needs CUDA + triton"),
]


def _case(t: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    mags = torch.logspace(-3, 3, 64, device="cuda")
    q = (torch.randn(t, 64, 128, device="cuda", generator=g) * mags[None, :, None]).bfloat16()
    w = torch.randn(t, 3 * 64, device="cuda", generator=g).bfloat16()[:, 64:128]  # a column view, as parts[6]
    ang = torch.rand(t, 32, device="cuda", generator=g) * 6.3
    return q, w, ang.cos(), ang.sin()


@pytest.mark.parametrize("fp8", [False, True])
def test_matches_the_composition_bit_for_bit(fp8: bool) -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    for t in (1, 4, 16):
        q, w, cos, sin = _case(t, g)
        q1, q2 = q.clone(), q.clone()
        zero = torch.full((4 * t * 256 + 2 * t + 5,), 7, dtype=torch.int32, device="cuda")  # a dirty hist buffer
        a, aw = index_q(q1, w, cos, sin, 64**-0.5, fp8, zero=zero[:-5])
        assert not zero[:-5].any() and (zero[-5:] == 7).all(), (t, fp8)  # zeroed by the launch, not past it
        b, bw = index_q_ref(q2, w, cos, sin, 64**-0.5, fp8)
        assert torch.equal(q1, q2) and torch.equal(aw, bw), (t, fp8)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if fp8 else a, b.view(torch.uint8) if fp8
                                                  else b), (t, fp8)
    q, w, cos, sin = _case(4, g)
    qg = q.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a, aw = index_q(qg, w, cos, sin, 64**-0.5, fp8)
    for _ in range(3):
        q.normal_()
        qg.copy_(q)
        graph.replay()
        torch.cuda.synchronize()
        q2 = q.clone()
        b, bw = index_q_ref(q2, w, cos, sin, 64**-0.5, fp8)
        assert torch.equal(aw, bw) and torch.equal(a.view(torch.uint8) if fp8 else a, b.view(torch.uint8) if fp8
                                                   else b)
