"""③ --async-scheduling on CUDA: the same tokens as the synchronous engine with the decode steps replayed from CUDA
graphs (AHEAD ids fed into the captured input buffer on the device, the sampled ids copied to pinned memory and
collected after the next step's launch); the scenario of tests/test_async_scheduling.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.deepseek_v4 import Transformer, init_random_

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_async_scheduling import check_async_matches_sync
from test_fast_runner import all_hash

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]


def test_async_matches_sync_with_cuda_graphs() -> None:
    args = ModelArgs.from_hf(all_hash(tiny_config()))
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=0).to("cuda")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 9, 14, 3)]
    check_async_matches_sync(model, args, prompts, device="cuda")
