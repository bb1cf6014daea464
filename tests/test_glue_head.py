"""⑤ runner glue, the head's input (glue.head_in: hc_head of each sequence's last-token streams + the final RMSNorm)
against Transformer.compute_logits' own composition: eager bit for bit, compiled (DS4F_COMPILE=force: what CUDA runs
by default) within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from ds4f.model.layers import RMSNorm
from ds4f.model.mhc import hc_head
from ds4f.runner.gpu import glue


def _case() -> tuple:
    g = torch.Generator().manual_seed(0)
    T, hc, D = 5, 4, 256
    streams = torch.randn(T, hc, D, generator=g).bfloat16()
    fn = torch.randn(hc, hc * D, generator=g) * 0.05
    scale, base = torch.rand(1, generator=g), torch.randn(hc, generator=g)
    norm = RMSNorm(D)
    norm.weight.data = torch.rand(D, generator=g) + 0.5
    return streams, torch.tensor([1, 4]), fn, scale, base, norm


@pytest.mark.parametrize("mode", ["0", "force"])
def test_head_in_is_hc_head_then_the_final_norm(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("DS4F_COMPILE", mode)
    streams, last, fn, scale, base, norm = _case()
    got = glue.head_in(streams, last, fn, scale, base, 1e-6, 1e-6, norm.weight, norm.eps)
    want = norm(hc_head(streams[last], fn, scale, base, 1e-6, 1e-6))
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == (2, 256)
    if mode == "0":
        assert torch.equal(got, want)
    else:  # fp32 sums in another order: at most one bf16 step apart (|x| < 4 here: 2^-6)
        assert (got.float() - want.float()).abs().max().item() <= 2**-6
        assert not torch.equal(got, torch.zeros_like(got))
