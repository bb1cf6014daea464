"""Completions stage: a CompletionRequest (str / ids / batch, FIM `suffix`) in, text_completion JSON or SSE out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ds4f.server.errors import OpenAIError
from ds4f.server.protocol import CompletionRequest
from ds4f.server.state import ServerState, Ticket, completion_logprobs, engine_error, usage
from ds4f.server.stream import DONE, AbortingStream, frame

FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"


@dataclass
class _Prompt:
    request_id: str
    ids: list[int]
    text: str
    params: Any
    completion_tokens: int = 0
    t0: float = field(default_factory=time.monotonic)
    first_at: float | None = None
    finish: str | None = None


def fim_text(prompt: str, suffix: str) -> str:
    """Fill-in-the-middle: the model writes what goes between `prompt` and `suffix`."""
    return f"{FIM_BEGIN}{prompt}{FIM_HOLE}{suffix}{FIM_END}"


def _prepare(state: ServerState, req: CompletionRequest) -> list[_Prompt]:
    base_id = f"cmpl-{uuid.uuid4().hex}"
    if req.stop_token_ids:
        state.check_token_ids(req.stop_token_ids, "stop_token_ids")
    prompts = []
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            text = p if req.suffix is None else fim_text(p, req.suffix)
            ids = state.tokenizer.encode(text)
            if not ids:
                raise OpenAIError("The prompt is empty: send at least one token of text", 400, param="prompt")
        else:
            ids = list(p)
            state.check_token_ids(ids, "prompt")
            text = state.tokenizer.decode(ids)
        max_tokens = state.output_budget(len(ids), req.output_limit())
        params = state.make_params(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop,
            stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            logprobs=req.logprobs, include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens, output_kind="delta")
        prompts.append(_Prompt(f"{base_id}-{i}", ids, p if isinstance(p, str) else text, params))
    return prompts


def _choice(state: ServerState, req: CompletionRequest, index: int, p: _Prompt, text: str, token_ids: list[int],
            logprobs: list[Any] | None, c: Any, stream: bool) -> dict[str, Any]:
    lp = completion_logprobs(state.tokenizer, token_ids, logprobs, req.logprobs or 0) \
        if req.logprobs is not None else None
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": lp,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if req.return_token_ids or not stream:
        choice["token_ids"] = token_ids if req.return_token_ids else None
    if not stream:
        choice["prompt_logprobs"] = None
        choice["prompt_token_ids"] = p.ids if req.return_token_ids else None
    return choice


def _account(p: _Prompt, c: Any) -> None:
    if p.first_at is None:
        p.first_at = time.monotonic()
    p.completion_tokens += len(c.token_ids)
    p.finish = c.finish_reason


def _observe(state: ServerState, prompts: list[_Prompt]) -> None:
    for p in prompts:
        ttft = None if p.first_at is None else p.first_at - p.t0
        state.metrics.observe_finished(prompt_tokens=len(p.ids), generated=p.completion_tokens, ttft=ttft,
                                       e2e=time.monotonic() - p.t0, finish_reason=p.finish)


async def create_completion(state: ServerState, req: CompletionRequest, http_request: Request) -> Response:
    model = state.check_model(req.model)
    prompts = _prepare(state, req)
    ticket = state.admit()
    created = int(time.time())
    base = {"id": prompts[0].request_id.rsplit("-", 1)[0], "object": "text_completion", "created": created,
            "model": model}
    try:
        gens = [state.engine.generate(ticket.track(prompts[0].request_id), prompts[0].ids, prompts[0].params)]
        first = await state.first_output(gens[0], prompts[0].request_id, http_request)
    except BaseException:
        ticket.release()
        raise
    if req.stream:
        return AbortingStream(_stream(state, req, base, prompts, first, gens[0], ticket),
                              on_close=state.closer(prompts[0].request_id, ticket, gens[0]),
                              media_type="text/event-stream")
    try:
        gens += [state.engine.generate(ticket.track(p.request_id), p.ids, p.params) for p in prompts[1:]]
        firsts = [first] + [None] * (len(prompts) - 1)
        jobs = [_collect(state, req, i, p, firsts[i], gens[i]) for i, p in enumerate(prompts)]
        choices = await state.watched(asyncio.gather(*jobs), prompts[0].request_id, http_request)
    except BaseException:
        for p in prompts:
            await state.abort(p.request_id)
        raise
    finally:
        ticket.release()
        _observe(state, prompts)
    prompt_tokens = sum(len(p.ids) for p in prompts)
    return JSONResponse({**base, "choices": choices, "service_tier": None, "system_fingerprint": None,
                         "usage": usage(prompt_tokens, sum(p.completion_tokens for p in prompts)),
                         "kv_transfer_params": None})


async def _collect(state: ServerState, req: CompletionRequest, index: int, p: _Prompt, first: Any,
                   gen: AsyncIterator[Any]) -> dict[str, Any]:
    text, token_ids, logprobs, c = "", [], [], None
    try:
        out = first if first is not None else await gen.__anext__()
        while True:
            c = out.outputs[0]
            _account(p, c)
            text += c.text
            token_ids += c.token_ids
            logprobs += c.logprobs or []
            if c.finish_reason is not None:
                break
            out = await gen.__anext__()
    except StopAsyncIteration:
        pass
    except Exception as e:
        raise engine_error(e) if not isinstance(e, OpenAIError) else e from None
    if c is None:
        raise OpenAIError("The engine returned no output for this request", 500)
    if req.echo:
        text = p.text + text
    return _choice(state, req, index, p, text, token_ids, logprobs if req.logprobs is not None else None, c, False)


async def _stream(state: ServerState, req: CompletionRequest, base: dict[str, Any], prompts: list[_Prompt],
                  first: Any, gen: AsyncIterator[Any], ticket: Ticket) -> AsyncIterator[str]:
    """Several prompts stream one after another (choice index = prompt index)."""
    current: str | None = None
    try:
        for i, p in enumerate(prompts):
            current = p.request_id
            if i > 0:
                gen = state.engine.generate(ticket.track(p.request_id), p.ids, p.params)
                first = await gen.__anext__()
            out, echo = first, req.echo
            while out is not None:
                c = out.outputs[0]
                _account(p, c)
                text = (p.text if echo else "") + c.text
                echo = False
                yield frame({**base, "choices": [_choice(state, req, i, p, text, c.token_ids, c.logprobs, c, True)]})
                if c.finish_reason is not None:
                    break
                try:
                    out = await gen.__anext__()
                except StopAsyncIteration:
                    out = None
            current = None
        opts = req.stream_options
        if opts is not None and opts.include_usage:
            total = usage(sum(len(p.ids) for p in prompts), sum(p.completion_tokens for p in prompts))
            yield frame({**base, "choices": [], "usage": total})
    except Exception as e:
        yield frame((e if isinstance(e, OpenAIError) else engine_error(e)).body())
    finally:
        with anyio.CancelScope(shield=True):
            if current is not None:
                await state.abort(current)
            ticket.release()
            _observe(state, prompts)
    yield DONE
