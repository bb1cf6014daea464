"""③ --async-scheduling (LLMEngine._step_async, Scheduler.schedule_ahead, FastRunner.launch / collect) on CPU: the
same tokens as the synchronous engine on the same weights, for greedy, seeded random, stop-token, min_tokens,
logprobs (run synchronously) and queued requests; the ahead steps really run (their ids fed from the step before);
aborts and finishes with a step in flight leak no cache; TP=2 over gloo feeds every rank rank 0's ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_fast_runner import EagerDecodeBuffers, StubTokenizer, all_hash

from ds4f.cache.manager import CacheLayout
from ds4f.config import EngineConfig
from ds4f.engine.engine import LLMEngine
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.deepseek_v4 import Transformer, init_random_
from ds4f.runner.gpu.runner import FastRunner, fast_model
from ds4f.sample.params import SamplingParams
from ds4f.sample.sampler import Sampler

BLOCK, SLOTS, MAX_LEN = 16, 3, 96


def _engine(model: Any, args: ModelArgs, async_scheduling: bool | None, buckets: tuple[int, ...] = (),
            device: str = "cpu") -> LLMEngine:
    """CUDA: the decode steps replay CUDA graphs (the AHEAD ids fed into the captured input buffer)."""
    layout = CacheLayout.from_model_args(args, BLOCK, "bfloat16")
    runner = FastRunner(fast_model(model, MAX_LEN, BLOCK), layout, 12, SLOTS, Sampler(args.eos_token_id), device,
                        MAX_LEN, 32)
    if buckets:  # the decode-graph path's static buffers, run eagerly (the AHEAD ids through DecodeGraphs' feed)
        runner.graphs = EagerDecodeBuffers(runner.fm, runner.cache, buckets)
    config = EngineConfig(device=device, dtype="bfloat16", block_size=BLOCK, max_num_seqs=SLOTS,
                          max_num_batched_tokens=32, max_model_len=MAX_LEN, runner="fast",
                          async_scheduling=async_scheduling)
    engine = LLMEngine(config, runner, StubTokenizer(), args, MAX_LEN)
    engine.check_integrity_each_step = True
    return engine


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
         abort_at: tuple[int, int] | None = None) -> list[list[int]]:
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if abort_at is not None and steps == abort_at[0]:
            engine.abort_request([reqs[abort_at[1]].request_id])
    m = engine.manager
    m.check_integrity()
    assert m.blocks.num_free == m.blocks.num_blocks and m.slots.num_free == m.slots.num_blocks, "leaked cache"
    return [list(r.output_token_ids) for r in reqs]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, ModelArgs, list[list[int]]]:
    args = ModelArgs.from_hf(all_hash(tiny_config()))
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, args.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 9, 14, 3)]
    return model, args, prompts


@pytest.mark.parametrize("buckets", [(), (2, 4)])
def test_async_matches_sync(tiny, buckets) -> None:
    check_async_matches_sync(*tiny, buckets)


def check_async_matches_sync(model: Any, args: ModelArgs, prompts: list[list[int]], buckets: tuple[int, ...] = (),
                             device: str = "cpu") -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    base = _run(_engine(model, args, False, buckets, device), prompts, [greedy] * 5)
    # a stop token the greedy run emits at its 5th token: that request finishes with the next step in flight
    params = [SamplingParams(temperature=0.0, max_tokens=14, stop_token_ids=[base[0][4]]),
              SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, min_tokens=6, ignore_eos=True),
              greedy,  # queued behind three slots: admitted mid-decode
              SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, ignore_eos=True)]  # runs synchronously
    want = _run(_engine(model, args, False, buckets, device), prompts, params)
    eng = _engine(model, args, True, buckets, device)
    got = _run(eng, prompts, params)
    assert got == want
    assert len(got[0]) <= 5 and got[0][-1] == base[0][4]  # the stop token ended it
    assert eng.runner.num_ahead_steps > 0  # few here: a logprobs, a min_tokens or a queued request holds them back
    assert not _engine(model, args, False, device=device).async_scheduling and eng.async_scheduling
    assert _engine(model, args, None, device=device).async_scheduling  # the default in one process: on
    # steady decode of plain requests: every step but the first decode of each batch goes ahead
    plain = [greedy, params[1], greedy]
    want = _run(_engine(model, args, False, buckets, device), prompts[:3], plain)
    eng = _engine(model, args, True, buckets, device)
    assert _run(eng, prompts[:3], plain) == want
    assert eng.runner.num_ahead_steps >= 9, eng.runner.num_ahead_steps
    # five plain requests over three slots: steps go ahead while two wait (none admissible until a slot frees)
    want = _run(_engine(model, args, False, buckets, device), prompts, [greedy] * 5)
    eng = _engine(model, args, True, buckets, device)
    assert _run(eng, prompts, [greedy] * 5) == want
    assert eng.runner.num_ahead_steps >= 18, eng.runner.num_ahead_steps  # 23 measured here


def test_abort_with_a_step_in_flight(tiny) -> None:
    model, args, prompts = tiny
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = _run(_engine(model, args, False), prompts[:2], [sp, sp])
    eng = _engine(model, args, True)
    got = _run(eng, prompts[:2], [sp, sp], abort_at=(8, 0))  # past the prefills: a step is launched ahead
    assert eng.runner.num_ahead_steps > 0
    assert got[1] == want[1] and 0 < len(got[0]) < 20 and got[0] == want[0][: len(got[0])]


def test_schedule_ahead_goes_only_where_the_next_step_is_known(tiny) -> None:
    model, args, prompts = tiny
    eng = _engine(model, args, True)
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    req = eng.add_request(prompts[0], sp)
    eng.step()  # the prefill chunk: nothing goes ahead of a prompt step
    assert eng._ahead is None and len(req.output_token_ids) == 1
    eng.step()  # decodes token 2 and launches token 3's step before collecting it
    assert eng._ahead is not None and len(req.output_token_ids) == 2
    eng.step()  # token 3 is max_tokens: no step goes ahead of it
    assert eng._ahead is None and req.finished and not eng.has_unfinished_requests()
    assert eng.runner.num_ahead_steps == 1
    # a waiting request holds the next step back until it is admitted
    r1 = eng.add_request(prompts[1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng._ahead is not None
    eng.add_request(prompts[2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    eng.step()  # collects the ahead step; the waiting request blocks the next one
    assert eng._ahead is None
    while eng.has_unfinished_requests():
        eng.step()
    assert len(r1.output_token_ids) == 8


def test_tp2_async_matches_sync(tmp_path: Path) -> None:
    from ds4f import LLM

    cfg = tiny_config()
    cfg.update(num_hash_layers=cfg["num_hidden_layers"], index_topk=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    kw = dict(model=str(tmp_path), load_format="dummy", seed=0, device="cpu", dtype="bfloat16",
              kv_cache_memory=16 << 20, block_size=16, max_num_batched_tokens=32, max_model_len=256, runner="fast",
              tensor_parallel_size=2, distributed_timeout=60)
    prompts = [[5, 17, 99, 1000, 77, 3], [7, 8, 9], list(range(300, 320))]
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)]
    outs = []
    for async_scheduling in (False, None):  # None (the default): on under TP too
        llm = LLM(async_scheduling=async_scheduling, **kw)
        try:
            assert type(llm.engine.runner).__name__ == "TPExecutor"
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
            on = async_scheduling is None
            assert llm.engine.async_scheduling is on
            assert (llm.engine.runner.runner.num_ahead_steps >= 5) is on  # rank 0's fast runner
        finally:
            llm.engine.runner.close()
    assert outs[0] == outs[1]
