"""③ AsyncEngine: concurrent per-request async iterators (same tokens as the offline engine), delta outputs, abort
mid-stream, early exit aborts, validation errors before queueing, QueueFullError, stats, health, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from fake_model import FakeModel

from ds4f.config import EngineConfig
from ds4f.engine.async_engine import AsyncEngine, EngineDeadError
from ds4f.engine.llm import build_engine
from ds4f.engine.request import QueueFullError
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.sample.params import SamplingParams

ARGS = ModelArgs.from_hf(tiny_config())


def make(tokenizer, **kw) -> AsyncEngine:
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, max_model_len=512, kv_cache_memory=8 << 20,
                       max_num_batched_tokens=32, **kw)
    return AsyncEngine(engine=build_engine(cfg, model=FakeModel(ARGS), tokenizer=tokenizer))


def offline(tokenizer, prompts: list[list[int]], p: SamplingParams) -> list[list[int]]:
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, max_model_len=512, kv_cache_memory=8 << 20)
    eng = build_engine(cfg, model=FakeModel(ARGS), tokenizer=tokenizer)
    ids = [eng.add_request(x, p).request_id for x in prompts]
    final = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            final[o.request_id] = o.outputs[0].token_ids
    return [final[i] for i in ids]


def test_concurrent_streams_deltas_abort_and_shutdown(tokenizer) -> None:
    prompts = [[5 + i] * (3 + 20 * i) for i in range(4)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = offline(tokenizer, prompts, greedy)

    async def main() -> None:
        eng = make(tokenizer)
        assert eng.healthy and eng.max_model_len == 512 and eng.model_args is ARGS

        async def collect(rid: str, prompt: list[int], p: SamplingParams) -> list:
            return [o async for o in eng.generate(rid, prompt, p)]

        outs = await asyncio.gather(*(collect(str(i), x, greedy) for i, x in enumerate(prompts)))
        assert [o[-1].outputs[0].token_ids for o in outs] == want
        assert all(o[-1].finished and o[-1].outputs[0].finish_reason == "length" for o in outs)
        assert all(not x.finished for o in outs for x in o[:-1])

        delta = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind="delta")
        parts = await collect("d", prompts[2], delta)
        assert sum((x.outputs[0].token_ids for x in parts), []) == want[2]
        assert "".join(x.outputs[0].text for x in parts) == tokenizer.decode(want[2], skip_special_tokens=True)

        # abort mid-stream: the iterator ends with finish_reason "abort" and the cache is freed
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        got = []
        async for o in eng.generate("a", [7] * 50, long):
            got.append(o)
            if len(got) == 3:
                await eng.abort("a")
        assert got[-1].finished and got[-1].outputs[0].finish_reason == "abort" and len(got) < 50

        # leaving the loop early aborts the request
        async for _ in eng.generate("b", [7] * 50, long):
            break
        for _ in range(100):
            if eng.stats()["num_running"] == 0 and eng.stats()["num_waiting"] == 0:
                break
            await asyncio.sleep(0.02)
        st = eng.stats()
        assert (st["num_running"], st["num_waiting"], st["kv_usage"]) == (0, 0, 0.0)
        assert st["generation_tokens_total"] >= 4 * 12 + 12 and st["prompt_tokens_total"] >= sum(map(len, prompts))

        with pytest.raises(ValueError, match="the prompt has 512 tokens but max_model_len is 512"):
            await anext(eng.generate("long", [5] * 512, greedy))
        await eng.shutdown()
        assert not eng.healthy
        with pytest.raises(EngineDeadError):
            await anext(eng.generate("late", [5], greedy))

    asyncio.run(main())


def test_queue_full_and_engine_errors_surface(tokenizer) -> None:
    async def main() -> None:
        eng = make(tokenizer, max_waiting=1, max_num_seqs=1)
        p = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True)
        first = eng.generate("1", [5] * 10, p)
        await anext(first)  # "1" is running; the waiting queue is empty
        second = eng.generate("2", [5] * 10, p)
        task = asyncio.ensure_future(anext(second))
        await asyncio.sleep(0.05)  # "2" waits (one running sequence at most)
        with pytest.raises(QueueFullError):
            await anext(eng.generate("3", [5] * 10, p))

        def boom(out):
            raise RuntimeError("device lost")

        eng.engine.runner.execute = boom
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in first:
                pass
        with pytest.raises(EngineDeadError):
            await task
        assert not eng.healthy
        await eng.shutdown()

    asyncio.run(main())
