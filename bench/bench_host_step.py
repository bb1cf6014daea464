"""bench (CPU): host microseconds of one TP=2 decode step, by phase, with the model's forward replaced by a stub.

Two spawned ranks (a CPU gloo group each for control and for the stub forward, as tests/ranks.py spawns them): rank 0
runs LLMEngine -> TPExecutor -> FastRunner (the real scheduler, wire encoder, broadcast_object, DecodeGraphs.prepare
over the tiny model's FastCache static buffers, sampler, output update); rank 1 runs worker.follow_steps. The CUDA
graph replay is a stub: logits are a constant [bucket, vocab] tensor, and with --sync-forward (default) each replay
does one 8-byte gloo all-reduce, like the graph's first collective: rank 0's step then waits for rank 1 to have
received, decoded and prepared the step (the TP critical path). Prints one line per (batch, phase) with the median
and mean us per pure-decode step, and one `TOTAL` line per batch.

    python3 bench/bench_host_step.py [--batches 1,4] [--steps 300] [--prompt-len 64] [--max-model-len N]
                                     [--block-size 256] [--vocab 1024] [--no-sync-forward] [--profile FILE] [--micro]

Phases are inclusive spans (nested: execute contains bcast, forward, sample; forward contains prepare and replay),
each as wall and this thread's CPU time: on a shared CPU the wall times of the gloo phases (bcast, r1.recv, replay)
are mostly waiting for the other process to be scheduled, so compare CPU times. On a GPU the same phases cost
launch time instead of CPU compute in argmax (sample) and the copies. --micro: one process, no gloo, the runner's
host path per call (cleanest numbers). --device cuda: each rank replays the tiny model's real CUDA graphs (unsharded),
so prepare / replay / sample show the CUDA host costs (pinned copies, launch, the argmax sync: sample's wall time
includes waiting for the replay's GPU time).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import json
import multiprocessing as mp
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds4f.cache.manager import CacheLayout  # noqa: E402
from ds4f.config import EngineConfig  # noqa: E402
from ds4f.distributed import executor as ex_mod  # noqa: E402
from ds4f.distributed import worker as wk_mod  # noqa: E402
from ds4f.distributed.comm import gloo_group  # noqa: E402
from ds4f.distributed.parallel import ParallelConfig  # noqa: E402
from ds4f.engine.engine import LLMEngine  # noqa: E402
from ds4f.model.args import ModelArgs, tiny_config  # noqa: E402
from ds4f.model.deepseek_v4 import Transformer, init_random_  # noqa: E402
from ds4f.runner.gpu.graphs import DecodeGraphs  # noqa: E402
from ds4f.runner.gpu.runner import FastRunner, fast_model  # noqa: E402
from ds4f.sample.params import SamplingParams  # noqa: E402
from ds4f.sample.sampler import Sampler  # noqa: E402


class StubReplay:
    """A captured graph's replay: nothing, or one tiny all-reduce with the other rank (the graph's first collective)."""

    def __init__(self, pg: Any) -> None:
        self.pg, self.t = pg, torch.zeros(1, dtype=torch.int64)

    def replay(self) -> None:
        if self.pg is not None:
            self.pg.allreduce([self.t]).wait()


class StubGraphs(DecodeGraphs):
    """DecodeGraphs with the real static buffers and prepare (host path) but a stub replay and constant logits."""

    def __init__(self, fm: Any, cache: Any, buckets: tuple[int, ...], vocab: int, pg: Any) -> None:
        self.fm, self.cache, self.buckets = fm, cache, tuple(sorted(buckets))
        if hasattr(self, "setup_buffers"):
            self.setup_buffers()
        else:  # a tree before this bench (baseline runs)
            self.buf = cache.decode_buffers(self.buckets[-1], fm.ratios)
        g = torch.Generator().manual_seed(0)
        keys = [(b, c) for b in self.buckets for c in getattr(self, "caps", (None,))]
        self.graphs = {k: StubReplay(pg) for k in keys}  # type: ignore[misc]
        self.out = {k: torch.randn(k[0], vocab, generator=g) for k in keys}
        self.events = []


class Spans:
    """Inclusive spans per phase name: wall seconds (perf_counter) under `name`, this thread's CPU seconds
    (thread_time: what the phase costs the host even when the shared CPU makes it wait) under `name~`."""

    def __init__(self) -> None:
        self.s: dict[str, list[float]] = defaultdict(list)
        self.label = ""  # rank 1: the batch size of the step being run (set when its message is decoded)

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                self.s[name + self.label].append(time.perf_counter() - t0)
                self.s[name + "~" + self.label].append(time.thread_time() - c0)

        setattr(obj, attr, timed)

    def clear(self) -> None:
        self.s.clear()


def build_runner(args: ModelArgs, opts: argparse.Namespace, pg: Any) -> FastRunner:
    """The tiny model's FastRunner; CPU: StubGraphs; CUDA: its real decode graphs (each rank an unsharded copy)."""
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=0).to(opts.device)
    layout = CacheLayout.from_model_args(args, opts.block_size, "bfloat16")
    num_slots = max(opts.batches)
    num_blocks = num_slots * -(-opts.max_model_len // opts.block_size) + 4
    cuda = opts.device == "cuda"
    runner = FastRunner(fast_model(model, opts.max_model_len, opts.block_size), layout, num_blocks, num_slots,
                        Sampler(args.eos_token_id), opts.device, opts.max_model_len, opts.max_num_batched_tokens,
                        use_graphs=cuda)
    if cuda:
        return runner
    buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max(64, num_slots))
    runner.graphs = StubGraphs(runner.fm, runner.cache, buckets, opts.vocab, pg)
    return runner


