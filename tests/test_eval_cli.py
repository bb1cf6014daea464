"""`ds4f eval tools` and `ds4f eval ifeval`: table building, IFEval scoring, and runs against `ds4f serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds4f.tools import eval_ifeval, eval_tools
from ds4f.tools.endpoint import child_env, free_port

DATA = Path(__file__).parent / "data" / "ifeval_sample.jsonl"


def _cat(cat: str, label: str, earned: int) -> dict[str, object]:
    return {"category": cat, "label": label, "earned": earned, "max": 6, "percent": round(earned / 6 * 100),
            "pass_count": earned // 2, "partial_count": earned % 2, "fail_count": 3 - earned // 2 - earned % 2}


def test_tools_table_in_seed_order_with_missing_categories_marked() -> None:
    report = {"final_score": 58, "rating": "★★ Weak", "scores": {
        "category_scores": [_cat("O", "Structured Output", 6), _cat("A", "Tool Selection", 5),
                            _cat("F", "Localization", 2)],
        "scenario_results": [{"scenario_id": "TC-01", "failure_kind": None},
                             {"scenario_id": "TC-02", "failure_kind": "timeout"}]}}
    s = eval_tools.summarize(report)
    assert [r["category"] for r in s["categories"]] == ["A", "B", "C", "D", "E", "O", "F"]
    assert s["infrastructure_failures"] == ["TC-02"] and s["overall"] == 58
    lines = eval_tools.table(s, "m").splitlines()
    assert "| Tool Selection | 83% (5/6) | 2 / 1 / 0 |" in lines
    assert "| Parameter Precision | not run | |" in lines
    assert lines.index("| Structured Output | 100% (6/6) | 3 / 0 / 0 |") < lines.index("| Localization | 33% (2/6) | "
                                                                                          "1 / 0 / 2 |")
    assert lines[-1].startswith("| **overall** | **58** (★★ Weak) | 2 scenarios")


def test_ifeval_checkers_score_strict_and_loose_offline() -> None:
    pytest.importorskip("lm_eval")
    utils, unsupported = eval_ifeval.checkers()
    assert set(unsupported) <= set(eval_ifeval.NLTK_INSTRUCTIONS)
    docs = [{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
            {"key": 2, "prompt": "p", "instruction_id_list": ["change_case:english_lowercase",
                                                              "keywords:existence"],
             "kwargs": [{}, {"keywords": ["moon"]}]}]
    # Reply 1 has a comma only in its first line: strict fails, loose (first line dropped) passes.
    replies = ["Sure, here it is\nthe tide rolls in and out", "the moon pulls the sea toward the shore"]
    metrics, per = eval_ifeval.score(utils, docs, replies)
    assert per[0]["prompt_level_strict_acc"] is False and per[0]["prompt_level_loose_acc"] is True
    assert per[1]["inst_level_strict_acc"] == [True, True]
    assert metrics == {"prompt_level_strict_acc": 0.5, "inst_level_strict_acc": round(2 / 3, 4),
                       "prompt_level_loose_acc": 1.0, "inst_level_loose_acc": 1.0}


def test_ifeval_data_errors_name_the_flag_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(DATA.read_text().splitlines()[0] + '\n{"key": 2, "prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"--data .*bad\.jsonl:2: .*instruction_id_list"):
        eval_ifeval.load(bad)
    assert len(eval_ifeval.load(DATA)) == 10


def _ds4f(*args: str, cwd: Path, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ds4f", *args], cwd=cwd, env=child_env(), text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("which", [["tools"], ["ifeval", "--data", str(DATA)]])
def test_eval_against_a_down_server_fails_fast(tmp_path: Path, which: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    p = _ds4f("eval", *which, "--base-url", url, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and url in p.stderr and "ds4f serve" in p.stderr, p.stderr


@pytest.mark.slow
def test_eval_tools_short_completes(server: str, tmp_path: Path) -> None:
    pytest.importorskip("tool_eval_bench")
    p = _ds4f("eval", "tools", "--short", "--base-url", server, "--max-tokens", "16", "--parallel", "2",
              "--out", "out", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (tmp_path / "out" / "tools.md").read_text()
    assert md in p.stdout
    for label in ("Tool Selection", "Parameter Precision", "Multi-Step Chains", "Restraint & Refusal",
                  "Error Recovery"):
        assert f"| {label} | " in md and f"| {label} | not run" not in md
    assert "| Structured Output | not run | |" in md  # --short runs categories A-E only
    data = json.loads((tmp_path / "out" / "tools.json").read_text())
    assert data["scenarios"] == 15 and data["completion_rate"] == 100.0 and data["infrastructure_failures"] == []
    assert (tmp_path / "out" / "data" / "benchmarks.sqlite").is_file()  # tool-eval-bench's files stay in --out


@pytest.mark.slow
def test_eval_ifeval_runs_on_the_sample(server: str, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    p = _ds4f("eval", "ifeval", "--data", str(DATA), "--base-url", f"{server}/v1", "--max-tokens", "16",
              "--reasoning-effort", "none", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads((tmp_path / "out" / "ifeval.json").read_text())
    skipped = {s["key"] for s in data["skipped"]}
    assert data["prompts"] + len(skipped) == 10 and data["request_errors"] == []
    assert set(data["metrics"]) == {"prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                    "inst_level_loose_acc"}
    assert all(0.0 <= v <= 1.0 for v in data["metrics"].values())
    # reasoning_effort none = chat mode, so the 16 tokens land in content rather than reasoning.
    assert any(s["response"] for s in data["samples"])
    assert all(s["finish_reason"] in ("length", "stop") for s in data["samples"])
    if "length_constraints:number_sentences" in data["unsupported_offline"]:
        assert skipped == {1009} and "skipping 1 prompt(s)" in p.stderr
    assert "| prompt | " in p.stdout and "| instruction | " in p.stdout
