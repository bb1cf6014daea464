"""bench/step_breakdown.py on hand-built timelines: a kernel launched early (PDL) is charged from the end of the one
before it, a main-stream gap goes to the side kernel that ended in it (then launch), hidden side kernels cost
nothing, the categories sum to the main stream's span; the written format round-trips, with and without streams."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from step_breakdown import (  # noqa: E402
    Kernel,
    attn_waits,
    breakdown,
    category,
    last_step,
    parse,
    sublayers,
    sublayers_by_kind,
)


def test_charges_along_the_main_stream() -> None:
    ks = [Kernel(0, 10, "s7", "_step_meta"), Kernel(8, 12, "s7", "_fp8_gemv"),  # launched early: 10 -> 20 charged
          Kernel(10, 4, "s9", "_rope_kernel"),  # hidden behind the GEMV: free
          Kernel(12, 13, "s9", "_store_kv_rows"),  # ends at 25 inside the main stream's gap 20 -> 27
          Kernel(27, 3, "s7", "_attn_fwd")]
    b = breakdown(ks)
    assert b == pytest.approx({"other": 10, "fp8_gemv": 10, "wait:kv_path": 5, "launch": 2, "attention": 3})
    assert sum(b.values()) == pytest.approx(30)  # the span of the main stream


def test_one_stream_and_step_selection() -> None:
    text = "# header\n" + "\n".join([
        "      0.00     5.00    0.00  _step_meta", "      6.00     4.00    1.00  _hc_decode",
        "     20.00     2.00   10.00  _step_meta", "     21.00     4.00    0.00  _router_fused",
        "     30.00     2.00    5.00  _dec_up"])
    ks = last_step(parse(text), "_step_meta")
    assert [k.name for k in ks] == ["_step_meta", "_router_fused", "_dec_up"]
    assert breakdown(ks) == pytest.approx({"other": 2, "router": 3, "launch": 5, "moe": 2})
    five = parse("     1.00     2.00    0.00 s13  _attn_combine\n")
    assert five == [Kernel(1.0, 2.0, "s13", "_attn_combine")]


def test_categories() -> None:
    assert category("_fp8_gemv") == "fp8_gemv" and category("_gemv") == "bf16_gemv"
    assert category("_dec_up") == "moe" and category("_topk_small") == "indexer"
    assert category("_a8_down") == "moe" and category("_fp8_gemv") == "fp8_gemv"  # moe_mxfp4_a8's launches
    assert category("_hc_decode") == "mhc" and category("ncclDevKernel_AllReduce") == "collectives"
    assert category("Memcpy HtoD") == "other"


def test_write_timeline_round_trip(tmp_path: Path) -> None:
    # bench_decode.write_timeline's file (a stand-in profiler's chrome trace: stream ids in args or as "stream N")
    # parses back with its streams, and the breakdown charges the gap to the side kernel
    import json

    from bench_decode import write_timeline

    class Prof:
        def export_chrome_trace(self, f: str) -> None:
            Path(f).write_text(json.dumps({"traceEvents": [
                {"cat": "kernel", "name": "_step_meta", "ts": 100.0, "dur": 5.0, "tid": 7, "args": {"stream": 7}},
                {"cat": "kernel", "name": "_rope_kernel", "ts": 103.0, "dur": 4.0, "tid": "stream 13"},
                {"cat": "cpu_op", "name": "aten::mm", "ts": 104.0, "dur": 1.0},
                {"cat": "kernel", "name": "_attn_fwd", "ts": 110.0, "dur": 3.0, "tid": 7, "args": {"stream": 7}}]}))

    out = tmp_path / "t.txt"
    write_timeline(Prof(), out)
    ks = parse(out.read_text())
    assert [(k.start, k.stream, k.name) for k in ks] == [(0.0, "s7", "_step_meta"), (3.0, "s13", "_rope_kernel"),
                                                         (10.0, "s7", "_attn_fwd")]
    assert breakdown(ks) == pytest.approx({"other": 5, "wait:kv_path": 2, "launch": 3, "attention": 3})


def test_busy_breakdown_charges_the_earliest_running_kernel(tmp_path: Path) -> None:
    # kernels spread over streams (a TP graph replay): each instant goes to the running kernel that started first
    # (a PDL-early kernel waits under it; a kernel starting under a running one is hidden), idle time to launch
    from step_breakdown import busy_breakdown, timeline_ms

    ks = [Kernel(0, 10, "s7", "_step_meta"), Kernel(8, 12, "s503", "_fp8_gemv"),  # 10 -> 20 charged
          Kernel(12, 4, "s504", "_rope_kernel"),  # under the GEMV: free
          Kernel(22, 6, "s505", "one_shot_all_reduce_kernel"), Kernel(24, 10, "s506", "_attn_fwd")]
    b = busy_breakdown(ks)
    assert b == pytest.approx({"other": 10, "fp8_gemv": 10, "launch": 2, "collectives": 6, "attention": 6})
    assert sum(b.values()) == pytest.approx(34)
    f = tmp_path / "t.txt"  # fewer than half on the first kernel's stream: timeline_ms takes the sweep
    f.write_text("\n".join(f"{k.start:10.2f} {k.dur:8.2f} 0.00 {k.stream}  {k.name}" for k in ks) + "\n")
    assert timeline_ms(f) == pytest.approx({c: v / 1e3 for c, v in sorted(b.items())})


def test_sublayers_cut_at_the_all_reduces() -> None:
    ar = "void (anonymous namespace)::one_shot_all_reduce_kernel<c10::BFloat16, 16, 2>"
    ks = [Kernel(0, 5, "s7", "_step_meta"), Kernel(5, 20, "s1", "_fp8_gemv"),  # layer 0 attention: 0 -> 25
          Kernel(25, 5, "s1", ar),  # 25 -> 30
          Kernel(30, 15, "s2", "_a8_up"), Kernel(28, 3, "s2", ar[:10] + "x"),  # not a collective by name
          Kernel(44, 6, "s2", ar),  # starts under the up GEMV's end: MoE 30 -> 44, then 44 -> 50
          Kernel(50, 10, "s3", "_attn_fwd"), Kernel(60, 4, "s3", ar), Kernel(64, 8, "s4", "_a8_down"),
          Kernel(72, 3, "s4", ar), Kernel(75, 9, "s4", "ncclDevKernel_AllGather_RING_LL")]  # the head's gather
    got = sublayers(ks)
    assert got == pytest.approx({"attn": 25 + 10, "moe": 14 + 8, "all_reduce": 5 + 6 + 4 + 3, "rest": 9,
                                 "layers": 2})
    assert sum(v for k, v in got.items() if k != "layers") == pytest.approx(84)  # the step's span
    assert sublayers([Kernel(0, 5, "s7", "_step_meta")]) == {}
    by = sublayers_by_kind(ks, ["sliding", "csa"])
    assert by == {("attn", "sliding"): [25], ("moe", "sliding"): [14], ("attn", "csa"): [10], ("moe", "csa"): [8]}


def test_sublayers_cut_at_the_mhc_launches_that_hold_the_all_reduce() -> None:
    """DS4F_HC_AR: no all-reduce launch between two mHC launches; the second one is a cut, where the kernels that
    started before it have ended. A separate all-reduce launch (the last sublayer's) still cuts as before."""
    ks = [Kernel(0, 5, "s7", "_step_meta"), Kernel(5, 4, "s7", "_hc_decode"),  # the step's first mHC: no cut
          Kernel(9, 16, "s1", "_fp8_gemv"), Kernel(23, 9, "s1", "_hc_decode"),  # early (PDL): cut at 25
          Kernel(32, 12, "s2", "_a8_up"), Kernel(40, 10, "s2", "_hc_decode"),  # cut at 44
          Kernel(50, 10, "s3", "_attn_fwd"), Kernel(60, 4, "s3", "_push_ar"), Kernel(64, 5, "s3", "_hc_decode"),
          Kernel(69, 8, "s4", "_a8_down"), Kernel(77, 3, "s4", "_push_ar"), Kernel(80, 2, "s4", "_hc_decode")]
    got = sublayers(ks)
    assert got == pytest.approx({"attn": 25 + (60 - 44), "moe": (44 - 25) + (77 - 64), "all_reduce": 4 + 3,
                                 "rest": 2, "layers": 2})
    assert sum(v for k, v in got.items() if k != "layers") == pytest.approx(82)  # the step's span


def test_attn_waits_by_layer_kind() -> None:
    # two layers: one whose attention waits for a top-k ending 5 us after wq_b, one (no top-k) starting 1 us after
    # it; offsets are each name's last end (and the attention's start) after the layer's q projection ends
    ks = [Kernel(0, 10, "s1", "_fp8_gemv"), Kernel(2, 4, "s2", "_index_q"), Kernel(6, 9, "s2", "_topk_small"),
          Kernel(15.5, 5, "s1", "_attn_fwd"),
          Kernel(21, 9, "s1", "_fp8_gemv"), Kernel(22, 3, "s3", "_compress_kernel"), Kernel(31, 5, "s1", "_attn_fwd")]
    w = attn_waits(ks)
    assert w["indexer"] == pytest.approx({"_fp8_gemv": 0, "_index_q": -4, "_topk_small": 5, "attn_start": 5.5})
    assert w["plain"] == pytest.approx({"_fp8_gemv": 0, "_compress_kernel": -5, "attn_start": 1})
