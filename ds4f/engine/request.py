"""③ engine request state: prompt ids + SamplingParams in, Request (scheduler counters) and RequestOutput out."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds4f.sample.sampler import Logprob

_arrival = itertools.count()


class QueueFullError(RuntimeError):
    """The bounded waiting queue (max_waiting) is full; retry later."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # None | "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    prompt: str | None = None


@dataclass
class Request:
    """NOTE: num_tokens = len(prompt) + len(output); the scheduler only moves num_computed_tokens toward it.
    There is no prefill or decode phase: a request with num_tokens - num_computed_tokens == 1 is decoding."""

    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival: int = field(default_factory=lambda: next(_arrival))
    num_preemptions: int = 0
    generator: Any = None  # torch.Generator when params.seed is set; survives preemption so the resume is identical
    # output bookkeeping (engine side)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    detokenizer: Any = None
    stop_checker: Any = None
    sent_tokens: int = 0  # what a "delta" output already returned
    sent_text: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_id(self, pos: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < p else self.output_token_ids[pos - p]

    def token_ids(self, lo: int, hi: int) -> list[int]:
        p, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if hi <= n:
            return p[lo:hi]
        if lo >= n:
            return self.output_token_ids[lo - n: hi - n]
        return p[lo:] + self.output_token_ids[: hi - n]
