"""⑤ engine TTFT bench: the 8-layer V4-Flash-width bf16 dummy model (bench_decode.bench_args) in, one prompt of N
tokens through LLMEngine + FastRunner with chunked prefill out: TTFT, prefill tok/s, peak GPU memory, appended as one
JSON line to bench/results/ttft.jsonl.

TTFT = add_request .. the first sampled token on the host (every prefill chunk, the logits, the sampler). Startup
(model init, warmup, KV sizing, decode-graph capture) is reported apart. Progress: one line every --progress-s
seconds (the device is synchronised for it), with the prefill rate since the previous line (attention cost grows
with depth).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_decode import BS, bench_args, init_random_gpu_  # noqa: E402

from bench.common import IdsOnlyTokenizer, git_commit, triton_version  # noqa: E402
from ds4f.config import EngineConfig  # noqa: E402
from ds4f.engine.engine import LLMEngine  # noqa: E402
from ds4f.model.deepseek_v4 import Transformer  # noqa: E402
from ds4f.runner.model_runner import build_runner  # noqa: E402
from ds4f.sample.params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072, help="prompt length N")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="prefill chunk (step token budget)")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens generated (the first is the TTFT one)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--progress-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-only", action="store_true",
                    help="build the engine (warmup at this depth, KV sizing, graphs), print memory, record nothing")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a smoke run of the loop on the built-in tiny model (torch fallbacks), nothing recorded")
    ap.add_argument("--out", default=str(ROOT / "bench/results/ttft.jsonl"))
    ap.add_argument("--git", default=None, help="revision to record (default: git rev-parse here)")
    ap.add_argument("--command", default=" ".join(sys.argv))
    args = ap.parse_args()
    n, chunk, cuda = args.tokens, args.max_num_batched_tokens, args.device == "cuda"
    t0 = time.perf_counter()
    if cuda:
        with torch.device("meta"):
            model = Transformer(bench_args(), dtype=torch.bfloat16)
        model = model.to_empty(device="cuda")
        init_random_gpu_(model, seed=args.seed)
        torch.cuda.synchronize()
    else:
        from ds4f.model.loader import load_model

        model = load_model(None, dtype=torch.bfloat16, seed=args.seed)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    config = EngineConfig(device=args.device, dtype="bfloat16", runner="fast", max_model_len=n + args.max_tokens,
                          max_num_seqs=1, max_num_batched_tokens=chunk, block_size=BS,
                          gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                          kv_cache_memory=None if cuda else 64 << 20)
    runner, margs, max_model_len = build_runner(config, model=model)
    engine = LLMEngine(config, runner, IdsOnlyTokenizer(), margs, max_model_len)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    startup = time.perf_counter() - t0
    print(f"# startup {startup:.1f}s: weights {weights_gib:.1f} GiB, KV pools {runner.nbytes / 2**30:.1f} GiB "
          f"({runner.num_blocks} blocks), prompt {n} tokens in chunks of {chunk}", flush=True)
    if args.startup_only:
        if cuda:
            free, total = torch.cuda.mem_get_info()
            print(f"# startup only: peak allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
                  f"free now {free / 2**30:.1f} of {total / 2**30:.1f} GiB", flush=True)
        return

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(2, margs.vocab_size, (n,), generator=g).tolist()
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    req = engine.add_request(ids, sp)
    ttft, last_t, last_done, marks = None, start, 0, []
    while engine.has_unfinished_requests():
        engine.step()
        now = time.perf_counter()
        if ttft is None and req.output_token_ids:
            ttft = now - start
            first_tok_t = now
        done = req.num_computed_tokens
        if ttft is None and now - last_t >= args.progress_s:
            sync()
            now = time.perf_counter()
            rate = (done - last_done) / (now - last_t)
            marks.append({"tokens": done, "s": round(now - start, 2), "tokens_per_s": round(rate, 1)})
            print(f"  prefill {done:>8d}/{n} tokens  {now - start:7.1f}s  {rate:8.0f} tok/s since last line",
                  flush=True)
            last_t, last_done = now, done
    end = time.perf_counter()
    assert ttft is not None and len(req.output_token_ids) == args.max_tokens
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    tpot = (end - first_tok_t) / (args.max_tokens - 1) if args.max_tokens > 1 else None
    rec = {"case": "ttft", "depth": n, "ttft_s": round(ttft, 3), "tokens_per_s": round(n / ttft, 1),
           "chunk": chunk, "max_tokens": args.max_tokens, "tpot_ms": None if tpot is None else round(tpot * 1e3, 2),
           "peak_GiB": round(peak / 2**30, 2), "activation_peak_GiB": round((peak - base) / 2**30, 2),
           "weights_GiB": round(weights_gib, 2), "kv_pool_GiB": round(runner.nbytes / 2**30, 2),
           "startup_s": round(startup, 1), "steps": engine.num_steps, "progress": marks,
           "graph_steps": runner.num_graph_steps, "eager_steps": runner.num_eager_steps,
           "runner": type(runner).__name__, "gpu": torch.cuda.get_device_name() if cuda else "cpu",
           "torch": torch.__version__, "triton": triton_version(), "git": args.git or git_commit(),
           "command": args.command,
           "model": "V4-Flash width, 8 layers (2 SWA, 3 CSA, 3 HCA), bf16, random weights"}
    print(f"ttft depth={n} chunk={chunk}: {ttft:.2f}s = {n / ttft:.0f} tok/s prefill, tpot "
          f"{rec['tpot_ms']} ms, peak {rec['peak_GiB']} GiB (activations {rec['activation_peak_GiB']} GiB)",
          flush=True)
    if not cuda:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
