"""Shared pytest fixtures: one torch intra-op thread for the whole suite, and the real tokenizer loaded once."""

from __future__ import annotations

from collections.abc import Iterator

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


# The seed recipe's parser flags: with them tool_choice "auto" is accepted, as in vLLM.
SEED_SERVE_ARGS = "--tool-call-parser deepseek_v4 --enable-auto-tool-choice --reasoning-parser deepseek_v4"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ds4f serve` on the built-in tiny model in a subprocess, shared by the client tests (bench, eval, chat)."""
    from ds4f.tools.endpoint import LocalServer

    log = tmp_path_factory.mktemp("srv") / "server.log"
    with LocalServer(None, SEED_SERVE_ARGS, log_path=log, startup_timeout=300) as srv:
        yield srv.base_url
