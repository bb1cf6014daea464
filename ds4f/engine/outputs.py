"""③→⑤ contract: SchedulerOutput (what to run this step) in to the runner, RunnerOutput (sampled ids) back out.

Imports neither the scheduler nor the runner; both import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A ScheduledSeq token id standing for "the token the previous step sampled for this sequence", still on the device
# when the step is launched (--async-scheduling: Scheduler.schedule_ahead; the runner feeds it from that step's ids).
AHEAD = -1


@dataclass
class ScheduledSeq:
    """One request's chunk for this step: tokens at positions start_pos .. start_pos + len(token_ids) - 1."""

    req_id: str
    token_ids: list[int]  # the chunk's input ids
    start_pos: int  # = num_computed_tokens before this step
    block_table: list[int]  # compressed-KV blocks covering positions [0, start_pos + len(token_ids))
    slot: int  # window + compressor-state slot
    sample: bool  # the chunk reaches the end of the known tokens, so the next token is sampled
    # sampler inputs (read only by the runner; lists are the request's own, shared in-process)
    params: Any = None  # SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: Any = None  # torch.Generator seeded from params.seed, or None


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]  # decodes first, then prefill chunks, each group FCFS
    num_batched_tokens: int
    preempted_req_ids: list[str] = field(default_factory=list)  # preempted this step (cache freed, will recompute)
    finished_req_ids: list[str] = field(default_factory=list)  # finished or aborted since the previous step

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class RunnerOutput:
    req_ids: list[str]  # the requests that sampled this step (ScheduledSeq.sample), in batch order
    token_ids: list[int]  # one sampled token per entry of req_ids
    logprobs: list[Any] | None = None  # per entry: dict[token_id, Logprob] when the request asked for logprobs
