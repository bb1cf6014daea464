"""Stop stage: each new output token id + the detokenizer's text in; finish_reason, stop_reason, visible text out.

vLLM v1 semantics (core/sched/utils.py check_stop, engine/detokenizer.py, stop_checker.check_stop_strings):
- Below min_tokens outputs neither EOS nor stop_token_ids finish; EOS never finishes with ignore_eos.
- The token that finishes is kept in token_ids (EOS included). Its text is left out of the output unless
  include_stop_str_in_output (EOS is special, so skip_special_tokens hides it anyway).
- EOS and stop_token_ids are checked before length, so an EOS sampled at max_tokens reports "stop".
- Stop strings are searched only in text produced after the first min_tokens tokens (a match may start up to
  len(stop) - 1 characters earlier), may span tokens, and win over "length" found at the same step. The text is cut
  before the stop string (after it with include_stop_str_in_output); token_ids are not cut.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ds4f.sample.params import SamplingParams

if TYPE_CHECKING:
    from ds4f.engine.detokenize import IncrementalDetokenizer

FinishReason = Literal["stop", "length"]


class StopChecker:
    """One per request. NOTE: text passed in must be append-only (IncrementalDetokenizer.text is)."""

    def __init__(self, params: SamplingParams, eos_token_id: int | None, *, max_model_len: int | None = None,
                 prompt_len: int = 0) -> None:
        self.params = params
        self.eos_token_id = None if params.ignore_eos else eos_token_id
        self.stop_token_ids = frozenset(params.stop_token_ids or ())
        self.stop: list[str] = list(params.stop or ())
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        limits = [params.max_tokens] if params.max_tokens is not None else []
        if max_model_len is not None:
            limits.append(max_model_len - prompt_len)
        self.max_output_tokens: int | None = min(limits) if limits else None
        self.num_output_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None  # the stop string, or the stop token id; None for EOS/length
        self.render_token = True  # whether the token last checked goes to the detokenizer
        self.text_end: int | None = None  # set on a stop string: the output text is text[:text_end]
        self._searched = 0  # text[:_searched] was searched (or is min_tokens text), a match must end after it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def check_token(self, token_id: int) -> FinishReason | None:
        """Count one output token; EOS / stop_token_ids / length."""
        assert self.finish_reason is None, "request already finished"
        self.num_output_tokens += 1
        if self.num_output_tokens >= self.min_tokens:
            if token_id == self.eos_token_id:
                self.finish_reason = "stop"
            elif token_id in self.stop_token_ids:
                self.finish_reason, self.stop_reason = "stop", token_id
        if self.finish_reason is None and self.max_output_tokens is not None \
                and self.num_output_tokens >= self.max_output_tokens:
            self.finish_reason = "length"
        self.render_token = self.finish_reason != "stop" or self.include_stop
        return self.finish_reason

    def check_text(self, text: str) -> str | None:
        """Search the detokenizer's whole text for a stop string ending in what is new since the last call. The
        earliest match wins; of matches at the same position (one a prefix of the other) the shortest, which a
        character-by-character stream would have completed first."""
        searched, self._searched = self._searched, len(text)
        if not self.stop or self.text_end is not None or len(text) == searched \
                or self.num_output_tokens <= self.min_tokens:
            return None
        hit: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s, max(0, searched - len(s) + 1))
            if i != -1 and (hit is None or (i, len(s)) < (hit[0], len(hit[1]))):
                hit = (i, s)
        if hit is None:
            return None
        i, s = hit
        self.text_end = i + len(s) if self.include_stop else i
        self.finish_reason, self.stop_reason = "stop", s
        return s

    def step(self, token_id: int, detokenizer: IncrementalDetokenizer | None = None) -> FinishReason | None:
        """check_token, feed the detokenizer (unless the token is a stop token left out of the text), check_text."""
        self.check_token(token_id)
        if detokenizer is not None:
            if self.render_token:
                detokenizer.add(token_id)
            self.check_text(detokenizer.text)
        return self.finish_reason

    def safe_text_len(self, text: str) -> int:
        """How much of text may be sent now: all of it cut at a stop string once finished; before that, all but
        the longest tail that is a proper prefix of a stop string (it could still become one)."""
        if self.text_end is not None:
            return self.text_end
        if self.finish_reason is not None or not self.stop or self.include_stop:
            return len(text)
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return len(text) - hold

    def output_text(self, text: str) -> str:
        return text[:self.safe_text_len(text)]
