"""⑤ model runner: SchedulerOutput in → flat batch → model forward → logits at sampled rows → RunnerOutput out."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ds4f.cache.manager import CacheLayout
from ds4f.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from ds4f.engine.outputs import RunnerOutput, SchedulerOutput
from ds4f.model.args import ModelArgs
from ds4f.model.cache import AttnBatch, DenseCache
from ds4f.runner.kv_cache import PagedKVCache
from ds4f.runner.memory_plan import graph_reserve, runtime_table
from ds4f.sample.sampler import Sampler, SamplingRequest


@dataclass
class InputBatch:
    input_ids: torch.Tensor  # [T] int64, every scheduled chunk back to back
    positions: torch.Tensor  # [T] int64
    query_start_loc: list[int]  # [B + 1]; sequence b owns rows query_start_loc[b]:query_start_loc[b+1]
    start_pos: list[int]  # [B]
    block_tables: list[list[int]]  # [B][blocks]
    slots: list[int]  # [B]
    logits_rows: list[int]  # rows whose next token is sampled: the last row of each chunk that reaches the end


def build_input_batch(out: SchedulerOutput, device: torch.device | str = "cpu") -> InputBatch:
    ids: list[int] = []
    pos: list[int] = []
    qsl = [0]
    rows = []
    for s in out.seqs:
        n = len(s.token_ids)
        ids.extend(s.token_ids)
        pos.extend(range(s.start_pos, s.start_pos + n))
        qsl.append(qsl[-1] + n)
        if s.sample:
            rows.append(qsl[-1] - 1)
    return InputBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(pos, dtype=torch.long, device=device), query_start_loc=qsl,
        start_pos=[s.start_pos for s in out.seqs], block_tables=[s.block_table for s in out.seqs],
        slots=[s.slot for s in out.seqs], logits_rows=rows)


def kv_cache_budget(device: torch.device, gpu_memory_utilization: float, kv_cache_memory: int | None,
                    default_cpu: int, reserve: int = 0) -> int:
    """Bytes for the KV cache: kv_cache_memory if set; on CPU a fixed default; on GPU what is left of
    gpu_memory_utilization x total after what is in use (weights, other processes), the activation peak of the
    warmup forward (the caller runs `warmup` first) and `reserve` (the CUDA-graph pool, captured after the cache)."""
    if kv_cache_memory is not None:
        return kv_cache_memory
    if device.type != "cuda":
        return default_cpu
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    peak = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    return max(0, int(total * gpu_memory_utilization) - used - peak - reserve)


def sampling_requests(seqs: list[Any]) -> list[SamplingRequest]:
    """The sampler's view of the step's sampled ScheduledSeqs, in order."""
    return [SamplingRequest(s.params, s.prompt_token_ids, s.output_token_ids, s.generator) for s in seqs]


def sample_outputs(sampler: Callable[..., Any], logits: torch.Tensor | None, out: SchedulerOutput) -> RunnerOutput:
    """logits [n, vocab] at the step's sampled rows (None: nothing sampled) -> RunnerOutput of those sequences, in
    order (every runner's last stage; call in inference mode: the sampler edits the logits in place)."""
    if logits is None:
        return RunnerOutput([], [])
    seqs = [s for s in out.seqs if s.sample]
    result = sampler(logits, sampling_requests(seqs))
    return RunnerOutput(req_ids=[s.req_id for s in seqs], token_ids=list(result.token_ids), logprobs=result.logprobs)


class ModelRunner:
    """Owns the model, the KV tensors and the sampler; `execute` runs one scheduled step."""

    def __init__(self, model: Any, layout: CacheLayout, num_blocks: int, num_slots: int, sampler: Callable[..., Any],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.model, self.sampler, self.layout = model, sampler, layout
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.device = torch.device(device)
        self.kv = PagedKVCache(layout, num_blocks, num_slots, dtype, self.device)

    @torch.inference_mode()
    def logits(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Forward the step's chunks; logits [N, V] fp32 of the N sampled rows (None when nothing samples)."""
        b = build_input_batch(out, self.device)
        batch = AttnBatch(query_start_loc=b.query_start_loc, start_pos=b.start_pos,
                          cache=self.kv.bind(b.block_tables, b.slots))
        streams = self.model(b.input_ids, b.positions, batch)
        if not b.logits_rows:
            return None
        return self.model.compute_logits(streams[b.logits_rows]).float()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        # NOTE: the sampler and logits processors edit the logits in place, so they run in inference mode too
        return sample_outputs(self.sampler, self.logits(out) if out.seqs else None, out)


@torch.inference_mode()
def warmup(model: Any, num_tokens: int, num_logits: int, device: torch.device) -> None:
    """One forward of a full step budget (dense scratch cache), so the activation peak is known before sizing."""
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    streams = model(ids, torch.arange(num_tokens, device=device), AttnBatch([0, num_tokens], [0], DenseCache()))
    model.compute_logits(streams[-min(num_logits, num_tokens):])
    torch.cuda.synchronize(device)
    del streams
    torch.cuda.empty_cache()


# auto takes the fast path on CUDA (its engine-driven GPU tests, tests/gpu/test_fast_runner_gpu.py, pass on H200)
FAST_BY_DEFAULT = True


def choose_runner(config: EngineConfig) -> str:
    """--runner: "fast" or "reference"; auto = fast on CUDA with TP 1 when the fast path supports the dtypes and
    FAST_BY_DEFAULT is set."""
    if config.runner != "auto":
        return config.runner
    if not FAST_BY_DEFAULT or config.resolved_device != "cuda" or config.tensor_parallel_size != 1:
        return "reference"
    from ds4f.kernels import HAS_TRITON
    from ds4f.runner.gpu.runner import check_fast_supported

    ok = HAS_TRITON and check_fast_supported(config.resolved_dtype, config.resolved_kv_cache_dtype) is None
    return "fast" if ok else "reference"


def use_fast(config: EngineConfig) -> bool:
    """choose_runner(config) == "fast", checked against what the fast path serves (ValueError naming the flag).
    Decide before loading: the fast path loads packed-only (load_model keep_dequantized=False)."""
    if choose_runner(config) != "fast":
        return False
    from ds4f.runner.gpu.runner import check_fast_supported

    why = check_fast_supported(config.resolved_dtype, config.resolved_kv_cache_dtype)
    if why is not None:
        raise ValueError(f"--runner fast: {why}; use --runner reference")
    return True


@dataclass
class Prepared:
    """A loaded model made ready for build_runner: the runner kind, the FastModel over it (fast only), and on CUDA the
    warmup's activation peak in the allocator's stats (kv_cache_budget reads it)."""
    model: Any
    fast: bool
    fm: Any = None  # FastModel when fast, else None


def model_len(config: EngineConfig, args: ModelArgs) -> int:
    return config.max_model_len or args.max_position_embeddings


def warm_up(prep: Prepared, config: EngineConfig) -> None:
    """The runner's own warmup forward of a full step budget (fast_warmup or warmup); nothing off CUDA."""
    device = torch.device(config.resolved_device)
    if device.type != "cuda":
        return
    mml = model_len(config, prep.model.args)
    num_tokens, num_logits = min(config.max_num_batched_tokens, mml), min(config.max_num_seqs, 256)
    if prep.fast:
        from ds4f.runner.gpu import runner as gpu

        gpu.fast_warmup(prep.fm, gpu.round_up(mml, config.block_size), num_tokens, num_logits, config.block_size,
                        config.resolved_kv_cache_dtype)
    else:
        warmup(prep.model, num_tokens, num_logits, device)


def prepare(config: EngineConfig, model: Any) -> Prepared:
    """Choose the runner for a loaded model, build its FastModel (fast) and warm up once (CUDA) -> Prepared.
    Size the KV cache (kv_cache_budget) after this and before anything else allocates; build_runner takes it."""
    fast = use_fast(config)
    fm = None
    if fast:
        from ds4f.runner.gpu import runner as gpu

        fm = gpu.fast_model(model, model_len(config, model.args), config.block_size)
    prep = Prepared(model, fast, fm)
    warm_up(prep, config)
    return prep


def build_runner(config: EngineConfig, model: Any = None, sampler: Callable[..., Any] | None = None,
                 prepared: Prepared | None = None) -> tuple[Any, ModelArgs, int]:
    """Load the model (unless given), `prepare` it (unless given prepared: no second warmup), size and allocate the
    KV cache -> (runner, model args, max_model_len). The runner is a ModelRunner or (--runner, choose_runner) a
    FastRunner; both size the cache the same way."""
    device = torch.device(config.resolved_device)
    dtype = getattr(torch, config.resolved_dtype)
    if prepared is None:
        if model is None:
            from ds4f.model.loader import load_model

            # the fast path computes on packed FP8 / MXFP4 weights directly: no dequantized copies
            model = load_model(config.model, dtype=dtype, device=str(device), load_format=config.load_format,
                               seed=config.seed, keep_dequantized=not use_fast(config))
        prepared = prepare(config, model)
    elif model is not None and model is not prepared.model:
        raise ValueError("build_runner: pass the model or a Prepared of it, not both")
    model, fast, fm = prepared.model, prepared.fast, prepared.fm
    args: ModelArgs = model.args
    max_model_len = model_len(config, args)
    layout = CacheLayout.from_model_args(args, config.block_size, config.resolved_kv_cache_dtype)
    budget = kv_cache_budget(device, config.gpu_memory_utilization, config.kv_cache_memory,
                             DEFAULT_CPU_KV_CACHE_MEMORY, graph_reserve(config, model, device))
    num_blocks, num_slots = layout.plan(budget, config.max_num_seqs)
    fit = num_blocks * config.block_size
    if fit < max_model_len:
        if config.max_model_len is not None:
            raise ValueError(f"--max-model-len {max_model_len} needs {-(-max_model_len // config.block_size)} KV "
                             f"blocks but the cache budget ({budget / 2**30:.2f} GiB) holds {num_blocks} blocks "
                             f"({fit} tokens); lower --max-model-len or raise the KV cache memory")
        log(f"max_model_len {max_model_len} does not fit the KV cache; capped to {fit} tokens")
        max_model_len = fit
    log(f"engine: {config.summary()}")
    log(layout.describe(num_blocks, num_slots))
    log(runtime_table(config, model, layout, budget, num_blocks, num_slots, device))
    sampler = sampler or Sampler(args.eos_token_id)
    if fast:
        from ds4f.runner.gpu import runner as gpu

        log("runner: fast path (FastModel over flat pools, CUDA-graph decode on CUDA)")
        runner: Any = gpu.FastRunner(fm, layout, num_blocks, num_slots, sampler, device, max_model_len,
                                     config.max_num_batched_tokens)
    else:
        runner = ModelRunner(model, layout, num_blocks, num_slots, sampler, dtype, device)
    return runner, args, max_model_len


def log(msg: str) -> None:
    print(f"[ds4f] {msg}", file=sys.stderr, flush=True)
