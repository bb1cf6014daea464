"""tool-eval-bench 3.0.0 (the pip package, unmodified) runs its --short suite against `ds4f serve` to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tool_eval_bench")

INFRA = {"timeout", "connection_error", "server_error"}


@pytest.mark.slow
def test_short_suite_completes_with_full_completion_rate(server: str, tmp_path: Path) -> None:
    # max_tokens 32: random weights never stop on their own, and 16384 tokens per turn would take hours on CPU.
    cmd = [sys.executable, "-m", "tool_eval_bench", "run", "--short", "--base-url", server, "--model", "ds4f-tiny",
           "--seed", "42", "--no-live", "--parallel", "2", "--backend-kwargs", '{"max_tokens": 32}',
           "--json-file", str(tmp_path / "r.json"), "--output-dir", str(tmp_path / "runs")]
    p = subprocess.run(cmd, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    scores = report["scores"]
    assert report["status"] == "completed" and report["total_scenarios"] == 15
    assert scores.get("completion_rate", 100.0) == 100.0 and not scores.get("excluded_scenarios")
    results = scores["scenario_results"]
    assert len(results) == 15
    for r in results:
        assert r.get("failure_kind") not in INFRA, r
        assert "transport_error" not in r["raw_log"], r["raw_log"]
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0, r  # usage chunk parsed from the stream
        assert r["ttft_ms"] is not None and r["ttft_ms"] > 0
    meta = report["metadata"]
    assert meta["engine_name"] == "vLLM" and meta["max_model_len"] > 0  # recognized via /version and vllm: metrics
    assert [c["category"] for c in scores["category_scores"]] == ["A", "B", "C", "D", "E"]
