"""Server state stage: ServeSettings + an AsyncEngine in, shared request plumbing (admission, budgets, runs) out."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ds4f.server.args import ServeSettings
from ds4f.server.errors import ClientGone, OpenAIError
from ds4f.server.metrics import ServerMetrics

_POLL_S = 0.1  # how often a waiting handler checks whether its client went away


@dataclass
class ChatBackend:
    """The chat-protocol functions the server calls (ds4f.chat + ds4f.sample); tests may swap in stand-ins."""

    encode_chat: Callable[..., tuple[list[int], Any]]
    stream_parser: Callable[..., Any]
    sampling_params: Callable[..., Any]
    tool_constraint: Callable[..., Any] | None = None

    @classmethod
    def default(cls) -> ChatBackend:
        from ds4f.chat.constrain import build_tool_call_processor
        from ds4f.chat.encoding import encode_chat
        from ds4f.chat.parser import StreamParser
        from ds4f.sample.params import SamplingParams

        return cls(encode_chat, StreamParser, SamplingParams, build_tool_call_processor)


@dataclass
class Ticket:
    """One admitted request; `release()` is idempotent."""

    state: ServerState
    released: bool = False
    started: float = field(default_factory=time.monotonic)
    request_ids: list[str] = field(default_factory=list)

    def track(self, request_id: str) -> str:
        self.request_ids.append(request_id)
        self.state.request_ids.add(request_id)
        return request_id

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.request_ids.difference_update(self.request_ids)
            self.state.active -= 1
            if self.state.active == 0:
                self.state.idle.set()


class ServerState:
    def __init__(self, engine: Any, settings: ServeSettings, backend: ChatBackend) -> None:
        self.engine = engine
        self.settings = settings
        self.backend = backend
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = int(engine.max_model_len)
        self.model_name = settings.served_model_names[0]
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self.request_ids: set[str] = set()
        cache_info = {"block_size": str(settings.engine_kwargs.get("block_size", 256)),
                      "cache_dtype": str(settings.engine_kwargs.get("kv_cache_dtype", "auto")),
                      "enable_prefix_caching": str(settings.engine_kwargs.get("enable_prefix_caching", False))}
        self.metrics = ServerMetrics(self.model_name, engine.stats, cache_info)

    # --- admission ------------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> str:
        if name is None or name in self.settings.served_model_names:
            return self.model_name
        aliases = ", ".join(self.settings.served_model_names)
        raise OpenAIError(f"The model `{name}` does not exist. Valid aliases: {aliases}.", 404, param="model")

    def admit(self) -> Ticket:
        if self.draining:
            self.metrics.observe_rejected("shutting_down")
            raise OpenAIError("The server is shutting down and accepts no new requests", 503,
                              headers={"Retry-After": "5"})
        cap = None if self.settings.max_waiting is None else self.settings.max_num_seqs + self.settings.max_waiting
        if cap is not None and self.active >= cap:
            self.metrics.observe_rejected("queue_full")
            raise OpenAIError(f"The server is at capacity ({self.settings.max_num_seqs} running + "
                              f"{self.settings.max_waiting} waiting); retry after a moment", 429,
                              headers={"Retry-After": "1"})
        self.active += 1
        self.idle.clear()
        return Ticket(self)

    # --- budgets --------------------------------------------------------------------------------------------
    def output_budget(self, prompt_len: int, requested: int | None, param: str = "max_tokens") -> int:
        """vLLM's rule: refuse a prompt that fills the context or max_tokens > max_model_len; clamp the rest."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                f"{prompt_len} tokens, which leaves no room for output. Please shorten the prompt.", 400,
                param="messages" if param == "max_completion_tokens" else "prompt")
        remaining = limit - prompt_len
        if requested is None:
            return remaining
        if requested > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested} output tokens ({param}) with a prompt of {prompt_len} tokens. "
                f"Please reduce {param} to at most {remaining}.", 400, param=param)
        return min(requested, remaining)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"Token id {bad[0]} is out of vocabulary (valid ids are 0..{vocab - 1})", 400,
                              param=param)

    def make_params(self, **kwargs: Any) -> Any:
        try:
            return self.backend.sampling_params(**{k: v for k, v in kwargs.items() if v is not None})
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), 400) from None

    # --- running requests ----------------------------------------------------------------------------------
    async def watched(self, awaitable: Any, request_id: str, http_request: Request | None) -> Any:
        """Await `awaitable`, aborting the request (and raising ClientGone) if the client disconnects first."""
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_POLL_S)
                if done:
                    return task.result()
                if http_request is not None and await http_request.is_disconnected():
                    raise ClientGone(request_id)
        except BaseException:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await self.abort(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.engine.abort(request_id)

    def closer(self, request_id: str, ticket: Ticket, gen: Any) -> Callable[[], Awaitable[None]]:
        """Idempotent end-of-stream cleanup: free the admission slot, close the engine iterator, abort."""

        async def close() -> None:
            if not ticket.released:
                ticket.release()
                with contextlib.suppress(Exception):
                    await gen.aclose()
                await self.abort(request_id)

        return close

    async def first_output(self, gen: AsyncIterator[Any], request_id: str, http_request: Request | None) -> Any:
        """The first RequestOutput (prefill done, first token sampled); engine refusals become HTTP errors."""
        try:
            return await self.watched(gen.__anext__(), request_id, http_request)
        except StopAsyncIteration:
            raise OpenAIError("The engine returned no output for this request", 500) from None
        except (OpenAIError, ClientGone):
            raise
        except Exception as e:
            raise engine_error(e) from None


def engine_error(e: Exception) -> OpenAIError:
    if type(e).__name__ == "QueueFullError":
        return OpenAIError(f"The engine's waiting queue is full ({e}); retry after a moment", 429,
                           headers={"Retry-After": "1"})
    if isinstance(e, ValueError):
        return OpenAIError(str(e), 400)
    if isinstance(e, NotImplementedError):
        return OpenAIError(str(e) or "not implemented", 501)
    return OpenAIError(f"Internal engine error: {type(e).__name__}: {e}", 500)


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
          cached_tokens: int | None = None) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                         "completion_tokens": completion_tokens, "prompt_tokens_details": None}
    if cached_tokens:
        u["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u


def completion_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Any]] | None, top_n: int,
                        offset: int = 0) -> dict[str, Any] | None:
    """OpenAI /v1/completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    if logprobs is None:
        return None
    out: dict[str, Any] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for tid, entry in zip(token_ids, logprobs):
        tok = _token_text(tokenizer, tid, entry)
        out["text_offset"].append(offset)
        offset += len(tok)
        out["tokens"].append(tok)
        lp = entry.get(tid)
        out["token_logprobs"].append(max(lp.logprob, -9999.0) if lp is not None else None)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        out["top_logprobs"].append({_token_text(tokenizer, t, entry): max(v.logprob, -9999.0)
                                    for t, v in ranked[:top_n]} if top_n else None)
    return out


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Any]] | None,
                  top_n: int) -> dict[str, Any] | None:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if logprobs is None:
        return None
    content = []
    for tid, entry in zip(token_ids, logprobs):
        lp = entry.get(tid)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
        tops = []
        for t, v in ranked[:top_n]:
            text = _token_text(tokenizer, t, entry)
            tops.append({"token": text, "logprob": max(v.logprob, -9999.0), "bytes": list(text.encode())})
        text = _token_text(tokenizer, tid, entry)
        content.append({"token": text, "logprob": max(lp.logprob, -9999.0) if lp is not None else -9999.0,
                        "bytes": list(text.encode()), "top_logprobs": tops})
    return {"content": content}


def _token_text(tokenizer: Any, token_id: int, entry: dict[int, Any]) -> str:
    lp = entry.get(token_id)
    if lp is not None and getattr(lp, "decoded_token", None) is not None:
        return str(lp.decoded_token)
    return tokenizer.decode([token_id])
