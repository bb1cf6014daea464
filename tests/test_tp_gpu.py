"""TP on GPUs (NCCL): LLM(tensor_parallel_size=2) on two CUDA devices gives TP=1's greedy tokens (fp32, so only the
all-reduce order differs) and the same 2-per-layer collective count. Skipped without 2 GPUs."""

from __future__ import annotations

import pytest
import torch

from ds4f import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

KW = dict(device="cuda", dtype="float32", kv_cache_memory=256 << 20, block_size=16, max_num_batched_tokens=64,
          max_model_len=512)
PROMPTS = ["Hello, my name is", "The capital of France is a city that many people visit because of its museums"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_nccl_tp2_tokens_equal_tp1() -> None:
    ref = [o.outputs[0].token_ids for o in LLM(**KW).generate(PROMPTS, GREEDY)]
    llm = LLM(tensor_parallel_size=2, distributed_timeout=60, **KW)
    try:
        comm = llm.engine.runner.runner.model.tp_comm
        comm.reset_counts()
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        n_layers = llm.engine.model_args.num_hidden_layers
        steps = comm.counts["all_gather"]  # one per step that samples
        assert comm.counts["all_reduce"] >= 2 * n_layers * steps
        assert got == ref
    finally:
        llm.engine.runner.close()
