"""⑤ runner, GPU fast path behind the engine: SchedulerOutput in → StepMeta over FastCache pools → FastModel forward
(eager: prefill chunks, mixed steps) or a DecodeGraphs replay (pure-decode steps on CUDA) → Sampler → RunnerOutput out.

Same interface as ModelRunner (`execute`, `logits`, `.device`, `.layout`, `.num_blocks`, `.num_slots`, `.model`).
Addressing: the engine's KVCacheManager owns allocation and FastCache follows CacheLayout's addressing, so engine
slot s IS FastCache slot s (window ring + compressor carry rows) and engine block b IS FastCache block b
(compressed KV + index entries). FastCache's dummy slot / block (padding, unemitted entries) are num_slots /
num_blocks, past anything the manager hands out. Each step binds the scheduled block tables: EngineCache's
`ensure` / `table_row` read them instead of FastCache's own allocator, so FastCache.build_meta / fill_decode and
DecodeGraphs run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ds4f.cache.manager import CacheLayout
from ds4f.engine.outputs import AHEAD, RunnerOutput, ScheduledSeq, SchedulerOutput
from ds4f.runner.gpu import pools
from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache
from ds4f.runner.model_runner import sample_outputs, sampling_requests

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass
class Pending:
    """A launched step (FastRunner.launch): its sampled ids on the device and their copy on the way to `host`, or the
    finished RunnerOutput of a step that ran synchronously (logprobs, nothing sampled)."""

    req_ids: list[str] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [n] int64, the sampled rows in batch order (what an AHEAD step feeds on)
    host: torch.Tensor | None = None  # [>= n] int64 (pinned on CUDA), the copy's target
    event: Any = None  # CUDA event after the copy (None on CPU: copied already)
    result: RunnerOutput | None = None


class EngineCache(FastCache):
    """FastCache whose block tables are the engine's: `bind` installs one step's (slot -> table); nothing is
    allocated or freed here (the KVCacheManager does both)."""

    def bind(self, seqs: list[ScheduledSeq]) -> None:
        self.tables = {s.slot: s.block_table for s in seqs}

    def ensure(self, slot: int, num_tokens: int) -> list[int]:
        t = self.tables[slot]
        assert 0 <= slot < self.max_seqs, f"slot {slot} outside the {self.max_seqs} sequence slots"
        assert num_tokens <= len(t) * self.block_size and len(t) <= self.max_blocks, \
            f"block table of {len(t)} blocks for {num_tokens} tokens (max {self.max_blocks} blocks)"
        return t

    def release(self, slot: int) -> None:
        self.tables.pop(slot, None)


def graph_buckets(num_slots: int, max_tokens: int, largest: int = GRAPH_BUCKETS[-1]) -> tuple[int, ...]:
    """Powers of two up to the first that holds every slot; a bucket never exceeds the scratch rows (max_tokens)."""
    out: list[int] = []
    for b in GRAPH_BUCKETS:
        if b > min(max_tokens, largest):
            break
        out.append(b)
        if b >= num_slots:
            break
    return tuple(out)


class FastRunner:
    """Owns the FastModel, its pools (EngineCache), the decode graphs and the sampler; `execute` runs one step,
    `launch` + `collect` the same in two halves (--async-scheduling)."""

    supports_launch = True

    def __init__(self, fm: FastModel, layout: CacheLayout, num_blocks: int, num_slots: int,
                 sampler: Callable[..., Any], device: torch.device | str, max_model_len: int, max_num_tokens: int,
                 use_graphs: bool | None = None, max_bucket: int = GRAPH_BUCKETS[-1]) -> None:
        self.fm, self.model, self.sampler, self.layout = fm, fm.model, sampler, layout
        self.num_blocks, self.num_slots = num_blocks, num_slots
        self.device = torch.device(device)
        self.max_model_len = max_model_len
        kw = {} if layout.kv_dtype == "bfloat16" else {"kv_dtype": layout.kv_dtype}  # fp8 rows as CacheLayout's
        self.cache = EngineCache(fm.args, max_seqs=num_slots, num_blocks=num_blocks, block_size=layout.block_size,
                                 max_ctx=round_up(max_model_len, layout.block_size), max_tokens=max_num_tokens,
                                 device=self.device, dtype=fm.dtype, **kw)
        self.graphs = None
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs:
            from ds4f.runner.gpu.graphs import DecodeGraphs

            self.cache.tables = {}  # capture: every row points at the dummy slot / block
            with torch.inference_mode():  # the mode every step runs in (one torch.compile guard set for the glue)
                self.graphs = DecodeGraphs(fm, self.cache, graph_buckets(num_slots, max_num_tokens, max_bucket))
        self.num_graph_steps = self.num_eager_steps = self.num_ahead_steps = 0
        self._host: list[torch.Tensor | None] = [None, None]  # launch(): sampled ids' copy targets, used in turn
        self._flip = 0

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    def logits(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Forward the step's chunks; logits [N, V] fp32 of the N sampled rows (None when nothing samples)."""
        with torch.inference_mode():
            return self._sampled_logits(out, copy=True)

    def forward_step(self, out: SchedulerOutput) -> None:
        """A TP worker's step: the same forward (collectives included) as `logits`, no logits gathered."""
        with torch.inference_mode():
            self._forward(out.seqs)

    def launch(self, out: SchedulerOutput, prev: Pending | None = None) -> Pending:
        """Run a step up to its sampled ids on the device with no host sync (collect() reads them): the engine launches
        the next step before collecting this one (--async-scheduling). prev: the step before, whose ids feed this
        step's AHEAD tokens (Scheduler.schedule_ahead: its sequences, in its order). A step whose requests ask for
        logprobs runs as execute() does."""
        with torch.inference_mode():
            seqs = [s for s in out.seqs if s.sample]
            if not seqs or any(s.params is not None and s.params.logprobs is not None for s in seqs):
                assert not out.seqs or out.seqs[0].token_ids[0] != AHEAD, "an AHEAD step must sample on the device"
                return Pending(result=self.execute(out))
            lg = self._sampled_logits(out, copy=False, prev=prev)
            toks = self.sampler.tokens(lg, sampling_requests(seqs))
            self._flip ^= 1
            host = self._host[self._flip]
            if host is None or host.numel() < toks.numel():
                host = torch.empty(max(toks.numel(), 64), dtype=torch.int64, pin_memory=self.device.type == "cuda")
                self._host[self._flip] = host
            host[: toks.numel()].copy_(toks, non_blocking=True)
            ev = None
            if self.device.type == "cuda":
                ev = torch.cuda.Event()
                ev.record()
            return Pending(req_ids=[s.req_id for s in seqs], tokens=toks, host=host, event=ev)

    def collect(self, p: Pending) -> RunnerOutput:
        """A launched step's RunnerOutput (waits for its ids)."""
        if p.result is not None:
            return p.result
        if p.event is not None:
            p.event.synchronize()
        assert p.host is not None
        return RunnerOutput(req_ids=p.req_ids, token_ids=p.host[: len(p.req_ids)].tolist())

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Sampling and RunnerOutput through the reference runner's sample_outputs, in one inference-mode context
        (the sampler and logits processors edit the logits in place)."""
        with torch.inference_mode():
            # the sampler may edit a decode graph's output buffer in place: it is done before the next replay
            return sample_outputs(self.sampler, self._sampled_logits(out, copy=False) if out.seqs else None, out)

    def _sampled_logits(self, out: SchedulerOutput, copy: bool, prev: Pending | None = None) -> torch.Tensor | None:
        lg, graphed = self._forward(out.seqs, prev)
        rows = [i for i, s in enumerate(out.seqs) if s.sample]
        if not rows:
            return None
        if graphed and len(rows) == lg.shape[0]:  # no index copy (a Python-list index is a synchronous H2D copy)
            return lg.clone() if copy else lg  # the graph's output buffer is rewritten by the next replay
        return lg[rows]

    def _forward(self, seqs: list[ScheduledSeq], prev: Pending | None = None) -> tuple[torch.Tensor, bool]:
        """-> (logits [len(seqs), V] fp32, one row per sequence; whether a decode graph produced them). An AHEAD step
        (every sequence one AHEAD token) takes its ids from prev's sampled ids on the device."""
        self.cache.bind(seqs)
        ahead = bool(seqs) and seqs[0].token_ids[0] == AHEAD
        feed = (lambda ids: self._feed(ids, prev, len(seqs))) if ahead else None
        self.num_ahead_steps += ahead
        g = self.graphs
        if g is not None and len(seqs) <= g.buckets[-1] and all(len(s.token_ids) == 1 for s in seqs):
            lg = g.step([(s.slot, s.start_pos, max(s.token_ids[0], 0)) for s in seqs], feed)
            self.num_graph_steps += 1
            return lg, True
        ids = [[0] if ahead else s.token_ids for s in seqs]
        meta = self.cache.build_meta([(s.slot, s.start_pos, t) for s, t in zip(seqs, ids)], self.fm.ratios)
        if feed is not None:
            feed(meta.input_ids)
        self.num_eager_steps += 1
        return self.fm.logits(self.fm.forward(meta, self.cache), meta), False

    def _feed(self, ids: torch.Tensor, prev: Pending | None, n: int) -> None:
        """ids[:n] = the previous step's sampled ids. TP: rank 0 holds them (prev), the other ranks add zeros to one
        all-reduce, so every rank feeds the same ids with no host round trip."""
        comm = getattr(self.model, "tp_comm", None)
        if prev is not None:
            assert prev.tokens is not None and prev.tokens.numel() == n, "an AHEAD step follows its sampled step"
            t = prev.tokens.to(ids.dtype)
        else:
            assert comm is not None and comm.rank > 0, "an AHEAD step on rank 0 needs the step before"
            t = torch.zeros(n, dtype=ids.dtype, device=ids.device)
        if comm is not None and comm.world > 1:
            t = comm.all_reduce(t.contiguous())
        ids[:n].copy_(t)