class IdsTokenizer:
    all_special_ids = [0, 1]

    def decode(self, ids: object, skip_special_tokens: bool = False) -> str:
        return ""


def rank_main(rank: int, port: int, opts: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    if opts.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=dt.timedelta(seconds=60))
    ctrl = gloo_group(dist.PrefixStore("ctrl", store), rank, 2, 60.0, "127.0.0.1")
    sync = opts.sync_forward and opts.device == "cpu"
    fwd = gloo_group(dist.PrefixStore("fwd", store), rank, 2, 60.0, "127.0.0.1") if sync else None
    cfg = tiny_config()
    cfg["vocab_size"] = opts.vocab
    args = ModelArgs.from_hf(cfg)
    runner = build_runner(args, opts, fwd)
    pc = ParallelConfig(tensor_parallel_size=2, distributed_timeout=60.0)
    watchdog = ex_mod.Watchdog(rank, pc, store, [])
    spans = Spans()
    if rank == 1:
        spans.wrap(wk_mod, "broadcast_object", "r1.recv")
        decode = wk_mod.WireDecoder.decode

        def labelled(self: Any, msg: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            got = decode(self, msg)
            one = all(len(s.token_ids) == 1 for s in got.seqs)
            spans.label = f"@{len(got.seqs)}" if one else "@prefill"
            spans.s["r1.decode" + spans.label].append(time.perf_counter() - t0)
            spans.s["r1.decode~" + spans.label].append(time.thread_time() - c0)
            return got

        wk_mod.WireDecoder.decode = labelled  # type: ignore[method-assign]
        spans.wrap(runner, "forward_step" if hasattr(runner, "forward_step") else "logits", "r1.forward")
        spans.wrap(runner.graphs, "prepare", "r1.prepare")
        for g in runner.graphs.graphs.values():
            spans.wrap(g, "replay", "r1.replay")
        if hasattr(wk_mod, "follow_steps"):
            wk_mod.follow_steps(rank, ctrl, runner, watchdog, {"last": time.monotonic()})
        else:  # baseline tree: its worker loop, inline
            wire = wk_mod.WireDecoder()
            while True:
                kind, msg = wk_mod.broadcast_object(ctrl, None, rank)
                if kind == "stop":
                    break
                if kind == "step":
                    runner.logits(wire.decode(msg))
        ctrl.barrier().wait()
        Path(out, "rank1.json").write_text(json.dumps(spans.s))
        return
    config = EngineConfig(device=opts.device, dtype="bfloat16", block_size=opts.block_size,
                          max_num_seqs=max(opts.batches), max_num_batched_tokens=opts.max_num_batched_tokens,
                          max_model_len=opts.max_model_len, runner="fast")
    executor = ex_mod.TPExecutor(runner, ctrl, watchdog)
    engine = LLMEngine(config, executor, IdsTokenizer(), args, opts.max_model_len)
    spans.wrap(engine, "step", "step")
    spans.wrap(engine.scheduler, "schedule", "schedule")
    spans.wrap(executor._wire, "encode", "encode")
    spans.wrap(ex_mod, "broadcast_object", "bcast")
    spans.wrap(executor, "execute", "execute")
    spans.wrap(runner, "_sampled_logits" if hasattr(runner, "_sampled_logits") else "logits", "forward")
    spans.wrap(runner.graphs, "prepare", "prepare")
    for g in runner.graphs.graphs.values():
        spans.wrap(g, "replay", "replay")
    spans.wrap(runner, "sampler", "sample")
    spans.wrap(engine, "_update", "update")
    if opts.device == "cuda":
        from ds4f.runner.gpu import graphs as graphs_mod

        graphs_mod.TIMING = True  # CUDA events around each replay: the GPU time the execute span waits for
    g = torch.Generator().manual_seed(1)
    results: dict[str, Any] = {}
    prof = cProfile.Profile() if opts.profile else None
    for b in opts.batches:
        sp = SamplingParams(temperature=0.0, max_tokens=opts.steps + 2, ignore_eos=True)
        for _ in range(b):
            engine.add_request(torch.randint(2, opts.vocab, (opts.prompt_len,), generator=g).tolist(), sp)
        while engine.scheduler.running == [] or any(r.num_computed_tokens < opts.prompt_len
                                                    for r in engine.scheduler.running):
            engine.step()  # prefill (eager tiny forward), not timed
        engine.step()
        spans.clear()
        if prof is not None and b == opts.batches[0]:
            prof.enable()
        while engine.has_unfinished_requests():
            engine.step()
        if prof is not None and b == opts.batches[0]:
            prof.disable()
        n = len(spans.s["step"])
        results[str(b)] = {k: v[-n:] for k, v in spans.s.items()}
        if opts.device == "cuda":
            results[str(b)]["replay_gpu"] = [(runner.graphs.replay_ms() or 0.0) / 1e3]
    executor.close()
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").dump_stats(opts.profile)
    Path(out, "rank0.json").write_text(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=0, help="0: prompt + steps + 8")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024, help="stub logits width (129280: the model's; the CPU argmax "
                    "then dominates `sample`, a GPU kernel launch on the device)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the tiny model's real decode graphs on rank % GPUs (no stub, no forward sync)")
    ap.add_argument("--micro", action="store_true", help="one process, no TP: the runner's host path per call")
    ap.add_argument("--no-sync-forward", dest="sync_forward", action="store_false")
    ap.add_argument("--profile", default="", help="cProfile stats of rank 0's decode steps of the first batch")
    opts = ap.parse_args()
    opts.batches = [int(b) for b in opts.batches.split(",")]
    opts.max_model_len = opts.max_model_len or opts.prompt_len + opts.steps + 8
    if opts.micro:
        micro(opts)
        return
    import tempfile

    out = tempfile.mkdtemp(prefix="ds4f-host-step-")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=dt.timedelta(seconds=60), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, store.port, opts, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = json.loads(Path(out, "rank0.json").read_text())
    r1 = json.loads(Path(out, "rank1.json").read_text())
    order = ("step", "schedule", "execute", "encode", "bcast", "forward", "prepare", "replay", "sample", "update")
    for b, phases in res.items():
        rows = [(k, phases.get(k), phases.get(k + "~")) for k in order]
        rows += [(k, r1.get(f"{k}@{b}", [])[5:], r1.get(f"{k}~@{b}", [])[5:])
                 for k in ("r1.recv", "r1.decode", "r1.forward", "r1.prepare", "r1.replay")]
        for k, wall, cpu in rows:
            if wall:
                med = statistics.median
                print(f"b={b} {k:10s} wall median {1e6 * med(wall):8.1f} us   cpu median {1e6 * med(cpu):7.1f} us"
                      f"  mean {1e6 * statistics.fmean(cpu):7.1f} us  n={len(wall)}")
        med = statistics.median
        r1_cpu = med(r1.get(f"r1.decode~@{b}", [0.0])) + med(r1.get(f"r1.forward~@{b}", [0.0]))
        print(f"TOTAL b={b}: rank 0 step cpu {1e6 * med(phases['step~']):.1f} us (wall {1e6 * med(phases['step']):.1f}"
              f" us), rank 1 message -> launch cpu {1e6 * r1_cpu:.1f} us (sync_forward={opts.sync_forward})")
        if "replay_gpu" in phases:
            gpu = phases["replay_gpu"][0]
            print(f"TOTAL b={b}: execute wall {1e6 * med(phases['execute']):.1f} us, replay GPU {1e6 * gpu:.1f} us "
                  f"(median), execute host beyond the GPU {1e6 * (med(phases['execute']) - gpu):.1f} us")


def micro(opts: argparse.Namespace) -> None:
    """One process, no gloo: CPU us per call of the runner's host path (execute = forward + sampler, the worker's
    forward, prepare alone) on a pure-decode step of each batch size."""
    from ds4f.engine.outputs import ScheduledSeq, SchedulerOutput

    torch.set_num_threads(1)
    cfg = tiny_config()
    cfg["vocab_size"] = opts.vocab
    args = ModelArgs.from_hf(cfg)
    runner = build_runner(args, opts, None)
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for b in opts.batches:
        seqs = [ScheduledSeq(f"r{i}", [5], opts.prompt_len, [i], i, True, params=sp,
                             prompt_token_ids=[1] * opts.prompt_len, output_token_ids=[3]) for i in range(b)]
        out = SchedulerOutput(seqs, b)
        calls = {"execute": runner.execute, "worker forward": getattr(runner, "forward_step", runner.logits),
                 "prepare": lambda o: runner.graphs.prepare([(s.slot, s.start_pos, s.token_ids[0]) for s in o.seqs])}
        for name, fn in calls.items():
            for _ in range(200):
                fn(out)
            c0 = time.thread_time()
            for _ in range(opts.steps * 10):
                fn(out)
            print(f"micro b={b} {name:15s} cpu {1e6 * (time.thread_time() - c0) / (opts.steps * 10):7.1f} us per call")


if __name__ == "__main__":
    main()
