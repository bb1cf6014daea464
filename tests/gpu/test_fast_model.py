"""⑤ runner GPU fast path on CUDA: FastModel (eager prefill, graph-captured decode) vs the fp32 reference model."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.model.args import tiny_config
from ds4f.runner.gpu.check import compare, mid_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

# Relative L2 logit error per sequence and step against the fp32 reference on the same bf16 weights (see
# tests/test_fast_model_cpu.py): bf16 activations, fp32 accumulation in the kernels.
TOL = 5e-2


def _all_hash(cfg: dict) -> dict:
    # every MoE layer hash-routed: on CUDA the learned top-k of the tiny model (top-2 of 8) flipped once in ~60 token
    # steps between bf16 and fp32 (a whole expert swapped, logit error 0.86), which tests nothing of the fast path;
    # the learned router is the same torch code on CPU, where tests/test_fast_model_cpu.py covers it
    return dict(cfg, num_hash_layers=cfg["num_hidden_layers"])


@pytest.mark.parametrize("graphs", [False, True])
def test_tiny(graphs: bool) -> None:
    errs = compare(_all_hash(tiny_config()), "cuda", prompt_lens=(37, 5, 21), first_chunk=13, decode_steps=20,
                   graphs=graphs)
    flat = [e for step in errs for e in step]
    assert all(e == e for e in flat), "NaN in fast-path logits"
    assert max(flat) < TOL, [[round(e, 4) for e in step] for step in errs]


@pytest.mark.parametrize("graphs", [False, True])
def test_mid_odd(graphs: bool) -> None:
    # window 32, CSA 4 / top-24, HCA 32: prompts 150 / 9 / 97 (97 as 40 + 57), then 40 steps past 190
    errs = compare(mid_config(tiny_config()), "cuda", prompt_lens=(150, 9, 97), first_chunk=40, decode_steps=40,
                   graphs=graphs, block_size=64)
    flat = [e for step in errs for e in step]
    assert all(e == e for e in flat), "NaN in fast-path logits"
    assert max(flat) < TOL, [[round(e, 4) for e in step] for step in errs]
