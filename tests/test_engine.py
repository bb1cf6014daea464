"""③ engine on the real tiny model: 16 requests of 1..3000 tokens run together with a 64-token step budget (prefills
chunked and interleaved with decodes) give the same greedy tokens as each request alone (one unchunked prefill) and as
HF transformers' greedy continuation with the same weights (tests/hf_ref.py)."""

from __future__ import annotations

import pytest
import torch
from hf_ref import hf_logits, hf_model_like

from ds4f.config import EngineConfig
from ds4f.engine.engine import LLMEngine
from ds4f.engine.llm import build_engine
from ds4f.engine.outputs import SchedulerOutput
from ds4f.model.loader import load_model
from ds4f.sample.params import SamplingParams

LENGTHS = [3000, 700, 257, 130, 64, 40, 33, 17, 16, 15, 9, 8, 5, 3, 2, 1]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return load_model(None, dtype=torch.float32)


def make_engine(model: torch.nn.Module, tokenizer, budget: int) -> LLMEngine:
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, max_num_batched_tokens=budget,
                       kv_cache_memory=4 << 20, max_model_len=4096)
    eng = build_engine(cfg, model=model, tokenizer=tokenizer)
    eng.check_integrity_each_step = True
    return eng


def run_all(eng: LLMEngine, reqs: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    ids = [eng.add_request(p, sp).request_id for p, sp in reqs]
    final = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    return [final[r] for r in ids]


def test_batched_chunked_equals_alone_equals_hf(tiny: torch.nn.Module, tokenizer) -> None:
    g = torch.Generator().manual_seed(1)
    reqs = [(torch.randint(2, 129280, (n,), generator=g).tolist(),
             SamplingParams(temperature=0.0, max_tokens=1 + i % 4, ignore_eos=True)) for i, n in enumerate(LENGTHS)]

    eng = make_engine(tiny, tokenizer, budget=64)
    steps: list[SchedulerOutput] = []
    execute = eng.runner.execute
    eng.runner.execute = lambda out: (steps.append(out), execute(out))[1]
    together = run_all(eng, reqs)
    assert eng.manager.blocks.num_free == eng.manager.blocks.num_blocks
    # the step budget really chunked the long prompts and mixed decodes with prefill chunks
    assert max(s.num_batched_tokens for s in steps) == 64
    assert sum(1 for s in steps for x in s.seqs if x.req_id == "0") >= 3000 // 64
    assert any(any(len(x.token_ids) == 1 and x.start_pos > 0 for x in s.seqs)
               and any(len(x.token_ids) > 1 for x in s.seqs) for s in steps)

    alone_eng = make_engine(tiny, tokenizer, budget=8192)
    alone = [run_all(alone_eng, [r])[0] for r in reqs]
    assert together == alone

    hf = hf_model_like(tiny)
    for (prompt, sp), out in zip(reqs, together):
        assert len(out) == sp.max_tokens
        # greedy teacher forcing: HF's argmax after prompt + out[:k] must be out[k] for every k
        logits = hf_logits(hf, prompt + out[:-1])[len(prompt) - 1:]
        assert logits.argmax(-1).tolist() == out, f"prompt of {len(prompt)} tokens"


def test_preempted_requests_resume_identically_on_the_real_model(tiny: torch.nn.Module, tokenizer) -> None:
    g = torch.Generator().manual_seed(2)
    reqs = []
    for i, n in enumerate([200, 220, 190, 230, 20, 210]):
        p = SamplingParams(temperature=0.0, max_tokens=25, ignore_eos=True) if i % 2 else \
            SamplingParams(temperature=0.9, top_k=40, seed=7 + i, max_tokens=25, ignore_eos=True)
        reqs.append((torch.randint(2, 129280, (n,), generator=g).tolist(), p))
    # slots take half the budget: 3 slots + 38 blocks of 16 = 608 tokens for 3 running sequences of up to 255 tokens
    slot = 43008
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, max_num_batched_tokens=48, max_num_seqs=3,
                       kv_cache_memory=6 * slot, max_model_len=256)
    eng = build_engine(cfg, model=tiny, tokenizer=tokenizer)
    eng.check_integrity_each_step = True
    assert (eng.manager.blocks.num_blocks, eng.manager.slots.num_blocks) == (38, 3)
    together = run_all(eng, reqs)
    assert eng.scheduler.num_preemptions > 0
    assert eng.manager.blocks.num_free == 38
    alone_eng = make_engine(tiny, tokenizer, budget=8192)
    assert together == [run_all(alone_eng, [r])[0] for r in reqs]
