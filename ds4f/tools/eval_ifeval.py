"""IFEval stage: an IFEval-format jsonl and an OpenAI endpoint in, lm-eval's strict/loose instruction accuracies out."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ds4f.tools import DEFAULT_BASE_URL

# Checkers whose lm-eval code needs nltk's punkt data, which is a download; probed, and skipped when absent.
NLTK_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
NLTK_FIX = "run `python -m nltk.downloader punkt punkt_tab` once on a machine with network (or set NLTK_DATA)"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("ifeval", help="IFEval with lm-eval's instruction checkers on a local jsonl",
                       description="Send each IFEval prompt as one chat completion (greedy) and score the reply "
                                   "with lm-eval's IFEval checkers: prompt- and instruction-level accuracy, "
                                   "strict and loose. Nothing is downloaded.")
    p.add_argument("--data", type=Path, required=True,
                   help="IFEval-format jsonl: key, prompt, instruction_id_list, kwargs per line")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"server root or .../v1 (default {DEFAULT_BASE_URL})")
    p.add_argument("--model", default=None, help="served model name (default: the first /v1/models entry)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-tokens", type=int, default=1280, help="per reply (lm-eval's IFEval uses 1280)")
    p.add_argument("--reasoning-effort", default=None, help="sent as reasoning_effort (e.g. none, high)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--out", type=Path, default=None, help="output dir (default eval-results/ifeval-<timestamp>)")


def load(path: Path) -> list[dict[str, Any]]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as e:
            raise ValueError(f"--data {path}:{n}: not JSON ({e})") from e
        missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in d]
        if missing or len(d.get("kwargs", [])) != len(d.get("instruction_id_list", [])):
            raise ValueError(f"--data {path}:{n}: an IFEval line needs key, prompt, instruction_id_list and one "
                             f"kwargs dict per instruction (missing {missing or 'kwargs entries'})")
        docs.append(d)
    if not docs:
        raise ValueError(f"--data {path}: no prompts")
    return docs


def checkers() -> tuple[Any, dict[str, str]]:
    """lm-eval's ifeval utils without any network (its import would try to download punkt), and the ids it
    cannot check offline, with the reason."""
    import langdetect
    import nltk

    download = nltk.download
    nltk.download = lambda *a, **k: False  # instructions_util downloads punkt_tab at import when it is missing
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Downloaded punkt_tab" even when it did not
            from lm_eval.tasks.ifeval import instructions_util, utils
    finally:
        nltk.download = download
    langdetect.DetectorFactory.seed = 0  # langdetect is random unless seeded
    probes: dict[str, Callable[[], object]] = {
        "length_constraints:number_sentences": lambda: instructions_util.count_sentences("One. Two."),
        "change_case:capital_word_frequency": lambda: nltk.word_tokenize("One TWO"),
    }
    unsupported: dict[str, str] = {}
    for iid, fn in probes.items():
        try:
            fn()
        except LookupError:
            unsupported[iid] = f"needs nltk punkt data, not installed; {NLTK_FIX}"
    return utils, unsupported


def ask(client: Any, url: str, model: str, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": args.max_tokens, "temperature": 0.0, "stream": False}
    if args.reasoning_effort:
        body["reasoning_effort"] = args.reasoning_effort
    import httpx

    try:
        r = client.post(url, json=body)
    except httpx.HTTPError as e:  # one failed prompt, not a failed run
        return {"response": "", "error": f"{type(e).__name__}: {e}"}
    if r.status_code != 200:
        return {"response": "", "error": f"HTTP {r.status_code}: {r.text[:300]}"}
    choice = r.json()["choices"][0]
    return {"response": choice["message"].get("content") or "", "finish_reason": choice.get("finish_reason"),
            "error": None}


def score(utils: Any, docs: list[dict[str, Any]], responses: list[str]) -> tuple[dict[str, float], list[dict]]:
    per: list[dict[str, Any]] = []
    for doc, resp in zip(docs, responses, strict=True):
        per.append(utils.process_results(doc, [resp]))

    def mean(xs: list[bool]) -> float:
        return round(sum(xs) / len(xs), 4) if xs else 0.0

    metrics = {
        "prompt_level_strict_acc": mean([p["prompt_level_strict_acc"] for p in per]),
        "inst_level_strict_acc": mean([x for p in per for x in p["inst_level_strict_acc"]]),
        "prompt_level_loose_acc": mean([p["prompt_level_loose_acc"] for p in per]),
        "inst_level_loose_acc": mean([x for p in per for x in p["inst_level_loose_acc"]]),
    }
    return metrics, per


def table(metrics: dict[str, float], n_prompts: int, n_inst: int, skipped: int, model: str) -> str:
    return "\n".join([
        f"### IFEval (lm-eval checkers): {model}, {n_prompts} prompts, {n_inst} instructions"
        + (f", {skipped} prompts skipped" if skipped else ""), "",
        "| level | strict | loose |", "|---|---:|---:|",
        f"| prompt | {metrics['prompt_level_strict_acc']:.2%} | {metrics['prompt_level_loose_acc']:.2%} |",
        f"| instruction | {metrics['inst_level_strict_acc']:.2%} | {metrics['inst_level_loose_acc']:.2%} |", ""])


def main(args: argparse.Namespace) -> int:
    import httpx

    from ds4f.tools.endpoint import EndpointDown, probe

    try:
        for flag, value in (("--max-tokens", args.max_tokens), ("--concurrency", args.concurrency),
                            ("--limit", 1 if args.limit is None else args.limit)):
            if value < 1:
                raise ValueError(f"{flag} {value}: give at least 1")
        if not args.data.is_file():
            raise ValueError(f"--data {args.data}: no such file; give an IFEval-format jsonl")
        docs = load(args.data)[: args.limit]
        ep = probe(args.base_url, api_key=args.api_key, model=args.model, command="ds4f eval ifeval")
        utils, unsupported = checkers()
        registry = utils.instructions_registry.INSTRUCTION_DICT
        unknown = sorted({i for d in docs for i in d["instruction_id_list"] if i not in registry})
        if unknown:
            raise ValueError(f"--data {args.data}: instruction ids lm-eval does not know: {unknown}")
    except (ValueError, EndpointDown) as e:
        print(f"ds4f eval ifeval: error: {e}" if isinstance(e, ValueError) else str(e), file=sys.stderr)
        return 2
    skipped = [d for d in docs if set(d["instruction_id_list"]) & set(unsupported)]
    docs = [d for d in docs if d not in skipped]
    for iid, why in unsupported.items():
        n = sum(iid in d["instruction_id_list"] for d in skipped)
        if n:
            print(f"ds4f eval ifeval: skipping {n} prompt(s) with {iid}: {why}", file=sys.stderr)
    if not docs:
        print("ds4f eval ifeval: error: every prompt was skipped; nothing to score", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    from rich.console import Console
    from rich.progress import track

    url = f"{ep.v1}/chat/completions"
    with httpx.Client(timeout=args.timeout, headers=headers) as client, \
            ThreadPoolExecutor(args.concurrency) as pool:
        pending = pool.map(lambda d: ask(client, url, ep.model_id, d["prompt"], args), docs)
        replies = list(track(pending, total=len(docs), description="IFEval prompts", transient=True,
                             console=Console(stderr=True)))
    errors = [(d["key"], r["error"]) for d, r in zip(docs, replies, strict=True) if r["error"]]
    metrics, per = score(utils, docs, [r["response"] for r in replies])
    n_inst = sum(len(d["instruction_id_list"]) for d in docs)
    text = table(metrics, len(docs), n_inst, len(skipped), ep.model_id)
    out: Path = args.out or Path("eval-results") / time.strftime("ifeval-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ifeval.md").write_text(text)
    (out / "ifeval.json").write_text(json.dumps({
        "model": ep.model_id, "base_url": ep.base_url, "data": str(args.data), "metrics": metrics,
        "prompts": len(docs), "instructions": n_inst, "request_errors": errors,
        "skipped": [{"key": d["key"], "instruction_id_list": d["instruction_id_list"]} for d in skipped],
        "unsupported_offline": unsupported,
        "samples": [{"key": d["key"], "response": r["response"], "finish_reason": r.get("finish_reason"), **p}
                    for d, r, p in zip(docs, replies, per, strict=True)]}, indent=2))
    print(text)
    print(f"wrote {out / 'ifeval.md'}, {out / 'ifeval.json'}")
    if errors:
        print(f"ds4f eval ifeval: {len(errors)} request(s) failed, scored as empty replies: {errors[:3]}",
              file=sys.stderr)
        return 1
    return 0
