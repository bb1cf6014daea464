"""Sampling stage, request options: user sampling options in, a validated, normalized SamplingParams out."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

SAMPLING_EPS = 1e-5  # temperature below this is greedy (vLLM _SAMPLING_EPS)
MIN_TEMPERATURE = 1e-2  # vLLM _MAX_TEMP: 0 < temperature < 0.01 is raised to 0.01
MAX_LOGPROBS = 20  # vLLM's default max_logprobs

LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]  # (output ids, logits [V]) -> logits [V]


def _err(name: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """vLLM's SamplingParams names, defaults and ranges (n == 1 only).

    NOTE: __post_init__ normalizes in place like vLLM: `stop` becomes list[str], `stop_token_ids` a de-duplicated
    list[int], `seed=-1` None, 0 < temperature < 0.01 becomes 0.01, and greedy requests get top_p=1, top_k=0, min_p=0.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-N raw logprobs per output token, plus the sampled token's
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: Literal["cumulative", "delta"] = "cumulative"
    logits_processors: list[LogitsProcessor] | None = None
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.n != 1:
            raise _err("n", "1 (only one completion per request is supported)", self.n)
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise _err(name, "a finite number", v)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _err("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _err("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if self.repetition_penalty <= 0.0:
            raise _err("repetition_penalty", "greater than 0", self.repetition_penalty)
        if not 0.0 <= self.temperature <= 2.0:
            raise _err("temperature", "in [0, 2]", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise _err("top_p", "in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _err("top_k", "an integer: 0 or -1 (off), or at least 1", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise _err("min_p", "in [0, 1]", self.min_p)
        if self.seed is not None and not _is_int(self.seed):
            raise _err("seed", "an integer or None", self.seed)
        if self.seed == -1:
            self.seed = None
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _err("max_tokens", "an integer of at least 1, or None", self.max_tokens)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise _err("min_tokens", "an integer of at least 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _err("min_tokens", f"at most max_tokens={self.max_tokens}", self.min_tokens)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _err("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]", self.logprobs)
        if self.output_kind not in ("cumulative", "delta"):
            raise _err("output_kind", "'cumulative' or 'delta'", self.output_kind)

        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise _err("stop", "a non-empty string or a list of non-empty strings", self.stop)
        self.stop = stop
        ids = list(dict.fromkeys(self.stop_token_ids or []))
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise _err("stop_token_ids", "a list of non-negative integers", self.stop_token_ids)
        self.stop_token_ids = ids
        allowed = self.allowed_token_ids
        if allowed is not None and (not allowed or not all(_is_int(t) and t >= 0 for t in allowed)):
            raise _err("allowed_token_ids", "None or a non-empty list of non-negative integers", allowed)
        if self.logits_processors is not None and not all(callable(f) for f in self.logits_processors):
            raise _err("logits_processors", "a list of callables fn(output_ids, logits) -> logits",
                       self.logits_processors)

        if 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if self.greedy:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def verify(self, vocab_size: int) -> None:
        """Checks that need the model: token ids inside the vocabulary (vLLM SamplingParams.verify)."""
        for name in ("stop_token_ids", "allowed_token_ids"):
            bad = [t for t in getattr(self, name) or () if t >= vocab_size]
            if bad:
                raise ValueError(f"{name} holds out-of-vocabulary ids {bad[:8]} (vocab_size={vocab_size})")
