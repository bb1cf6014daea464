"""Prompt encoding stage: OpenAI chat messages + tools + kwargs -> DeepSeek-V4 prompt text / token ids (spec §1)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ds4f.chat.tools import as_plain, function_specs, render_tools

if TYPE_CHECKING:
    from ds4f.tokenizer import Tokenizer

__all__ = [
    "ChatEncodingError",
    "ChatPrompt",
    "EFFORT_PREAMBLES",
    "encode_chat",
    "render_chat",
    "render_tools",
    "resolve_mode",
]

log = logging.getLogger(__name__)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
IMAGE_PLACEHOLDER = "<｜deepseek_image｜>"
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}
ROLES = ("system", "user", "developer", "assistant", "tool", "latest_reminder")

EFFORT_PREAMBLES = {
    "low": "",
    "high": (
        "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
        "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
        "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
        "scenarios.\n"
        "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
        "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
    ),
    "max": (
        "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n"
        "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively "
        "decompose the problem into its most fundamental components, trace every causal chain to its root, and "
        "resolve the underlying cause rather than any surface symptom.\n"
        "Do not stop reasoning until you have independently verified the solution from multiple angles and are "
        "certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
    ),
}

_RESPONSE_FORMAT = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


class ChatEncodingError(ValueError):
    """Invalid chat input (the server answers 400)."""


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    thinking: bool  # the response parser starts in REASONING iff True
    effort: str | None  # "low" | "high" | "max"; None in chat mode
    drop_thinking: bool = True  # effective: False whenever tools are present
    kwargs: dict[str, Any] = field(default_factory=dict)  # merged chat_template_kwargs


def _dumps(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


# --- §1.2 mode and effort ---
def resolve_mode(
    chat_template_kwargs: Mapping[str, Any] | None = None,
    default_chat_template_kwargs: Mapping[str, Any] | None = None,
    reasoning_effort: str | None = None,
    *,
    vllm_enable_thinking_quirk: bool = False,
) -> tuple[bool, str | None, dict[str, Any]]:
    """-> (thinking, effort, merged kwargs). Merge order: server defaults < request kwargs < top-level effort.

    ds4f rule (deviation from vLLM, on by default): when the *request* sets `thinking` or `enable_thinking`
    (directly, or via a top-level `reasoning_effort`), only the request's values decide the mode; a server default
    for the other alias no longer ORs thinking back on. vLLM ORs the merged values, so
    `chat_template_kwargs={"enable_thinking": false}` under `--default-chat-template-kwargs.thinking=true` still
    thinks; pass `vllm_enable_thinking_quirk=True` to reproduce that.
    """
    request = {k: v for k, v in (chat_template_kwargs or {}).items() if v is not None and v != "auto"}
    if reasoning_effort is not None and reasoning_effort != "auto":
        request["reasoning_effort"] = reasoning_effort
        request.setdefault("enable_thinking", reasoning_effort != "none")
    merged = {k: v for k, v in (default_chat_template_kwargs or {}).items() if v is not None and v != "auto"}
    merged.update(request)
    source = merged
    if not vllm_enable_thinking_quirk and ("thinking" in request or "enable_thinking" in request):
        source = request
    if "thinking" in source or "enable_thinking" in source:
        thinking = bool(source.get("thinking")) or bool(source.get("enable_thinking"))
    else:
        thinking = True
    effort = merged.get("reasoning_effort")
    if not isinstance(effort, str):
        effort = "high" if thinking else None
    elif effort == "none":
        thinking, effort = False, None
    elif effort != "max":
        effort = "low" if effort in ("low", "minimal", "medium") else "high"
    return thinking, (effort if thinking else None), merged


# --- §1.3 step 1: normalization of OpenAI-shaped messages ---
def _flatten(content: Any, sep: str, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatEncodingError(f"{where}.content must be a string, a list of parts or null")
    texts: list[str] = []
    for j, part in enumerate(content):
        part = as_plain(part)
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("text", "input_text", "output_text", "refusal"):
            text = part.get(kind if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise ChatEncodingError(f"{where}.content[{j}].text must be a string")
            texts.append(text)
        elif kind in ("image_url", "input_image", "image", "image_pil", "image_embeds"):
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise ChatEncodingError(f"{where}.content[{j}]: unsupported content part type {kind!r}")
    return sep.join(texts)


def _parse_arguments(args: Any, where: str) -> dict[str, Any]:
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    log.warning("%s.function.arguments is not a JSON object; rendering {}", where)
    return {}


def _normalize_message(i: int, raw: Any) -> dict[str, Any]:
    msg = as_plain(raw)
    where = f"messages[{i}]"
    if not isinstance(msg, Mapping):
        raise ChatEncodingError(f"{where} must be an object, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise ChatEncodingError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}")
    out = dict(msg)
    out["content"] = _flatten(msg.get("content"), "\n" if role == "tool" else "\n\n", where)
    if "reasoning" not in out or out["reasoning"] is None:
        out["reasoning"] = msg.get("reasoning_content")
    out.pop("reasoning_content", None)
    if out["reasoning"] is not None and not isinstance(out["reasoning"], str):
        raise ChatEncodingError(f"{where}.reasoning must be a string")
    task = msg.get("task")
    if task is not None and task not in TASK_TOKENS:
        raise ChatEncodingError(f"{where}.task {task!r} is not one of {', '.join(TASK_TOKENS)}")
    if role == "developer" and not out["content"]:
        raise ChatEncodingError(f"{where}: a developer message needs non-empty content")
    if msg.get("tools"):  # message-level tools (internal): OpenAI shape -> function specs, like request tools
        try:
            out["tools"] = function_specs(msg["tools"])
        except ValueError as e:
            raise ChatEncodingError(f"{where}.{e}") from e
    calls = msg.get("tool_calls")
    if calls is not None and role == "assistant":
        if not isinstance(calls, list):
            raise ChatEncodingError(f"{where}.tool_calls must be a list")
        norm = []
        for j, call in enumerate(calls):
            call = as_plain(call)
            fn = as_plain(call.get("function")) if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ChatEncodingError(f"{where}.tool_calls[{j}].function.name must be a string")
            args = _parse_arguments(fn.get("arguments"), f"{where}.tool_calls[{j}]")
            norm.append({"id": call.get("id") or "", "name": fn["name"], "arguments": args})
        out["tool_calls"] = norm
    else:
        out["tool_calls"] = None
    return out


# --- §1.3 steps 2-5: tools, tool-result merging, drop_thinking ---
def _merge_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for msg in messages:
        if msg["role"] == "tool":
            block = {"type": "tool_result", "id": msg.get("tool_call_id") or "", "content": msg["content"] or ""}
            if merged and merged[-1]["role"] == "user" and "blocks" in merged[-1]:
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "content": None, "blocks": [block]})
        elif msg["role"] == "user" and merged and "blocks" in merged[-1] and merged[-1].get("task") is None:
            merged[-1]["blocks"].append({"type": "text", "content": msg["content"] or ""})
            for key in ("task", "wo_eos"):
                if key in msg:
                    merged[-1][key] = msg[key]
        else:
            merged.append(msg)
    order: dict[str, int] = {}
    for msg in merged:
        if msg["role"] == "assistant" and msg["tool_calls"]:
            order = {tc["id"]: j for j, tc in enumerate(msg["tool_calls"]) if tc["id"]}
        elif "blocks" in msg and order:
            results = sorted(
                (b for b in msg["blocks"] if b["type"] == "tool_result"), key=lambda b: order.get(b["id"], 0)
            )
            it = iter(results)
            msg["blocks"] = [next(it) if b["type"] == "tool_result" else b for b in msg["blocks"]]
    return merged


def _last_user(messages: Sequence[Mapping[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last = _last_user(messages)
    out = []
    for i, msg in enumerate(messages):
        if msg["role"] in ("user", "system", "tool", "latest_reminder") or i >= last:
            out.append(msg)
        elif msg["role"] == "assistant":
            out.append({**msg, "reasoning": None})
        # developer messages before the last user message are deleted
    return out


# --- §1.4 per-role rendering ---
def _render_calls(calls: list[dict[str, Any]]) -> str:
    invokes = []
    for tc in calls:
        params = [
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f"{v if isinstance(v, str) else _dumps(v)}</{DSML}parameter>"
            for k, v in tc["arguments"].items()
        ]
        invokes.append(f'<{DSML}invoke name="{tc["name"]}">\n' + "\n".join(params) + f"\n</{DSML}invoke>")
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _extras(msg: Mapping[str, Any]) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        out += _RESPONSE_FORMAT + _dumps(as_plain(msg["response_format"]))
    return out


def _render_message(i: int, msgs: list[dict[str, Any]], thinking: bool, drop: bool, effort: str | None) -> str:
    msg = msgs[i]
    role = msg["role"]
    last_user = _last_user(msgs)
    out = EFFORT_PREAMBLES[effort] if i == 0 and thinking and effort else ""
    if role == "system":
        out += (msg["content"] or "") + _extras(msg)
    elif role == "developer":
        out += USER + msg["content"] + _extras(msg)
    elif role == "user":
        out += USER
        if "blocks" in msg:
            out += "\n\n".join(
                f"<tool_result>{b['content']}</tool_result>" if b["type"] == "tool_result" else b["content"]
                for b in msg["blocks"]
            )
        else:
            out += msg["content"] or ""
    elif role == "latest_reminder":
        out += LATEST_REMINDER + (msg["content"] or "")
    else:  # assistant (tool messages were merged into user ones)
        prev_task = i > 0 and msgs[i - 1].get("task") is not None
        if thinking and not prev_task and (not drop or i > last_user):
            out += (msg["reasoning"] or "") + THINK_END
        out += (msg["content"] or "") + (_render_calls(msg["tool_calls"]) if msg["tool_calls"] else "")
        if not msg.get("wo_eos"):
            out += EOS
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return out
    open_think = thinking and (not drop or i >= last_user)
    task = msg.get("task")
    if task is not None:
        if task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
        else:
            out += TASK_TOKENS[task]
    elif role in ("user", "developer") or (
        role == "system" and (i + 1 == len(msgs) or msgs[i + 1]["role"] == "assistant")
    ):
        out += ASSISTANT + (THINK_START if open_think else THINK_END)
    return out


# --- entry points ---
def render_chat(
    messages: Sequence[Any],
    *,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    reasoning_effort: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    default_chat_template_kwargs: Mapping[str, Any] | None = None,
    context: Sequence[Any] | None = None,
    exclude_tools_when_tool_choice_none: bool = False,
    vllm_enable_thinking_quirk: bool = False,
) -> ChatPrompt:
    """Render the V4 prompt. `context`: earlier messages already in the KV cache (no BOS, not re-rendered)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise ChatEncodingError("messages must be a list")
    if reasoning_effort is not None and not isinstance(reasoning_effort, str):
        raise ChatEncodingError("reasoning_effort must be a string")
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
        raise ChatEncodingError("chat_template_kwargs must be an object")
    thinking, effort, kwargs = resolve_mode(
        chat_template_kwargs,
        default_chat_template_kwargs,
        reasoning_effort,
        vllm_enable_thinking_quirk=vllm_enable_thinking_quirk,
    )
    ctx = [_normalize_message(i, m) for i, m in enumerate(context or ())]
    new = [_normalize_message(len(ctx) + i, m) for i, m in enumerate(messages)]
    if not ctx and not new:
        raise ChatEncodingError("messages must not be empty")
    try:
        specs = function_specs(tools)
    except ValueError as e:
        raise ChatEncodingError(str(e)) from e
    full = ctx + new
    if specs and not (exclude_tools_when_tool_choice_none and tool_choice == "none"):
        first_system = next((j for j, m in enumerate(full) if m["role"] == "system"), None)
        if first_system is None:
            full.insert(0, {"role": "system", "content": None, "reasoning": None, "tool_calls": None})
            first_system = 0
            if ctx:
                ctx.insert(0, full[0])
        full[first_system] = {**full[first_system], "tools": specs}
    n_ctx = len(_merge_tool_messages([dict(m) for m in ctx])) if ctx else 0
    full = _merge_tool_messages(full)
    drop = bool(kwargs.get("drop_thinking", True)) and not any(m.get("tools") for m in full)
    if thinking and drop:
        n_ctx = len(_drop_thinking(full[:n_ctx])) if n_ctx else 0
        full = _drop_thinking(full)
    text = BOS if not ctx else ""
    text += "".join(_render_message(i, full, thinking, drop, effort) for i in range(n_ctx, len(full)))
    return ChatPrompt(text=text, thinking=thinking, effort=effort, drop_thinking=drop, kwargs=kwargs)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[Any], **kwargs: Any) -> tuple[list[int], ChatPrompt]:
    """`render_chat(messages, **kwargs)` then `tokenizer.encode` (BOS is part of the text, never added)."""
    prompt = render_chat(messages, **kwargs)
    return tokenizer.encode(prompt.text), prompt
