"""Memory plan: weights counted from the meta model equal what load_model actually holds (packed and dequantized,
TP 1 and 2), the capacity printed by build_runner is what the scheduler admits, and the plan adds up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from checkpoints import checkpoint_config, write_checkpoint

from ds4f.cache.manager import CacheLayout, KVCacheManager
from ds4f.config import EngineConfig
from ds4f.distributed.comm import Comm
from ds4f.model.args import ModelArgs, flash_config, tiny_config
from ds4f.model.loader import load_model
from ds4f.model.manifest import checkpoint_manifest
from ds4f.model.tp import per_rank_bytes
from ds4f.runner.memory_plan import GiB, main, model_bytes, plan_memory, weight_bytes
from ds4f.runner.model_runner import build_runner

# tiny with every TP=2 cut on the FP8 128-block grid (wo_a / wo_b: 2 x 128 rows; shared expert: 2 x 128 rows)
ALIGNED = {**tiny_config(), "o_lora_rank": 128, "moe_intermediate_size": 256}


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("mp") / "ckpt", ALIGNED, 3, quantized=True, shards=2)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("keep", [False, True])
def test_weight_bytes_equal_what_load_model_holds(aligned_dir: Path, world: int, keep: bool) -> None:
    kw = {"tp_rank": world - 1, "tp_world": world, "comm": Comm(world - 1, world, pg=object()) if world > 1 else None}
    model = load_model(str(aligned_dir), dtype=torch.bfloat16, keep_dequantized=keep, **kw)
    args = ModelArgs.from_hf(checkpoint_config(ALIGNED, quantized=True))
    assert weight_bytes(args, torch.bfloat16, world, keep) == model_bytes(model)


def test_flash_tp2_weights_match_checkpoint_split() -> None:
    """Second path: tp.per_rank_bytes over the checkpoint's own tensor sizes (norms stored bf16, held f32)."""
    args = ModelArgs.from_hf(flash_config())
    sizes = {n: s.nbytes for n, s in checkpoint_manifest(args).items()}
    want = per_rank_bytes(sizes, 2)
    got = weight_bytes(args, torch.bfloat16, 2)
    assert abs(got - want) < 0.01 * want
    assert got < 0.55 * sum(sizes.values())


def test_plan_adds_up_and_capacity_is_the_layout_plan() -> None:
    args = ModelArgs.from_hf(tiny_config())
    plan = plan_memory(args, dtype=torch.float32, max_num_seqs=4, max_num_batched_tokens=256, block_size=16,
                       kv_dtype="bfloat16", gpu_total=4 * GiB, gpu_memory_utilization=0.5, context=4096)
    assert sum(r.nbytes for r in plan.rows) == plan.usable
    layout = CacheLayout.from_model_args(args, 16, "bfloat16")
    assert (plan.num_blocks, plan.num_slots) == layout.plan(plan.kv_budget, 4)
    assert plan.row("KV pool").nbytes <= plan.kv_budget and plan.row("free").nbytes >= 0
    assert plan.fits(plan.max_kv_tokens) and not plan.fits(plan.max_kv_tokens + 1)
    assert f"KV capacity admitted: {plan.max_kv_tokens} tokens" in plan.table()
    small = plan_memory(args, dtype=torch.float32, gpu_total=2**20, context=4096)
    assert small.max_kv_tokens == 0 and not small.fits(1)


def test_cli_exit_code_says_whether_the_request_fits(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--model", "ds4f-tiny", "--dtype", "float32", "--kv-cache-dtype", "bfloat16", "--block-size", "16",
            "--max-num-seqs", "2", "--max-num-batched-tokens", "64"]
    assert main([*base, "--gpu-memory-gib", "2", "--request-tokens", "8192"]) == 0
    assert "8192-token request with its prefill peak: fits" in capsys.readouterr().out
    assert main([*base, "--gpu-memory-gib", "0.02", "--request-tokens", "8192"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_build_runner_prints_the_capacity_the_scheduler_admits(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = EngineConfig(device="cpu", dtype="float32", max_num_seqs=3, block_size=16, kv_cache_memory=8 << 20,
                       max_model_len=512)
    runner, _, _ = build_runner(cfg)
    err = capsys.readouterr().err
    m = re.search(r"KV capacity admitted: (\d+) tokens \((\d+) blocks of 16\), (\d+) sequence slots", err)
    assert m is not None, err
    admitted = KVCacheManager(runner.layout, runner.num_blocks, runner.num_slots)
    assert int(m.group(1)) == admitted.max_tokens_per_seq() and int(m.group(3)) == admitted.slots.num_blocks
    assert admitted.allocate("a", int(m.group(1))) and not admitted.allocate("b", 16 * 10**6)
    assert "weights" in err and "KV pool" in err


def test_gpu_budget_keeps_the_graph_pool_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # on CUDA the KV budget is what gpu_memory_utilization leaves after what is in use, the warmup peak and the
    # CUDA-graph pool's estimate (the offline plan's rule), so the runtime table's "free" row is not negative
    from ds4f.runner import model_runner as mr
    from ds4f.runner.memory_plan import GRAPH_TOKENS, activation_bytes, graph_reserve

    model = load_model(None, dtype=torch.float32, device="cpu")
    cfg = EngineConfig(device="cpu", dtype="float32", max_num_seqs=3)
    want = activation_bytes(model.args, min(3, GRAPH_TOKENS), 0, 1, torch.float32)
    assert graph_reserve(cfg, model, torch.device("cuda", 0)) == want > 0
    assert graph_reserve(cfg, model, torch.device("cpu")) == 0
    total, free, peak = 80 * GiB, 50 * GiB, 3 * GiB
    monkeypatch.setattr(mr.torch.cuda, "mem_get_info", lambda device: (free, total))
    monkeypatch.setattr(mr.torch.cuda, "max_memory_allocated", lambda device: 10 * GiB + peak)
    monkeypatch.setattr(mr.torch.cuda, "memory_allocated", lambda device: 10 * GiB)
    got = mr.kv_cache_budget(torch.device("cuda", 0), 0.9, None, 1, want)
    assert got == int(total * 0.9) - (total - free) - peak - want
    assert mr.kv_cache_budget(torch.device("cuda", 0), 0.9, 123, 1, want) == 123  # a fixed budget stays as given
