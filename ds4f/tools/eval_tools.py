"""Tool-eval stage: an OpenAI endpoint in, tool-eval-bench's category scores as the seed's table (md, JSON) out."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ds4f.tools import DEFAULT_BASE_URL

# The seed's table: these categories in this order, then any other category that ran, then overall.
SEED_CATEGORIES = (("A", "Tool Selection"), ("B", "Parameter Precision"), ("C", "Multi-Step Chains"),
                   ("D", "Restraint & Refusal"), ("E", "Error Recovery"), ("O", "Structured Output"))
INFRA_FAILURES = frozenset({"timeout", "connection_error", "server_error"})


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("tools", help="tool-calling eval with tool-eval-bench (offline, local scenarios)",
                       description="Run tool-eval-bench against an OpenAI-compatible server and print its "
                                   "category table (Tool Selection ... Structured Output, overall).")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"server root or .../v1 (default {DEFAULT_BASE_URL})")
    p.add_argument("--model", default=None, help="served model name (default: the first /v1/models entry)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--short", action="store_true", help="only the core 15 scenarios (categories A-E)")
    p.add_argument("--categories", nargs="+", default=None, metavar="CAT", help="e.g. A B C D E O")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="per-turn max_tokens (tool-eval-bench's default: 16384 thinking, 4096 --no-think)")
    p.add_argument("--no-think", action="store_true", help="pass tool-eval-bench's --no-think")
    p.add_argument("--parallel", type=int, default=1, help="scenarios run concurrently")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeout", type=float, default=None, help="per-request timeout in seconds (default 120)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default eval-results/tools-<timestamp>)")


def command(args: argparse.Namespace, model: str, base_url: str, out: Path) -> list[str]:
    """tool-eval-bench's CLI with the offline flags of serving-spec §6; reports and its sqlite stay under out."""
    cmd = [sys.executable, "-m", "tool_eval_bench", "run", "--base-url", base_url, "--model", model,
           "--seed", str(args.seed), "--no-live", "--no-probe-engine", "--parallel", str(args.parallel),
           "--json-file", str(out / "tool-eval-bench.json"), "--output-dir", str(out / "runs")]
    if args.short:
        cmd.append("--short")
    if args.categories:
        cmd += ["--categories", *args.categories]
    if args.no_think:
        cmd.append("--no-think")
    if args.max_tokens is not None:
        cmd += ["--backend-kwargs", json.dumps({"max_tokens": args.max_tokens})]
    if args.timeout is not None:
        cmd += ["--timeout", str(args.timeout)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Category rows, overall score and completion from tool-eval-bench's --json-file report."""
    scores = report.get("scores") or {}
    by_cat = {c["category"]: c for c in scores.get("category_scores", [])}
    order = [c for c, _ in SEED_CATEGORIES] + sorted(set(by_cat) - {c for c, _ in SEED_CATEGORIES})
    labels = dict(SEED_CATEGORIES)
    rows = []
    for cat in order:
        c = by_cat.get(cat) or {}
        rows.append({"category": cat, "label": c.get("label", labels.get(cat, cat)), "ran": bool(c),
                     "percent": c.get("percent"), "earned": c.get("earned"), "max": c.get("max"),
                     "pass": c.get("pass_count"), "partial": c.get("partial_count"), "fail": c.get("fail_count")})
    results = scores.get("scenario_results", [])
    infra = [r["scenario_id"] for r in results if r.get("failure_kind") in INFRA_FAILURES]
    return {"categories": rows, "overall": report.get("final_score", scores.get("final_score")),
            "rating": report.get("rating", scores.get("rating")),
            "completion_rate": scores.get("completion_rate", 100.0),
            "scenarios": len(results), "infrastructure_failures": infra,
            "excluded": scores.get("excluded_scenarios", []),
            "deployability": report.get("deployability"), "median_turn_ms": scores.get("median_turn_ms")}


def table(summary: dict[str, Any], model: str) -> str:
    lines = [f"### tool-eval-bench: {model}", "", "| category | score | pass / partial / fail |", "|---|---:|---:|"]
    for r in summary["categories"]:
        if r["ran"]:
            lines.append(f"| {r['label']} | {r['percent']}% ({r['earned']}/{r['max']}) | "
                         f"{r['pass']} / {r['partial']} / {r['fail']} |")
        elif r["category"] in dict(SEED_CATEGORIES):
            lines.append(f"| {r['label']} | not run | |")
    lines.append(f"| **overall** | **{summary['overall']}** ({summary['rating']}) | "
                 f"{summary['scenarios']} scenarios, completion {summary['completion_rate']}%"
                 + (f" (excluded: {', '.join(summary['excluded'])})" if summary["excluded"] else "") + " |")
    return "\n".join(lines) + "\n"


def run_with_progress(cmd: list[str], cwd: Path, log: Path) -> int:
    """Run tool-eval-bench, teeing its output to log and its JSON scenario events to a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with log.open("w") as f, Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("tool-eval-bench: starting", total=None)
        # cwd: tool-eval-bench writes data/benchmarks.sqlite relative to the working directory.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=os.environ.copy(),
                                text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            if ev.get("event") == "scenario_start":
                bar.update(task, total=ev.get("total"), description=f"{ev.get('scenario_id')} {ev.get('title')}")
            elif ev.get("event") == "scenario_result":
                bar.update(task, total=ev.get("total"), advance=1)
        return proc.wait()


def main(args: argparse.Namespace) -> int:
    from ds4f.tools.endpoint import EndpointDown, probe

    if args.parallel < 1:
        print(f"ds4f eval tools: error: --parallel {args.parallel}: give at least 1", file=sys.stderr)
        return 2
    if args.max_tokens is not None and args.max_tokens < 1:
        print(f"ds4f eval tools: error: --max-tokens {args.max_tokens}: give at least 1", file=sys.stderr)
        return 2
    try:
        ep = probe(args.base_url, api_key=args.api_key, model=args.model, command="ds4f eval tools")
    except (EndpointDown, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    out: Path = args.out or Path("eval-results") / time.strftime("tools-%Y%m%d-%H%M%S")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = command(args, ep.model_id, ep.base_url, out)
    log = out / "tool-eval-bench.log"
    print(f"ds4f eval tools: {ep.model_id} at {ep.base_url}; log {log}", file=sys.stderr)
    rc = run_with_progress(cmd, out, log)
    try:
        report = json.loads((out / "tool-eval-bench.json").read_text())
    except (OSError, ValueError):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        print(f"ds4f eval tools: tool-eval-bench (status {rc}) wrote no report; {log} ends with:\n{tail}",
              file=sys.stderr)
        return 1
    summary = summarize(report)
    text = table(summary, ep.model_id)
    (out / "tools.md").write_text(text)
    (out / "tools.json").write_text(json.dumps({"model": ep.model_id, "base_url": ep.base_url, **summary}, indent=2))
    print(text)
    print(f"wrote {out / 'tools.md'}, {out / 'tools.json'}; full report: {report.get('report_path')}")
    return 0 if rc == 0 else 1
