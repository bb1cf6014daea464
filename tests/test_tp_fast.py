"""TP=2 on the fast path (FastModel + FastRunner on each rank, two gloo ranks, bf16): the same forward as TP=1 up to
bf16 rounding of the split sums. Oracle: TP=1 fast runner on the same prompts. Where the two runs have produced the
same tokens so far, the top token's logprob agrees within bf16 noise; the first differing token (if any) is at a
TP=1 near-tie. A missing or doubled all-reduce moves every logprob by far more than that from the first step.
Every MoE layer is hash-routed and the indexer keeps every entry, so no discrete choice (an expert, a top-k entry)
can flip on rounding: those are the reference model's business (tests/test_tp_llm.py, fp32). On an FP8 + MXFP4
checkpoint each rank loads packed-only and warms up once, as TP=1 does (tests/test_build_rank.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from checkpoints import write_checkpoint
from test_build_rank import check_experts_packed, count_warmups, tp_quant_config

from ds4f import LLM, SamplingParams
from ds4f.model.args import tiny_config

KW = dict(device="cpu", dtype="bfloat16", kv_cache_memory=16 << 20, block_size=16, max_num_batched_tokens=32,
          max_model_len=256, runner="fast")
PROMPTS = ["Hello, my name is", "The capital of France is a city that many people visit because of its museums",
           [5, 17, 99, 1024, 77, 3, 4096, 12, 8, 8, 8, 60000, 2, 19, 128000, 42, 43, 44, 45, 46, 47, 48, 49, 50],
           "Tensor parallel splits heads"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
ID_PROMPTS = [[5, 17, 99, 1000, 77, 3, 409, 12, 8, 8, 8, 600, 2, 19, 128, 42, 43, 44, 45, 46, 47, 48, 49, 50],
              [7, 8, 9], list(range(300, 337))]  # within tp_quant_config's 1024-token vocab
BF16_LOGIT_NOISE = 0.1  # two bf16 ulps at the tiny model's logit scale (|logit| < 8: ulp <= 2^-5... 2^-4)


def test_fast_runner_tp2_matches_tp1(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.update(num_hash_layers=cfg["num_hidden_layers"], index_topk=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    kw = dict(KW, model=str(tmp_path), load_format="dummy", seed=0)
    ref = LLM(**kw).generate(PROMPTS, PARAMS)
    llm = LLM(tensor_parallel_size=2, distributed_timeout=60, **kw)
    try:
        assert type(llm.engine.runner).__name__ == "TPExecutor"
        got = llm.generate(PROMPTS, PARAMS)
    finally:
        llm.engine.runner.close()
    assert_tp_matches(ref, got)


def assert_tp_matches(ref: list[Any], got: list[Any]) -> None:
    compared = 0
    for r, g in zip(ref, got):
        rt, gt = r.outputs[0].token_ids, g.outputs[0].token_ids
        rl, gl = r.outputs[0].logprobs, g.outputs[0].logprobs
        for i, (a, b) in enumerate(zip(rt, gt)):
            top = sorted((x.logprob for x in rl[i].values()), reverse=True)
            if a != b:
                assert top[0] - top[1] < BF16_LOGIT_NOISE, (i, top, rt, gt)
                break
            assert abs(rl[i][a].logprob - gl[i][b].logprob) < BF16_LOGIT_NOISE, (i, rl[i], gl[i])
            compared += 1
    assert compared >= len(ref) * PARAMS.max_tokens // 2, compared


def test_fast_runner_tp2_packed_matches_tp1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    warm_calls = count_warmups(monkeypatch)
    d = write_checkpoint(tmp_path, tp_quant_config(), 3, quantized=True)
    kw = dict(KW, model=str(d))
    ref = LLM(**kw).generate(ID_PROMPTS, PARAMS)
    assert len(warm_calls) == 1
    llm = LLM(tensor_parallel_size=2, distributed_timeout=60, **kw)
    try:
        assert len(warm_calls) == 2  # rank 0 (this process) warmed up once; rank 1 runs tests/test_build_rank.py's
        check_experts_packed(llm.engine.runner.runner.fm, 2)
        got = llm.generate(ID_PROMPTS, PARAMS)
    finally:
        llm.engine.runner.close()
    assert_tp_matches(ref, got)


def test_sp_indexer_matches_replicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DS4F_SP_INDEXER=1: each rank scores and ranks half of a prefill chunk's tokens, one all-gather joins the picks;
    # the forward is the replicated indexer's (same scores per token, same top-k) at TP=2: equal tokens, logprobs
    # equal to float noise (a pick from the wrong token or rank moves them by far more)
    cfg = tiny_config()
    cfg.update(num_hash_layers=cfg["num_hidden_layers"], index_topk=8)  # 64 entries > 8: the indexer path
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    kw = dict(KW, model=str(tmp_path), load_format="dummy", seed=0, tensor_parallel_size=2, distributed_timeout=60)
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate((90, 61, 120))]  # up to 30 visible
    runs, gathers = [], []
    for sp in ("0", "1"):
        monkeypatch.setenv("DS4F_SP_INDEXER", sp)
        monkeypatch.setenv("DS4F_SP_INDEXER_MIN_T", "16")
        llm = LLM(**kw)
        try:
            runs.append(llm.generate(prompts, PARAMS))
            gathers.append(llm.engine.runner.runner.model.tp_comm.counts["all_gather"])
        finally:
            llm.engine.runner.close()
    assert gathers[1] > gathers[0]  # the split indexer ran (one all-gather per CSA layer of each long chunk)
    for a, b in zip(*runs):
        ra, rb = a.outputs[0], b.outputs[0]
        assert ra.token_ids == rb.token_ids
        for la, lb, tok in zip(ra.logprobs, rb.logprobs, ra.token_ids):
            assert abs(la[tok].logprob - lb[tok].logprob) < 1e-3
