"""⑤ runner GPU fast path on packed weights, CUDA: FastModel on a packed-only FP8 + MXFP4 load (fp8_linear /
fp8_grouped_linear / fused_moe_mxfp4 Triton kernels) vs FastModel on the same checkpoint dequantized (bf16 GEMMs,
bf16 fused_moe), eager and with graph-captured decode; plus every projection and the MoE op by op."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ds4f.kernels import HAS_TRITON, fp8_gemm
from ds4f.model.args import tiny_config
from ds4f.runner.gpu import packed
from ds4f.runner.gpu.check import mid_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_fast_packed import aligned_config, all_hash, check_ops, check_packed_only, rel_errors, run_pair

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

# Weight-only fp8 everywhere (W8_MAX_M raised): both paths multiply the same bf16-exact weight values with fp32
# accumulation; only the rounding order differs (measured on H200: max 0.024, median 0.011 over 24 forwards of
# the aligned config; CPU 0.015).
TOL_W8 = 3e-2
# Default schemes: prefill rows above W8_MAX_M tokens quantize activations to e4m3 per 128 columns (a8w8), ~2^-4
# relative per element, compounded over the random tiny model's layers (measured on H200: max 0.163 on the
# 150-token a8w8 prefill, 0.01 on the w8 decode steps). The kernels' own a8w8-vs-reference bound is in
# test_fp8_gemm_gpu.py; this bound only catches a broken path (wrong scales give O(1)).
TOL_A8 = 0.25

CONFIGS = {"tiny": tiny_config, "aligned": aligned_config, "mid": lambda: mid_config(tiny_config())}


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_matches_dequantized_w8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                       graphs: bool) -> None:
    monkeypatch.setattr(fp8_gemm, "W8_MAX_M", 1 << 30)
    want, got, fm = run_pair(all_hash(CONFIGS[name]()), tmp_path / name, "cuda", prompt_lens=(37, 5, 21),
                             decode_steps=12, graphs=graphs)
    check_packed_only(fm)
    err = rel_errors(got, want)
    assert err.max() < TOL_W8, err.tolist()


@pytest.mark.parametrize("name", ["aligned", "mid"])
def test_packed_prefill_a8w8(tmp_path: Path, name: str) -> None:
    # prompts 150 / 9 / 97 (97 as 40 + 57): the first two forwards run a8w8, the decode steps w8
    want, got, _ = run_pair(all_hash(CONFIGS[name]()), tmp_path / name, "cuda", prompt_lens=(150, 9, 97),
                            first_chunk=40, decode_steps=8, block_size=64)
    err = rel_errors(got, want)
    assert err.max() < TOL_A8, err.tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_ops_match_dequantized_gpu(tmp_path: Path, name: str) -> None:
    check_ops(CONFIGS[name](), tmp_path / name, "cuda")  # T = 7: weight-only fp8, MXFP4 per-pick kernels


@pytest.mark.parametrize("gemv,act", [(False, False), (True, False), (True, True)])
def test_shared_expert_on_packed_fp8_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gemv: bool,
                                         act: bool) -> None:
    # DS4F_SHARED_FP8=1 (and DS4F_FP8_GEMV=1 for its decode GEMMs): the shared expert on its packed e4m3 tensors;
    # act: its SwiGLU inside the w2 GEMV (DS4F_SHARED_ACT_FUSED=1)
    from ds4f.kernels import fp8_gemv
    from ds4f.runner.gpu import packed

    monkeypatch.setattr(packed, "SHARED_FP8", True)
    monkeypatch.setattr(packed, "SHARED_ACT_FUSED", act)
    monkeypatch.setattr(fp8_gemv, "USE_GEMV", gemv)
    monkeypatch.setattr(fp8_gemm, "W8_MAX_M", 1 << 30)
    want, got, fm = run_pair(all_hash(CONFIGS["aligned"]()), tmp_path / "sh", "cuda", prompt_lens=(37, 5, 21),
                             decode_steps=12)
    assert all(mx is not None and mx.shared_fp8 is not None for mx in fm.mx)
    err = rel_errors(got, want)
    assert err.max() < TOL_W8, err.tolist()


KNOBS = {"DS4F_DENSE_SIDE": "dense_side", "DS4F_IDX_Q_FIRST": "idx_q_first", "DS4F_IDX_PREP_EARLY": "idx_prep_early"}


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("name", ["aligned", "mid"])
def test_decode_stream_order_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                              knob: str) -> None:
    # the same kernels on the same inputs, only their streams / launch order changed -> the logits bit for bit.
    # DS4F_DENSE_SIDE: the bf16 input run + the compressors on a third side stream (ordered by events instead of one
    # stream per chain); DS4F_IDX_Q_FIRST: the indexer's q GEMV on main before wq_b instead of on the indexer's stream;
    # DS4F_IDX_PREP_EARLY: the query's prep after the dense GEMV only, the scores after the index compressor
    # (prompts past mid's CSA top-24 x 4 tokens, so its decode steps score and select)
    got = {}
    for v in ("0", "1"):
        monkeypatch.setenv(knob, v)
        _, got[v], fm = run_pair(all_hash(CONFIGS[name]()), tmp_path / f"{name}{v}", "cuda",
                                 prompt_lens=(150, 9, 97), decode_steps=12, graphs=True)
        assert getattr(fm, KNOBS[knob]) == (v == "1")
        assert any(isinstance(w, packed.InProj) and w.mixed for w in fm.w_in), "no mixed input run to move"
    for a, b in zip(got["0"], got["1"]):
        assert torch.equal(a, b)