@torch.inference_mode()
def fast_warmup(fm: FastModel, max_ctx: int, num_tokens: int, num_logits: int, block_size: int,
                kv_dtype: str = "bfloat16") -> None:
    """One eager forward of a full step budget over a scratch FastCache with the serving max_ctx and KV dtype (the
    index tensors are [T, max_ctx / ratio]-shaped), so the activation peak is known before the KV cache is sized;
    then the same step in its eager prompt form (trimmed indexer columns, prefix attention, token-blocked indexer),
    so the kernels only such steps use are compiled before the first request instead of inside its TTFT (~9.7 s
    in the first 1M-prompt chunk at TP=2)."""
    dev = fm.device
    torch.cuda.reset_peak_memory_stats(dev)
    cache = FastCache(fm.args, max_seqs=1, num_blocks=-(-num_tokens // block_size), block_size=block_size,
                      max_ctx=max_ctx, max_tokens=num_tokens, device=dev, dtype=fm.dtype, kv_dtype=kv_dtype)
    for eager in (False, True):
        meta = cache.build_meta([(0, 0, [0] * num_tokens)], fm.ratios)
        if not eager:
            meta.max_len = None  # no indexer trimming: profile the full [T, max_ctx / ratio] score peak of a late chunk
        streams = fm.forward(meta, cache)
        fm.model.compute_logits(streams[-min(num_logits, num_tokens):])
        del streams, meta
    torch.cuda.synchronize(dev)
    del cache
    torch.cuda.empty_cache()


def fast_model(model: Any, max_model_len: int, block_size: int) -> FastModel:
    """FastModel over a loaded reference Transformer; RoPE tables cover positions up to max_model_len."""
    return FastModel(model, max_pos=round_up(max_model_len, block_size) + block_size)


def check_fast_supported(dtype: str, kv_dtype: str) -> str | None:
    """None if the fast path can serve this config, else why not (the caller names the flags)."""
    if dtype != "bfloat16":
        return f"the fast path computes in bfloat16 (got --dtype {dtype})"
    kinds = pools.KV_DTYPES
    if kv_dtype not in kinds:
        return f"the fast path stores the KV cache as one of {sorted(set(kinds.values()))} (got {kv_dtype})"
    return None
