"""⑦ full-model bench: DeepSeek-V4-Flash (43 layers, its checkpoint formats: FP8 block-scaled attention, MXFP4 routed
experts; `--load-format dummy` weights) through the engine at TP=N with the fast runner and fp8 KV in; one line +
one JSON record per case out (bench/results/full.jsonl).

Cases, in this order (each record is written as soon as it is measured):
  decode b=1 at depth ~0, decode b=B (--batches), then one --ttft-tokens prompt through chunked prefill (TTFT) and
  decode right after it at that depth. Decode tok/s = batch / median step time of the pure-decode steps of the full
  batch (rank 0's executor, synchronized); collectives per step (count, bytes, time on rank 0's stream) from Comm.
Roofline (per rank): bytes a decode step must read = every parameter/buffer but the embedding and the routed experts,
+ expected distinct experts hit (uniform routing) x bytes per expert, + KV rows read at that depth; over the copy
bandwidth measured before the engine starts.
--tp-sim N (with --tp 1): one GPU runs rank 0 of a TP=N group alone (its weight shards, its kernels at the per-rank
shapes) with every collective a counted no-op, so a machine with one GPU measures a TP rank's step without the wire;
records carry `tp_sim` and a projection that adds --sim-allreduce-us per all-reduce (2 per layer).
--profile DIR: a kernel-time table of rank 0 over decode steps at b=1 (categories: weights GEMM, MoE, attention +
indexer, collectives, other) and one step's timeline; the breakdown record's critical_ms_by_category charges that
step's graph replay along rank 0's main stream (bench/step_breakdown.py), summing to its span.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import whatif  # noqa: E402
from bench_decode import write_timeline  # noqa: E402
from bench_tp import StepTimer, versions  # noqa: E402
from step_breakdown import timeline_ms  # noqa: E402

from bench.common import IdsOnlyTokenizer, measure_ceilings  # noqa: E402
from ds4f.config import EngineConfig  # noqa: E402
from ds4f.distributed.comm import Comm  # noqa: E402
from ds4f.engine.llm import build_engine  # noqa: E402
from ds4f.engine.roofline import kv_bytes  # noqa: E402
from ds4f.model.args import ModelArgs, flash_config  # noqa: E402
from ds4f.runner.memory_plan import module_bytes  # noqa: E402
from ds4f.sample.params import SamplingParams  # noqa: E402

CATEGORIES = (  # kernel-name substrings -> step-time category (first match wins)
    ("collectives", ("nccl", "allreduce", "all_reduce", "allgather")),
    ("moe", ("_moe", "mxfp4", "_up_mx", "_down_mx", "_up_gemv", "_down_gemv")),
    ("attention", ("_attn",)),
    ("indexer", ("_indexer", "_topk", "gathertopk", "sbtopk", "radix")),
    ("mhc", ("_hc_",)),
    ("weights_gemm", ("nvjet", "gemm", "cutlass", "_w8", "_a8", "_fp8", "splitk", "sum_splits", "xmma")),
)


class _NoWire:
    """A process group with nobody else in it: all-reduce leaves each tensor as it is (the rank's partial sum),
    all-gather fills every slot with the local shard (right shapes, not the other ranks' values)."""

    class _Done:
        def wait(self) -> None:
            pass

    def allreduce(self, _ts: list[torch.Tensor]) -> _Done:
        return self._Done()

    def allgather(self, outs: list[list[torch.Tensor]], ins: list[torch.Tensor]) -> _Done:
        for o in outs[0]:
            o.copy_(ins[0])
        return self._Done()


class SimComm(Comm):
    """Rank 0 of a `world`-rank group run alone (--tp-sim): Comm over _NoWire, counted as usual."""

    def __init__(self, world: int) -> None:
        super().__init__(0, world, pg=_NoWire())


def model_dir(layers: int, experts: int) -> str:
    cfg = flash_config()
    if layers != cfg["num_hidden_layers"]:
        cfg["compress_ratios"] = cfg["compress_ratios"][:layers] + cfg["compress_ratios"][-1:]
        cfg["num_hidden_layers"] = layers
    cfg["n_routed_experts"] = experts
    d = tempfile.mkdtemp(prefix="ds4f-flash-")
    (Path(d) / "config.json").write_text(json.dumps(cfg))
    return d


@functools.cache  # one meta-model build per (config, TP): decode_bytes runs for every record
def rank_weight_bytes(args: ModelArgs, tp: int) -> tuple[float, float]:
    """(bytes every decode step reads on one rank except the routed experts, bytes of one routed expert on one
    rank), in the checkpoint's formats (FP8 + block scales, MXFP4 + UE8M0, bf16 / fp32 as stored), from
    memory_plan.module_bytes. Not counted: the embedding (one row per token), the MTP layer (not run) and buffers
    (RoPE tables: a few rows per token)."""
    dense = experts = 0.0
    for name, n in module_bytes(args, torch.bfloat16, tp, buffers=False):
        if name.startswith(("embed", "mtp")):
            continue
        if ".ffn.experts." in f"{name}.":
            experts += n
        else:
            dense += n
    return dense, experts / (args.num_hidden_layers * args.n_routed_experts)


def decode_bytes(args: ModelArgs, tp: int, depth: int, batch: int) -> float:
    """Per-rank bytes of one decode step: rank_weight_bytes + expected distinct experts hit (uniform routing) + the
    KV every rank reads (the pools are replicated: fp8 rows of 584 B, index keys 128 B + an fp32 scale)."""
    dense, per_expert = rank_weight_bytes(args, tp)
    hit = args.n_routed_experts * (1 - (1 - 1 / args.n_routed_experts) ** (args.num_experts_per_tok * batch))
    return dense + args.num_hidden_layers * hit * per_expert + batch * sum(kv_bytes(args, depth, 584, 132))


def categorize(prof: Any) -> dict[str, float]:
    out: dict[str, float] = {c: 0.0 for c, _ in CATEGORIES}
    out["other"] = 0.0
    for e in prof.key_averages():
        if e.device_time_total <= 0:
            continue
        name = e.key.lower()
        cat = next((c for c, subs in CATEGORIES if any(s in name for s in subs)), "other")
        out[cat] += e.device_time_total / 1e3
    return out


def _profiled(engine: Any, steps: int, path: Path, head: str) -> dict[str, float]:
    """`steps` engine steps under the CUDA profiler -> rank 0's kernel table at path, their timeline beside it
    (*_timeline.txt); returns the last step's main-stream breakdown in ms (bench/step_breakdown.py)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    cats = {k: round(v / steps, 3) for k, v in categorize(prof).items()}
    path.write_text(f"{head}\nms per step by category: {json.dumps(cats)}\n"
                    + prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=70))
    tl = path.with_name(path.stem + "_timeline.txt")
    write_timeline(prof, tl)
    return timeline_ms(tl)


def run_case(engine: Any, timer: StepTimer, prompts: list[list[int]], new: int,
             profile_chunk: Path | None = None, profile_decode: Path | None = None) -> tuple[float | None, float, dict]:
    """-> (TTFT s of the first prompt, wall s, decode summary of the full batch + engine_tokens_per_s: tokens
    after every request's first one over the wall time since then, i.e. with the scheduler, sampler and output
    bookkeeping the step time leaves out). profile_chunk: a kernel table of the prefill step that starts past 7/8
    of the first prompt (rank 0), written there. profile_decode: one of 8 decode steps after the 16th new token
    (their step times are left out of the summary; the last one's main-stream breakdown goes into it)."""
    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    timer.steps.clear()
    graphs = getattr(getattr(engine.runner, "runner", engine.runner), "graphs", None)
    if graphs is not None and hasattr(graphs, "replay_ms"):
        graphs.replay_ms()  # forget earlier cases' replays
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, sp) for p in prompts]
    ttft, last, all_first = None, t0, None
    prof_s, prof_tokens = 0.0, 0  # profiled decode steps: left out of the engine rate too
    crit: dict[str, float] | None = None  # the profiled decode step's main-stream breakdown
    while engine.has_unfinished_requests():
        if profile_chunk is not None and reqs[0].num_computed_tokens >= len(prompts[0]) * 7 // 8 and ttft is None:
            start = reqs[0].num_computed_tokens
            _profiled(engine, 1, profile_chunk, f"rank 0, one prefill step from position {start}")
            profile_chunk = None
        elif profile_decode is not None and len(reqs[0].output_token_ids) >= 16 and new >= 32:
            n0, p0 = len(timer.steps), time.perf_counter()
            crit = _profiled(engine, 8, profile_decode, f"rank 0, 8 decode steps of batch {len(prompts)} from "
                                                        f"position {reqs[0].num_computed_tokens}")
            del timer.steps[n0:]
            prof_s, prof_tokens = time.perf_counter() - p0, 8 * len(prompts)
            profile_decode = None
        else:
            engine.step()
        now = time.perf_counter()
        if ttft is None and reqs[0].output_token_ids:
            ttft = now - t0
        if all_first is None and all(r.output_token_ids for r in reqs):
            all_first = now
        if ttft is None and now - last > 20:
            print(f"  prefill {reqs[0].num_computed_tokens}/{len(prompts[0])} tokens at {now - t0:.0f}s", flush=True)
            last = now
    end = time.perf_counter()
    summ = timer.summary(len(prompts))
    if crit is not None:
        summ["critical_ms_by_category"] = crit
    graphs = getattr(getattr(engine.runner, "runner", engine.runner), "graphs", None)
    if graphs is not None and hasattr(graphs, "replay_ms"):  # DS4F_GRAPH_TIMING=1: rank 0's replay GPU time
        summ["replay_gpu_ms"] = graphs.replay_ms()
    if all_first is not None and end > all_first and new > 1:
        summ["engine_tokens_per_s"] = round((len(prompts) * (new - 1) - prof_tokens) / (end - all_first - prof_s), 1)
    return ttft, end - t0, summ


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tp-sim", type=int, default=0, help="with --tp 1: run rank 0 of a TP group of this size alone")
    ap.add_argument("--sim-allreduce-us", type=float, default=7.8,
                    help="per all-reduce in the --tp-sim projection (6.8 us one-shot + 1.0 us copy-in: rank 0's "
                         "graph replay of the full model on 2 H200s, session 7)")
    ap.add_argument("--layers", type=int, default=43)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--ttft-tokens", type=int, default=1048576, help="0: skip the long prompt")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=0,
                    help="0: the longest case + decode; 1048576 captures the decode graphs for 1M-token sessions")
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="the engine's --async-scheduling (default: the engine's, on); "
                         "its steps are not timed one by one (their GPU work overlaps), so a decode record's step_ms "
                         "is the engine rate's period (step_from: engine_rate)")
    ap.add_argument("--profile", default="", help="directory for rank 0's decode kernel-time table")
    ap.add_argument("--out", default=str(ROOT / "bench/results/full.jsonl"))
    ap.add_argument("--command", default=" ".join(sys.argv))
    ap.add_argument("--whatif", default=os.environ.get("DS4F_BENCH_WHATIF", ""),
                    help="timing-only variants (bench/whatif.py; wrong outputs); default: $DS4F_BENCH_WHATIF")
    args = ap.parse_args()
    whatifs = whatif.apply(args.whatif)  # before the engine: its graphs capture the variant
    copy_gbps, mm_tflops = measure_ceilings(iters=10)
    torch.cuda.empty_cache()
    batches = [int(b) for b in args.batches.split(",")]
    max_len = max(args.max_model_len, max(args.ttft_tokens, args.prompt_len) + args.decode_tokens + 8)
    config = EngineConfig.from_kwargs(
        model=model_dir(args.layers, args.experts), load_format="dummy", tensor_parallel_size=args.tp,
        runner="fast", kv_cache_dtype=args.kv_cache_dtype, dtype="bfloat16", max_model_len=max_len,
        max_num_seqs=max(batches), max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, async_scheduling=args.async_scheduling)
    t0 = time.perf_counter()
    sim = None
    if args.tp_sim > 1:
        if args.tp != 1:
            raise SystemExit("--tp-sim runs one rank in this process: use it with --tp 1")
        from ds4f.model.loader import load_model

        sim = load_model(config.model, dtype=torch.bfloat16, device="cuda", load_format="dummy",
                         tp_rank=0, tp_world=args.tp_sim, comm=SimComm(args.tp_sim), keep_dequantized=False)
    engine = build_engine(config, model=sim, tokenizer=IdsOnlyTokenizer())
    startup = time.perf_counter() - t0
    ex = engine.runner
    local = ex.runner if hasattr(ex, "runner") else ex
    fm = local.model
    model = getattr(fm, "model", fm)
    comm = getattr(model, "tp_comm", None)
    timer = StepTimer(ex, comm, "cuda")
    rank_tp = args.tp_sim if sim is not None else args.tp  # the per-rank shapes the roofline is for
    meta = dict(versions("cuda"), command=args.command, tp=args.tp, tp_sim=args.tp_sim or None, layers=args.layers,
                experts=args.experts,
                kv_cache_dtype=args.kv_cache_dtype, max_model_len=max_len, copy_GBps=round(copy_gbps, 1),
                runner=type(local).__name__, async_scheduling=engine.async_scheduling,
                startup_s=round(startup, 1), weights_GiB_rank0=round(torch.cuda.memory_allocated() / 2**30, 2),
                model="DeepSeek-V4-Flash config, FP8 attention + MXFP4 experts, dummy weights",
                **({"whatif": whatifs, "timing_only": True} if whatifs else {}))
    print(f"# startup {startup:.1f}s on {args.tp} GPUs, copy {copy_gbps:.0f} GB/s, bf16 mm {mm_tflops:.0f} TFLOP/s",
          flush=True)
    g = torch.Generator().manual_seed(0)
    a = model.args

    def prompt(n: int) -> list[int]:
        return torch.randint(2, a.vocab_size, (n,), generator=g).tolist()

    def emit(rec: dict[str, Any]) -> None:
        rec.update(meta)
        print(" ".join(f"{k}={rec[k]}" for k in ("case", "batch", "depth", "tokens_per_s", "roofline_frac",
                                                   "engine_tokens_per_s", "ttft_s", "step_ms", "replay_gpu_ms",
                                                   "projected_tokens_per_s",
                                                   "collective_ms_per_step") if k in rec),
              flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def decode_record(summ: dict, batch: int, depth: int) -> dict[str, Any]:
        step = summ.get("step_ms")
        if not step and summ.get("engine_tokens_per_s"):  # --async-scheduling: no step is timed alone
            step = summ["step_ms"] = round(batch * 1e3 / summ["engine_tokens_per_s"], 3)
            summ["step_from"] = "engine_rate"
        if not step:
            return {"case": "decode", "batch": batch, "depth": depth, "error": "no decode steps"}
        roof = batch / (decode_bytes(a, rank_tp, depth, batch) / (copy_gbps * 1e9))
        tps = batch * 1e3 / step
        rec = dict(summ, case="decode", batch=batch, depth=depth, tokens_per_s=round(tps, 1),
                   roofline_tokens_per_s=round(roof, 1), roofline_frac=round(tps / roof, 3))
        if sim is not None:  # no wire in this run: what 2 all-reduces per layer at the measured latency would add
            proj = step + 2 * a.num_hidden_layers * args.sim_allreduce_us / 1e3
            rec.update(projected_step_ms=round(proj, 3), projected_tokens_per_s=round(batch * 1e3 / proj, 1))
        return rec

    run_case(engine, timer, [prompt(args.prompt_len)], 4)  # first-use compiles outside the timed cases
    for b in batches:
        _, _, summ = run_case(engine, timer, [prompt(args.prompt_len) for _ in range(b)], args.decode_tokens)
        emit(decode_record(summ, b, args.prompt_len))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        steps = 16
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _, _, summ = run_case(engine, timer, [prompt(args.prompt_len)], steps + 2)
            torch.cuda.synchronize()
        cats = {k: round(v / (steps + 2), 4) for k, v in categorize(prof).items()}
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=70)
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        (Path(args.profile) / "profile_full_decode_b1.txt").write_text(
            f"rank 0, {steps + 2} forwards (1 prefill of {args.prompt_len} + decode), ms per forward by category: "
            f"{json.dumps(cats)}\n" + table)
        def decode_timeline(b: int) -> Path:  # a few decode steps of batch b in launch order (the graph replays)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(b):
                    engine.add_request(prompt(args.prompt_len), SamplingParams(max_tokens=4, ignore_eos=True))
                for _ in range(3):
                    engine.step()
                torch.cuda.synchronize()
            while engine.has_unfinished_requests():
                engine.step()
            tl = Path(args.profile) / f"full_decode_b{b}_timeline.txt"
            write_timeline(prof, tl)
            return tl

        tl = decode_timeline(1)
        emit(dict(decode_record(summ, 1, args.prompt_len), case="breakdown", kernel_ms_per_forward=cats,
                  critical_ms_by_category=timeline_ms(tl)))  # one graph replay's main-stream span
        for b in batches:  # the larger batches' steps by category too (where batch b's step time goes)
            if b > 1:
                emit(dict(case="breakdown_timeline", batch=b, depth=args.prompt_len,
                          critical_ms_by_category=timeline_ms(decode_timeline(b))))
    if args.ttft_tokens:
        n = args.ttft_tokens
        pc = Path(args.profile) / f"profile_full_prefill_{n}.txt" if args.profile else None
        pd = Path(args.profile) / f"profile_full_decode_after_{n}.txt" if args.profile else None
        ttft, wall, summ = run_case(engine, timer, [prompt(n)], args.decode_tokens, pc, pd)
        pre = [s["step_ms"] for s in timer.steps if not s["decode"]]
        emit(dict(decode_record(summ, 1, n), case="ttft", ttft_s=round(ttft or 0.0, 2),
                  prefill_tokens_per_s=round(n / (ttft or 1), 1), chunk=args.max_num_batched_tokens,
                  prefill_steps=len(pre), prefill_step_ms_first_last=[round(pre[0], 1), round(pre[-1], 1)]
                  if pre else None, peak_GiB_rank0=round(torch.cuda.max_memory_allocated() / 2**30, 2)))
    if hasattr(ex, "close"):
        ex.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    import os

    os._exit(0)  # NCCL teardown was seen to hang at exit on the GPU machine
