"""③ roofline: bytes per decode step for V4-Flash against docs/v4-architecture.md §3.2 (weights ≈ 11.2 GB at batch 1
in checkpoint formats; the attention-KV and index MB columns at 8K and 1M), the engine's decode-step tracking, and a
real `ds4f serve` reporting a fraction that `ds4f bench`'s parser reads."""

from __future__ import annotations

import httpx
import pytest
import torch
from server_fakes import start_server

from ds4f.cache.manager import CacheLayout
from ds4f.config import EngineConfig
from ds4f.engine.llm import build_engine
from ds4f.engine.roofline import DecodeRoofline, decode_step_bytes, kv_bytes, measure_bandwidth, weight_bytes
from ds4f.model.args import ModelArgs, flash_config
from ds4f.model.loader import load_model
from ds4f.sample.params import SamplingParams
from ds4f.tools.endpoint import probe, roofline

FLASH = ModelArgs.from_hf(flash_config())
EXPERT_FP4 = 3 * 2048 * 4096 * (0.5 + 1 / 32)  # w1, w2, w3 packed + one UE8M0 scale per 32 values (13.37 MB)


def rows(kv_dtype: str) -> tuple[int, int]:
    layout = CacheLayout.from_model_args(FLASH, 256, kv_dtype)
    return layout.kv_row_bytes, layout.index_row_bytes


def test_flash_weights_at_batch_1_match_the_doc() -> None:
    assert weight_bytes(FLASH, 1) == pytest.approx(11.2e9, rel=0.01)
    # dequantized to bf16 the same step reads every matmul weight at 2 bytes: more than twice the checkpoint bytes
    assert weight_bytes(FLASH, 1, "bfloat16") > 2.3 * weight_bytes(FLASH, 1)


def test_routed_experts_grow_with_batch_up_to_all_experts() -> None:
    embed_row = 2 * FLASH.hidden_size
    step = weight_bytes(FLASH, 2) - weight_bytes(FLASH, 1) - embed_row
    assert step == pytest.approx(43 * 6 * EXPERT_FP4, abs=1)
    # 43 sequences x 6 experts = 258 >= 256: every expert of every layer is read, so more sequences add only embed rows
    assert weight_bytes(FLASH, 1000) - weight_bytes(FLASH, 43) == 957 * embed_row
    assert weight_bytes(FLASH, 42) < weight_bytes(FLASH, 43) - embed_row


@pytest.mark.parametrize(("depth", "kv_dtype", "attn_mb", "index_mb"), [
    (8192, "bfloat16", 18.0, 11.0), (8192, "fp8", 10.2, 5.7),
    (2**20, "bfloat16", 184, 1409), (2**20, "fp8", 105, 727),
    (2048, "bfloat16", 17.0, 2.8),
])
def test_flash_kv_bytes_match_the_doc_table(depth: int, kv_dtype: str, attn_mb: float, index_mb: float) -> None:
    attn, index = kv_bytes(FLASH, depth, *rows(kv_dtype))
    # the doc prints 2-4 significant digits (2.75 MB shows as 2.8)
    assert attn / 1e6 == pytest.approx(attn_mb, rel=0.02)
    assert index / 1e6 == pytest.approx(index_mb, rel=0.02)


def test_short_sequence_reads_only_its_window_rows() -> None:
    kv_row, index_row = rows("bfloat16")
    # depth 2 (t = 3): 3 window rows in each of the 43 layers, no compressed entry is complete yet
    assert kv_bytes(FLASH, 2, kv_row, index_row) == (43 * 3 * 1024, 0)


def test_step_bytes_add_weights_once_and_kv_per_sequence() -> None:
    kv_row, index_row = rows("fp8")
    got = decode_step_bytes(FLASH, [8192, 100], "checkpoint", kv_row, index_row)
    kv = sum(kv_bytes(FLASH, 8192, kv_row, index_row)) + sum(kv_bytes(FLASH, 100, kv_row, index_row))
    assert got == weight_bytes(FLASH, 2) + kv


