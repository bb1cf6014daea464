"""⑤ FastRunner behind the engine on CUDA: eager prefill / mixed steps and graph-replayed decode steps over the
engine's block tables and slots, every step's logits against the fp32 reference runner fed the same steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.model.args import tiny_config
from ds4f.runner.gpu import pools
from ds4f.runner.gpu.check import mid_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_fast_runner import all_hash, check_dual, run_dual

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8"])
def test_tiny_graphs_preemption(kv_dtype: str) -> None:
    # as tests/test_fast_runner.py on CPU (chunked prefill, mixed steps, preemption), decode steps replayed from
    # the CUDA graphs (buckets 1, 2, 4 for 3 slots); fp8: tolerances as the CPU fp8 test
    if kv_dtype == "fp8" and not hasattr(pools, "KV_DTYPES"):
        pytest.skip("FastCache without fp8 pools")
    engine, dual, outs = run_dual(all_hash(tiny_config()), "cuda", [3, 41, 9, 70, 17, 33], block_size=16,
                                  num_blocks=9, num_slots=3, max_num_batched_tokens=24, max_model_len=96,
                                  max_tokens=10, kv_dtype=kv_dtype)
    fp8 = kv_dtype == "fp8"
    check_dual(engine, dual, outs, 10, **({"median_tol": 0.03, "near_tie": float("inf")} if fp8 else {}))
    assert engine.scheduler.num_preemptions > 0
    assert dual.fast.graphs is not None and dual.fast.num_graph_steps > 0 and dual.fast.num_eager_steps > 0


def test_mid_odd_long() -> None:
    # window 32, CSA 4 / top-24, HCA 32, block 64: a 1500-token prompt prefilled in 256-token chunks beside short
    # ones, then decode at batch 1..4 through the graphs (bucket 4 holds 3 live sequences + padding)
    engine, dual, outs = run_dual(mid_config(tiny_config()), "cuda", [1500, 150, 9, 97], block_size=64,
                                  num_blocks=40, num_slots=4, max_num_batched_tokens=256, max_model_len=1600,
                                  max_tokens=24)
    check_dual(engine, dual, outs, 24)
    assert dual.fast.num_graph_steps > 0
