"""Chat stage: a validated ChatCompletionRequest in, prompt ids -> engine -> chat.completion JSON or SSE out."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ds4f.server.errors import ClientGone, OpenAIError
from ds4f.server.protocol import ChatCompletionRequest, NamedToolChoice
from ds4f.server.state import ServerState, Ticket, chat_logprobs, engine_error, usage
from ds4f.server.stream import AbortingStream, chat_stream


@dataclass
class ChatRun:
    """Everything one chat request's response builder needs besides the engine outputs."""

    request_id: str
    model: str
    prompt_ids: list[int]
    thinking: bool
    parser: Any
    tool_choice: Any
    include_reasoning: bool
    return_token_ids: bool
    logprobs_n: int | None
    ticket: Ticket
    include_usage: bool = False
    continuous_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    t0: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    num_cached_tokens: int = 0
    tool_call_seen: bool = False

    @property
    def forced(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        if engine_reason == "stop" and self.tool_call_seen and not isinstance(self.tool_choice, NamedToolChoice):
            return "tool_calls"
        return engine_reason

    def usage(self) -> dict[str, Any]:
        return usage(len(self.prompt_ids), self.completion_tokens, self.reasoning_tokens, self.num_cached_tokens)


def _tool_choice_arg(choice: str | NamedToolChoice) -> Any:
    return choice.model_dump(exclude_none=True) if isinstance(choice, NamedToolChoice) else choice


def render_chat_request(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], Any]:
    """The exact prompt ids a chat request sends to the engine (also what chat-form /tokenize returns)."""
    from ds4f.chat.encoding import ChatEncodingError

    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    try:
        ids, prompt = state.backend.encode_chat(
            state.tokenizer, messages, tools=tools, tool_choice=_tool_choice_arg(req.effective_tool_choice()),
            reasoning_effort=req.reasoning_effort, chat_template_kwargs=req.chat_template_kwargs,
            default_chat_template_kwargs=state.settings.default_chat_template_kwargs)
    except ChatEncodingError as e:
        raise OpenAIError(str(e), 400, param="messages") from None
    return ids, prompt


def _logits_processors(state: ServerState, req: ChatCompletionRequest, thinking: bool) -> list[Any] | None:
    """tool_choice required / named: a DSML grammar (ds4f.chat.constrain); `thinking`: the prompt opened <think>."""
    choice = req.effective_tool_choice()
    if not (choice == "required" or isinstance(choice, NamedToolChoice)):
        return None
    if state.backend.tool_constraint is None:
        raise OpenAIError(f"tool_choice {_tool_choice_arg(choice)!r} needs constrained decoding, which this "
                          "backend lacks; use tool_choice 'auto'", 501, param="tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    try:
        proc = state.backend.tool_constraint(state.tokenizer, tools, _tool_choice_arg(choice),
                                             parallel_tool_calls=bool(req.parallel_tool_calls), thinking=thinking)
    except ValueError as e:
        raise OpenAIError(str(e), 400, param="tool_choice") from None
    return [proc] if proc is not None else None


async def create_chat_completion(state: ServerState, req: ChatCompletionRequest, http_request: Request) -> Response:
    model = state.check_model(req.model)
    choice = req.effective_tool_choice()
    if choice == "auto" and req.tools and not state.settings.enable_auto_tool_choice:
        raise OpenAIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set '
                          "(or send tool_choice 'none' / 'required' / a named function)", 400, param="tool_choice")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise OpenAIError(f"response_format {req.response_format.get('type')!r} (structured output) is not "
                          "supported yet; leave it out or use {'type': 'text'}", 400, param="response_format")
    ids, prompt = render_chat_request(state, req)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = state.output_budget(len(ids), req.output_limit(), limit_param)
    thinking = bool(prompt.thinking) and state.settings.reasoning_parser is not None
    logprobs_n = (req.top_logprobs or 0) if req.logprobs else None
    if req.stop_token_ids:
        state.check_token_ids(req.stop_token_ids, "stop_token_ids")
    params = state.make_params(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, logprobs=logprobs_n,
        include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=False,
        output_kind="delta", logits_processors=_logits_processors(state, req, bool(prompt.thinking)))
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    parser = state.backend.stream_parser(thinking, tools, tool_choice=_tool_choice_arg(choice),
                                         parallel_tool_calls=bool(req.parallel_tool_calls))
    opts = req.stream_options
    ticket = state.admit()
    run = ChatRun(request_id=f"chatcmpl-{uuid.uuid4().hex}", model=model, prompt_ids=ids, thinking=thinking,
                  parser=parser, tool_choice=choice, include_reasoning=req.include_reasoning,
                  return_token_ids=bool(req.return_token_ids), logprobs_n=logprobs_n, ticket=ticket,
                  include_usage=bool(opts and opts.include_usage),
                  continuous_usage=bool(opts and opts.continuous_usage_stats))
    try:
        gen = state.engine.generate(ticket.track(run.request_id), ids, params)
        first = await state.first_output(gen, run.request_id, http_request)
    except BaseException:
        ticket.release()
        raise
    if req.stream:
        return AbortingStream(chat_stream(state, run, first, gen), on_close=state.closer(run.request_id, ticket, gen),
                              media_type="text/event-stream")
    try:
        return JSONResponse(await state.watched(_collect(state, run, first, gen), run.request_id, http_request))
    except (OpenAIError, ClientGone):
        raise
    except Exception as e:
        raise engine_error(e) from None
    finally:
        ticket.release()


