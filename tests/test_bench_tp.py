"""bench/bench_tp.py on the tiny config, CPU, 2 gloo ranks: TP=2's greedy tokens equal TP=1's, and the collectives
it counts per decode step equal docs/parallel.md §2's formula (2 all-reduces per layer + 1 all-gather of the
vocab-parallel head; MTP not run), in number and bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ds4f.model.args import ModelArgs, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tp_tiny_gloo(tmp_path: Path) -> None:
    out = tmp_path / "tp.jsonl"
    lens = [20, 45]
    cmd = [sys.executable, str(ROOT / "bench/bench_tp.py"), "--tiny", "--device", "cpu", "--tp", "2",
           "--prompt-lens", ",".join(map(str, lens)), "--new-tokens", "6", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    tp1, tp2 = (json.loads(line) for line in out.read_text().splitlines())
    assert (tp1["tp"], tp2["tp"]) == (1, 2)
    assert tp2["tokens_equal"], tp2["diffs"]

    a = ModelArgs.from_hf(tiny_config())
    batch, fp32, world = len(lens), 4, 2
    # per decode step: an all-reduce after each layer's attention (wo_b row-parallel) and after its MoE; one
    # all-gather of the head's vocab shards (zero-padded to ceil(vocab / world) rows each)
    want_n = {"all_reduce": 2 * a.num_hidden_layers, "all_gather": 1}
    want_b = {"all_reduce": 2 * a.num_hidden_layers * batch * a.hidden_size * fp32,
              "all_gather": batch * -(-a.vocab_size // world) * fp32}
    assert tp2["decode_steps"] >= 1 and tp2["decode_batch"] == batch
    assert tp2["collectives_consistent"]
    assert tp2["collectives_per_step"] == want_n
    assert tp2["bytes_per_step"] == want_b
    assert tp2["counts_match_analytical"]
    assert tp1["collectives_per_step"] == {}  # TP=1: no collectives at all
    assert 0 < tp2["collective_ms_per_step"] < tp2["step_ms"]
