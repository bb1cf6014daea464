"""DS4F_SHARED_AT_AR on one GPU: rank 0 of a TP=2 group run alone (bench/bench_full.py's --tp-sim wiring: its weight
shards and kernels, a Comm whose wire does nothing), V4-Flash widths in the checkpoint's formats (4 layers: SWA, SWA,
CSA, HCA, the first three hash-routed; 16 experts, dummy weights), through the engine with CUDA-graph decode. With
the shared expert's output added at the MoE sublayer's all-reduce instead of in the routed down kernel, greedy tokens
and their logprobs are the same bits, and the deferred add ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ds4f.kernels import HAS_TRITON

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")]


def _run(monkeypatch: pytest.MonkeyPatch, on: bool) -> tuple[list, int]:
    from bench.bench_full import SimComm, model_dir
    from bench.common import IdsOnlyTokenizer
    from ds4f import SamplingParams
    from ds4f.config import EngineConfig
    from ds4f.distributed.comm import Comm
    from ds4f.engine.llm import build_engine
    from ds4f.model.loader import load_model

    monkeypatch.setenv("DS4F_SHARED_AT_AR", "1" if on else "0")
    adds = []
    real = Comm.all_reduce_add
    monkeypatch.setattr(Comm, "all_reduce_add", lambda self, x, e: adds.append(x.shape[0]) or real(self, x, e))
    cfg = EngineConfig.from_kwargs(model=model_dir(4, 16), load_format="dummy", runner="fast", kv_cache_dtype="fp8",
                                   dtype="bfloat16", max_model_len=512, max_num_seqs=4, gpu_memory_utilization=0.3)
    sim = load_model(cfg.model, dtype=torch.bfloat16, device="cuda", load_format="dummy", tp_rank=0, tp_world=2,
                     comm=SimComm(2), keep_dequantized=False)
    engine = build_engine(cfg, model=sim, tokenizer=IdsOnlyTokenizer())
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    reqs = [engine.add_request(list(range(100 + 13 * i, 100 + 13 * i + n)), sp) for i, n in enumerate((40, 7, 23))]
    while engine.has_unfinished_requests():
        engine.step()
    out = [(r.output_token_ids, [sorted((t, lp.logprob) for t, lp in d.items()) for d in r.logprobs or []])
           for r in reqs]
    del engine, sim
    torch.cuda.empty_cache()
    return out, len(adds)


def test_shared_at_ar_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    off, n_off = _run(monkeypatch, False)
    on, n_on = _run(monkeypatch, True)
    assert n_off == 0 and n_on > 0
    assert all(len(t) == 10 and len(lp) == 10 for t, lp in on)
    assert on == off