def consume(run: ChatRun, out: Any) -> tuple[list[Any], Any]:
    """Feed one engine output to the parser -> (deltas, the CompletionOutput)."""
    c = out.outputs[0]
    now = time.monotonic()
    if run.first_token_at is None:
        run.first_token_at = now
    run.last_token_at = now
    n = len(c.token_ids)
    if run.parser.in_reasoning:
        run.reasoning_tokens += n
    run.completion_tokens += n
    run.num_cached_tokens = getattr(out, "num_cached_tokens", 0) or 0
    deltas = run.parser.feed(c.text) if c.text else []
    if c.finish_reason is not None:
        deltas += run.parser.finish()
    if any(d.tool_calls for d in deltas):
        run.tool_call_seen = True
    if not run.include_reasoning:
        for d in deltas:
            d.reasoning = None
    return deltas, c


def observe(state: ServerState, run: ChatRun, finish_reason: str | None) -> None:
    ttft = None if run.first_token_at is None else run.first_token_at - run.t0
    state.metrics.observe_finished(prompt_tokens=len(run.prompt_ids), generated=run.completion_tokens, ttft=ttft,
                                   e2e=time.monotonic() - run.t0, finish_reason=finish_reason)


async def _collect(state: ServerState, run: ChatRun, first: Any, gen: Any) -> dict[str, Any]:
    from ds4f.chat.parser import merge_deltas

    deltas: list[Any] = []
    token_ids: list[int] = []
    logprobs: list[Any] = []
    out, c = first, None
    while True:
        new, c = consume(run, out)
        deltas += new
        token_ids += c.token_ids
        if c.logprobs:
            logprobs += c.logprobs
        if c.finish_reason is not None:
            break
        try:
            out = await gen.__anext__()
        except StopAsyncIteration:
            break
    engine_reason = c.finish_reason if c is not None else None
    if engine_reason is None:
        deltas += run.parser.finish()
        engine_reason = "abort"
    merged = merge_deltas(deltas)
    reasoning = (merged.reasoning if merged else None) or None
    content = (merged.content if merged else None) or None
    tool_calls = list(run.parser.tool_calls)
    run.tool_call_seen = bool(tool_calls)
    if content is None and run.forced:
        content = ""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": None,
                               "audio": None, "function_call": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    message["reasoning"] = reasoning if run.include_reasoning else None
    message["reasoning_content"] = message["reasoning"]
    finish = run.finish_reason(engine_reason)
    observe(state, run, finish)
    lp = chat_logprobs(state.tokenizer, token_ids, logprobs, run.logprobs_n or 0) if run.logprobs_n is not None \
        else None
    return {
        "id": run.request_id, "object": "chat.completion", "created": run.created, "model": run.model,
        "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish,
                     "stop_reason": c.stop_reason if c is not None else None,
                     "token_ids": token_ids if run.return_token_ids else None, "routed_experts": None,
                     "weight_versions": None}],
        "service_tier": None, "system_fingerprint": None, "usage": run.usage(), "prompt_logprobs": None,
        "prompt_token_ids": run.prompt_ids if run.return_token_ids else None, "prompt_text": None,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }
