"""③ engine under cache pressure: with too few blocks for all requests, preemption happens, check_integrity holds
after every step, aborts mid-prefill and mid-decode free everything, every other request finishes with the same
tokens as when run alone (greedy and seeded sampling), and the pool is whole at the end. Randomized over seeds, on the
fake model (cheap math, real paged-cache traffic) so many steps fit in CI."""

from __future__ import annotations

import random

import pytest
import torch
from fake_model import FakeModel

from ds4f.config import EngineConfig
from ds4f.engine.engine import LLMEngine
from ds4f.engine.llm import build_engine
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.sample.params import SamplingParams

ARGS = ModelArgs.from_hf(tiny_config())
SLOT, BLOCK = 43008, 3328  # tiny layout, float32, block 16: bytes per sequence slot / per compressed block


def engine(tokenizer, kv_cache_memory: int, budget: int, max_num_seqs: int = 8) -> LLMEngine:
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, max_model_len=512, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget, kv_cache_memory=kv_cache_memory)
    eng = build_engine(cfg, model=FakeModel(ARGS), tokenizer=tokenizer)
    eng.check_integrity_each_step = True
    return eng


def workload(seed: int) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    reqs = []
    sizes = [rng.randint(250, 480) for _ in range(6)] + [rng.randint(2, 40) for _ in range(3)] + [1, 1, 1]
    rng.shuffle(sizes)
    for i, n in enumerate(sizes):
        prompt = [rng.randrange(2, 4096) for _ in range(n)]
        m = rng.randint(1, min(24, 511 - n))
        if i % 2:
            p = SamplingParams(temperature=0.8, top_k=50, seed=seed * 100 + i, max_tokens=m)
        else:
            p = SamplingParams(temperature=0.0, max_tokens=m)
        reqs.append((prompt, p))
    return reqs


def alone(tokenizer, reqs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    eng = engine(tokenizer, 64 << 20, budget=8192)
    outs = []
    for prompt, p in reqs:
        eng.add_request(prompt, p)
        last = None
        while eng.has_unfinished_requests():
            for o in eng.step():
                last = o
        outs.append(last.outputs[0].token_ids)
    return outs


@pytest.mark.parametrize("seed", range(8))
def test_preemption_and_aborts_keep_outputs(tokenizer, seed: int) -> None:
    reqs = workload(seed)
    ref = alone(tokenizer, reqs)
    # slots take half the budget: 3 slots and 38 blocks = 608 tokens for 3 running sequences of up to 474 tokens
    eng = engine(tokenizer, 6 * SLOT, budget=48, max_num_seqs=3)
    assert (eng.manager.blocks.num_blocks, eng.manager.slots.num_blocks) == (38, 3)
    rng = random.Random(seed)
    ids, final, aborted = [], {}, {}
    pending = list(enumerate(reqs))
    steps = 0
    while pending or eng.has_unfinished_requests():
        if pending and (steps % 3 == 0 or not eng.has_unfinished_requests()):  # staggered arrivals
            for _ in range(rng.randint(1, 3)):
                if pending:
                    i, (prompt, p) = pending.pop(0)
                    ids.append(eng.add_request(prompt, p, request_id=str(i)).request_id)
        for kind in ("prefill", "decode"):  # abort one request mid-prefill and one mid-decode
            if kind in aborted.values():
                continue
            for r in eng.scheduler.running:
                mid = (0 < r.num_computed_tokens < r.num_prompt_tokens) if kind == "prefill" else \
                    (len(r.output_token_ids) >= 2 and r.num_computed_tokens >= r.num_prompt_tokens)
                if mid:
                    (out,) = eng.abort_request([r.request_id])
                    assert out.finished and out.outputs[0].finish_reason == "abort"
                    aborted[r.request_id] = kind
                    final[r.request_id] = out
                    break
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
        steps += 1
        assert steps < 5000
    eng.manager.check_integrity()
    assert eng.manager.blocks.num_free == 38 and eng.manager.slots.num_free == 3
    assert eng.scheduler.num_preemptions > 0, "the workload should not fit without preemption"
    assert sorted(aborted.values()) == ["decode", "prefill"]
    for rid in ids:
        got = final[rid].outputs[0].token_ids
        want = ref[int(rid)]
        if rid in aborted:
            assert got == want[: len(got)]
        else:
            assert got == want, f"request {rid} differs after {eng.scheduler.num_preemptions} preemptions"
            assert final[rid].outputs[0].finish_reason == "length"


def test_over_long_prompt_and_full_queue_raise_before_queueing(tokenizer) -> None:
    from ds4f.engine.request import QueueFullError

    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, max_model_len=64, max_waiting=1,
                       kv_cache_memory=8 << 20)
    eng = build_engine(cfg, model=FakeModel(ARGS), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="the prompt has 64 tokens but max_model_len is 64"):
        eng.add_request(list(range(2, 66)))
    eng.add_request([5, 6, 7])
    with pytest.raises(QueueFullError):
        eng.add_request([5, 6, 7])
    assert eng.scheduler.num_waiting == 1
    with pytest.raises(ValueError, match="max-model-len 10000"):
        build_engine(EngineConfig(device="cpu", dtype="float32", block_size=16, max_model_len=10000,
                                  kv_cache_memory=8 * SLOT), model=FakeModel(ARGS), tokenizer=tokenizer)
    _ = torch  # keeps the torch import used for type checkers
