"""A TP rank loads and warms up like a single-process runner: `prepare` (runner choice, FastModel, one warmup) is
what build_runner runs unless it is handed a Prepared, and build_rank hands it one. Oracles: a counter on the warmup
step (CPU runs it too; it does nothing off CUDA) and the loaded weights themselves (packed-only experts for --runner
fast, dequantized for the reference runner that auto picks under TP)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import write_checkpoint

from ds4f.config import EngineConfig
from ds4f.distributed.parallel import ParallelConfig
from ds4f.distributed.rendezvous import connect_store, head_store
from ds4f.model.args import tiny_config
from ds4f.model.loader import load_model
from ds4f.runner import model_runner
from ds4f.runner.gpu.runner import FastRunner
from ds4f.runner.model_runner import ModelRunner, build_runner, prepare

KW = dict(device="cpu", dtype="bfloat16", kv_cache_memory=16 << 20, block_size=16, max_num_batched_tokens=32,
          max_model_len=256)


def tp_quant_config() -> dict[str, Any]:
    """Every rank cut of a quantized linear on its scale grid at TP 2 (fp8 128 x 128; MXFP4 32 along the input), so
    each rank keeps the checkpoint's packed tensors: wq_b / wo_a rows and wo_b columns split 256 -> 128, the routed
    experts' intermediate 64 -> 32. Hash routing and an indexer that keeps every entry leave no discrete choice for
    TP's bf16 rounding to flip (see tests/test_tp_fast.py)."""
    cfg = dict(tiny_config())
    cfg.update(vocab_size=1024, hidden_size=128, q_lora_rank=128, head_dim=128, qk_rope_head_dim=32,
               num_attention_heads=2, o_groups=2, o_lora_rank=128, moe_intermediate_size=64, index_topk=256)
    cfg["num_hash_layers"] = cfg["num_hidden_layers"]
    return cfg


def check_experts_packed(fm: Any, world: int) -> None:
    """Every layer's routed experts as the rank's MXFP4 bytes only: fused_moe_mxfp4 stacks, meta `weight`s, no bf16
    stack; the attention projections keep their fp8 bytes too."""
    a = fm.args
    E, D, inter = a.n_routed_experts, a.hidden_size, a.moe_intermediate_size // world
    for i, blk in enumerate(fm.model.layers):
        mx = fm.mx[i]
        assert mx is not None and fm.w13[i] is None and fm.w2[i] is None, i
        assert mx.nbytes() == E * (3 * inter * D // 2 + 3 * inter * D // 32)  # e2m1 nibbles + a UE8M0 byte per 32
        for ex in blk.ffn.experts:
            for lin in (ex.w1, ex.w3, ex.w2):
                assert lin.weight.is_meta and lin.packed_weight is not None and lin.packed_weight.dtype == torch.uint8
        for lin in (blk.attn.wq_b, blk.attn.wo_a, blk.attn.wo_b):
            assert lin.weight.is_meta and lin.packed_weight is not None


def count_warmups(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each call of model_runner.warm_up (the one step that warms a runner up) from now on, recorded and then run."""
    calls: list[Any] = []
    real = model_runner.warm_up

    def counted(prep: Any, config: Any) -> None:
        calls.append(prep)
        real(prep, config)

    monkeypatch.setattr(model_runner, "warm_up", counted)
    return calls


@pytest.fixture
def warm_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    return count_warmups(monkeypatch)


@pytest.mark.parametrize("runner", ["fast", "reference"])
def test_build_runner_given_prepared_does_not_warm_up_again(runner: str, warm_calls: list[Any]) -> None:
    config = EngineConfig(runner=runner, **KW)
    model = load_model(None, dtype=torch.bfloat16, keep_dequantized=runner != "fast")
    build_runner(config, model=model)  # single process: prepare inside, one warmup
    assert len(warm_calls) == 1
    prep = prepare(config, model)
    assert len(warm_calls) == 2 and warm_calls[-1] is prep and prep.fast == (runner == "fast")
    got, _, _ = build_runner(config, prepared=prep)
    assert len(warm_calls) == 2
    if runner == "fast":
        assert isinstance(got, FastRunner) and got.fm is prep.fm
    else:
        assert isinstance(got, ModelRunner) and got.model is model and prep.fm is None
    with pytest.raises(ValueError, match="not both"):
        build_runner(config, model=load_model(None, dtype=torch.bfloat16), prepared=prep)


def build_ranks(config: EngineConfig) -> list[Any]:
    """build_rank of ranks 0 and 1 in two threads of this process (gloo groups are per-object) -> their runners."""
    from ds4f.distributed.launch import build_rank

    pc = ParallelConfig.from_engine_config(config)
    head = head_store(pc)
    stores = [head, connect_store(pc, 1, "127.0.0.1", head.port)]
    out: list[Any] = [None, None]

    def run(rank: int) -> None:
        try:
            out[rank] = build_rank(config, pc, rank, stores[rank])[0]
        except BaseException as e:  # surfaced below
            out[rank] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    n = torch.get_num_threads()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        torch.set_num_threads(n)  # build_rank splits the cores between the CPU ranks
    for r in out:
        if isinstance(r, BaseException) or r is None:
            raise AssertionError(f"build_rank failed: {r!r}")
    return out


def test_tp_ranks_load_packed_and_warm_up_once(tmp_path: Path, warm_calls: list[Any]) -> None:
    d = write_checkpoint(tmp_path, tp_quant_config(), 3, quantized=True)
    cfg = dict(KW, model=str(d), tensor_parallel_size=2, distributed_timeout=60, join_timeout=60)
    runners = build_ranks(EngineConfig(runner="fast", **cfg))
    assert len(warm_calls) == 2 and {id(p.model) for p in warm_calls} == {id(r.model) for r in runners}
    for r in runners:
        assert isinstance(r, FastRunner)
        check_experts_packed(r.fm, 2)
    assert runners[0].num_blocks == runners[1].num_blocks
    # auto under TP: the reference runner (choose_runner), on dequantized weights
    warm_calls.clear()
    runners = build_ranks(EngineConfig(runner="auto", **cfg))
    assert len(warm_calls) == 2
    for r in runners:
        assert isinstance(r, ModelRunner)
        w = r.model.layers[0].ffn.experts[0].w2.weight
        assert not w.is_meta and w.dtype == torch.bfloat16 and w.shape[1] == 32