def test_tracker_reports_nothing_until_a_decode_step() -> None:
    kv_row, index_row = rows("bfloat16")
    tr = DecodeRoofline(FLASH, "checkpoint", kv_row, index_row, bandwidth=4e12)
    assert tr.stats()["roofline_fraction"] is None and tr.stats()["decode_step_seconds"] is None
    tr.observe([8192], 0.01)
    tr.observe([8193], 0.03)
    b1, b2 = (decode_step_bytes(FLASH, [d], "checkpoint", kv_row, index_row) for d in (8192, 8193))
    s = tr.stats()
    assert s["decode_step_seconds"] == pytest.approx(0.02)
    assert s["roofline_bytes_per_step"] == (b1 + b2) // 2
    assert s["roofline_fraction"] == pytest.approx((b1 + b2) / 4e12 / 0.04)


def test_cpu_bandwidth_is_measured_once() -> None:
    bw = measure_bandwidth("cpu")
    assert bw is not None and 1e8 < bw < 1e13
    assert measure_bandwidth("cpu") is bw


def test_engine_counts_decode_steps_only() -> None:
    cfg = EngineConfig(device="cpu", dtype="float32", block_size=16, kv_cache_memory=4 << 20, max_model_len=512)
    eng = build_engine(cfg, model=load_model(None, dtype=torch.float32))
    eng.add_request(list(range(2, 40)), SamplingParams(max_tokens=1, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.stats()["roofline_fraction"] is None  # a prefill-only request has no decode step
    eng.add_request(list(range(2, 40)), SamplingParams(max_tokens=5, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    s = eng.stats()
    assert s["decode_step_seconds"] > 0 and s["mem_bandwidth_bytes_per_s"] > 0
    # 4 decode steps at positions 38..41, weights read in float32 (the runner's dequantized dtype)
    expect = [decode_step_bytes(eng.model_args, [p], "float32", *rows_of(eng)) for p in range(38, 42)]
    assert s["roofline_bytes_per_step"] == sum(expect) // 4
    assert 0 < s["roofline_fraction"] == pytest.approx(
        s["roofline_bytes_per_step"] / s["mem_bandwidth_bytes_per_s"] / s["decode_step_seconds"], rel=1e-6)


def rows_of(eng: object) -> tuple[int, int]:
    layout = eng.runner.layout  # type: ignore[attr-defined]
    return layout.kv_row_bytes, layout.index_row_bytes


def test_served_fraction_is_read_by_the_bench_parser() -> None:
    proc, url = start_server("--max-model-len", "1024")
    try:
        assert httpx.get(f"{url}/version").json()["roofline_fraction"] is None
        assert "ds4f:roofline_fraction" not in httpx.get(f"{url}/metrics").text
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello there", "max_tokens": 6, "ignore_eos": True},
                       timeout=60)
        assert r.status_code == 200, r.text
        fraction, note = roofline(probe(f"{url}/v1"))
        assert fraction is not None and fraction > 0, note
        assert httpx.get(f"{url}/version").json()["roofline_fraction"] > 0
        text = httpx.get(f"{url}/metrics").text
        for name in ("ds4f:roofline_fraction{", "ds4f:decode_step_seconds{", "ds4f:mem_bandwidth_bytes_per_second{"):
            assert name in text, name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("depths", [[0], [5], [127, 128, 129], [8192, 100, 1 << 20], list(range(0, 4000, 397))])
def test_tracker_step_bytes_equal_the_layer_walk(depths: list[int]) -> None:
    for kv in ("fp8", "bfloat16"):
        kv_row, index_row = rows(kv)
        tr = DecodeRoofline(FLASH, "checkpoint", kv_row, index_row, bandwidth=4e12)
        assert tr.step_bytes(depths) == decode_step_bytes(FLASH, depths, "checkpoint", kv_row, index_row)
