"""⑧ sampler on CUDA: the two-stage argmax at the V4-Flash vocab (what it takes for up to 16 rows) equals
torch.argmax, ties included; the exponential race over logits - log E keeps the sampling frequencies."""

from __future__ import annotations

import pytest
import torch

from ds4f.sample.params import SamplingParams
from ds4f.sample.sampler import Sampler, SamplingRequest, argmax

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("B", [1, 4, 16, 17])
def test_argmax_at_the_vocab_width(B: int) -> None:
    x = torch.randn(B, 129280, device="cuda")
    x[0, [5, 70000, 129279]] = 100.0  # a tie across pieces: the first wins
    x[-1] = float("-inf")
    x[-1, 129279] = 0.0
    assert torch.equal(argmax(x), x.argmax(-1))


def test_temperature_sampling_frequencies() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * 8188], device="cuda"))
    reqs = [SamplingRequest(SamplingParams(temperature=1.0), [], [])] * 2048
    toks = Sampler().tokens(logits.expand(2048, -1).contiguous(), reqs)
    freq = torch.bincount(toks, minlength=4)[:4].float() / 2048
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], device="cuda"), atol=0.04), freq
