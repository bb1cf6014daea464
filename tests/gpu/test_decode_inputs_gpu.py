"""DecodeGraphs' host path on CUDA: the pinned staging buffer refilled while earlier steps' copies still wait behind a
sleep kernel (the event guard) leaves the static buffers exactly as FastCache.fill_decode, step after step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_decode_inputs import run_fill_vs_fill_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fill_matches_fill_decode_cuda() -> None:
    assert run_fill_vs_fill_decode("cuda", stall=lambda: torch.cuda._sleep(200_000)) > 20
    torch.cuda.synchronize()
