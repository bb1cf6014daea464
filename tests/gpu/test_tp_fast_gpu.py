"""TP=2 on the fast path with CUDA graphs (two GPUs, NCCL): rank 0 samples from its decode-graph replays while rank 1
runs the same steps from the broadcast messages (worker forward_step: graph replays, no logits gathered, packed
DecodeInputs); tokens and logprobs follow the TP=1 fast runner on the same prompts up to bf16 noise (the oracle and
tolerance of tests/test_tp_fast.py). Skipped without 2 GPUs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_tp_fast import KW, PARAMS, PROMPTS, assert_tp_matches

from ds4f import LLM
from ds4f.model.args import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]


def test_fast_graphs_tp2_matches_tp1(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.update(num_hash_layers=cfg["num_hidden_layers"], index_topk=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    kw = dict(KW, device="cuda", model=str(tmp_path), load_format="dummy", seed=0)
    ref_llm = LLM(**kw)
    ref = ref_llm.generate(PROMPTS, PARAMS)
    assert ref_llm.engine.runner.num_graph_steps > 0
    del ref_llm
    torch.cuda.empty_cache()
    llm = LLM(tensor_parallel_size=2, distributed_timeout=120, **kw)
    try:
        local = llm.engine.runner.runner
        assert type(local).__name__ == "FastRunner" and local.graphs is not None
        got = llm.generate(PROMPTS, PARAMS)
        assert local.num_graph_steps > 0
    finally:
        llm.engine.runner.close()
    assert_tp_matches(ref, got)
