"""Shared pytest fixtures: one torch intra-op thread for the whole suite, and the real tokenizer loaded once."""

from __future__ import annotations

import pytest
import torch

from ds4f.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # NOTE: the suite's shapes are tiny; on 2 shared cores intra-op threads spin against each other
    # (index_add_ measured ~100x slower with 2 threads while other processes run)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return load_tokenizer()
