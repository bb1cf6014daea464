"""bench: CPU overhead of one engine step outside the model (schedule, runner batch prep, sampling, output update)
with 64 running requests and a no-op model; prints one fixed-format line.

    python bench/bench_scheduler.py [--running 64] [--context 1024] [--steps 200]   (ds4f installed, or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ds4f.config import EngineConfig
from ds4f.engine.llm import build_engine
from ds4f.engine.outputs import RunnerOutput
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.cache import AttnBatch
from ds4f.runner.model_runner import build_input_batch
from ds4f.sample.params import SamplingParams
from ds4f.sample.sampler import SamplingRequest
from ds4f.tokenizer import load_tokenizer


class NoOpModel(torch.nn.Module):
    """Model time excluded: streams and logits are constant tensors (greedy picks token 2 forever)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.logits_row = torch.zeros(args.vocab_size)
        self.logits_row[2] = 1.0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 1, 1)

    def compute_logits(self, streams: torch.Tensor) -> torch.Tensor:
        return self.logits_row.expand(streams.shape[0], -1).clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(1)
    args = ModelArgs.from_hf(tiny_config())
    cfg = EngineConfig(device="cpu", dtype="float32", max_num_seqs=a.running, kv_cache_memory=256 << 20,
                       max_model_len=a.context + a.steps + 128)
    eng = build_engine(cfg, model=NoOpModel(args), tokenizer=load_tokenizer())
    p = SamplingParams(temperature=0.0, max_tokens=a.steps + 64, ignore_eos=True)
    for i in range(a.running):
        eng.add_request([3 + i] * a.context, p)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()):
        eng.step()  # prefill everything first; the timed steps are pure decode at `running` sequences
    runner = eng.runner
    t = {"schedule": 0.0, "prep": 0.0, "sample": 0.0, "update": 0.0}
    for _ in range(a.steps):
        t0 = time.perf_counter()
        sched = eng.scheduler.schedule()
        t1 = time.perf_counter()
        b = build_input_batch(sched, runner.device)
        batch = AttnBatch(b.query_start_loc, b.start_pos, runner.kv.bind(b.block_tables, b.slots))
        reqs = [SamplingRequest(s.params, s.prompt_token_ids, s.output_token_ids, s.generator) for s in sched.seqs]
        t2 = time.perf_counter()
        logits = runner.model.compute_logits(runner.model(b.input_ids, b.positions, batch)[b.logits_rows])
        t2m = time.perf_counter()  # model time (no-op: allocating the [B, V] logits) is excluded
        result = runner.sampler(logits, reqs)
        out = RunnerOutput([s.req_id for s in sched.seqs], result.token_ids, result.logprobs)
        t3 = time.perf_counter()
        eng._update(sched, out)
        t4 = time.perf_counter()
        assert len(sched.seqs) == a.running, (len(sched.seqs), eng.scheduler.num_running, eng.scheduler.num_waiting)
        for k, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2m, t4 - t3)):
            t[k] += dt
    us = {k: v / a.steps * 1e6 for k, v in t.items()}
    print(f"bench_scheduler: running={a.running} context={a.context} steps={a.steps} block={cfg.block_size} | "
          f"schedule {us['schedule']:.0f} us | runner prep {us['prep']:.0f} us | sample [B,{args.vocab_size}] "
          f"{us['sample']:.0f} us | "
          f"update {us['update']:.0f} us | bookkeeping {us['schedule'] + us['prep'] + us['update']:.0f} us/step "
          f"(+ sample) | torch {torch.__version__} "
          f"{platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
