"""Response parsing stage: generated text (any split) -> reasoning / content / DSML tool-call deltas (spec §2-3)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ds4f.chat import tools as schema
from ds4f.chat.deltas import Delta, ParsedOutput, ToolCallDelta, merge_deltas

__all__ = ["Delta", "ParsedOutput", "State", "StreamParser", "ToolCallDelta", "merge_deltas", "parse_output"]

_D = "｜DSML｜"
THINK_START, THINK_END = "<think>", "</think>"
TOOL_STARTS = (f"<{_D}tool_calls>", f"<{_D}toolcalls>", f"<{_D}tool>")
TOOL_ENDS = (f"</{_D}tool_calls>", f"</{_D}toolcalls>", f"</{_D}tool>")
INVOKE_PREFIX, INVOKE_NAME_END, INVOKE_END = f'<{_D}invoke name="', '">', f"</{_D}invoke>"
PARAM_START, PARAM_CLOSE, HEADER_END = f"<{_D}parameter", f"</{_D}parameter>", ">"
EOS = "<｜end▁of▁sentence｜>"


class State(Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_PREAMBLE = "tool_preamble"  # after <tool_calls>, before the first invoke
    TOOL_NAME = "tool_name"
    TOOL_ARGS = "tool_args"  # inside an invoke, between parameters
    PARAM_HEADER = "param_header"  # ` name="K" string="S"` up to `>`
    PARAM_VALUE = "param_value"
    TOOL_BETWEEN = "tool_between"  # after </invoke>
    AFTER_TOOLS = "after_tools"  # after </tool_calls>: text is dropped, further calls still parse
    DONE = "done"  # after EOS text


_TERMS: dict[State, tuple[str, ...]] = {
    State.REASONING: (THINK_START, THINK_END, *TOOL_STARTS, INVOKE_PREFIX, EOS),
    State.CONTENT: (THINK_START, THINK_END, *TOOL_STARTS, INVOKE_PREFIX, EOS),
    State.TOOL_PREAMBLE: (INVOKE_PREFIX, *TOOL_ENDS, EOS),
    State.TOOL_NAME: (INVOKE_NAME_END, INVOKE_END, *TOOL_ENDS, EOS),
    State.TOOL_ARGS: (PARAM_START, PARAM_CLOSE, INVOKE_END, *TOOL_ENDS, EOS),
    State.PARAM_HEADER: (HEADER_END, PARAM_START, INVOKE_END, *TOOL_ENDS, EOS),
    State.PARAM_VALUE: (PARAM_CLOSE, PARAM_START, INVOKE_END, *TOOL_ENDS, EOS),
    State.TOOL_BETWEEN: (INVOKE_PREFIX, *TOOL_ENDS, EOS),
    State.AFTER_TOOLS: (*TOOL_STARTS, INVOKE_PREFIX, EOS),
    State.DONE: (),
}
_FIRSTS = {s: frozenset(t[0] for t in ts) for s, ts in _TERMS.items()}
_MAXLEN = {s: max((len(t) for t in ts), default=0) for s, ts in _TERMS.items()}


def _dumps(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{secrets.token_hex(8)}"


@dataclass
class _Call:
    index: int | None  # None: parsed but not reported (tool_choice none, parallel_tool_calls false, empty name)
    id: str
    name_buf: str = ""
    name: str = ""
    props: dict[str, Any] | None = None
    hold: bool = False  # wrapper-unwrap candidate: emit the whole JSON at the end
    raw: list[tuple[str, str, bool]] = field(default_factory=list)  # (key, raw value, string="true") in hold mode
    keys: set[str] = field(default_factory=set)
    arguments: str = ""  # everything emitted so far
    pending: str = ""  # emitted with the next fragment (closing quote or a held non-string value)
    key: str | None = None  # the open parameter (None: skipped / malformed)
    is_str: bool = False
    streaming: bool = False
    value: str = ""
    header: str = ""


class StreamParser:
    """One incremental state machine for reasoning + content + DSML tool calls. Feed decoded text in any split."""

    def __init__(
        self,
        thinking: bool,
        tools: Sequence[Any] | None = None,
        *,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        id_factory: Callable[[], str] = new_tool_call_id,
    ) -> None:
        self.state = State.REASONING if thinking else State.CONTENT
        self._specs = schema.function_specs(tools)
        self._suppress = tool_choice == "none" and bool(self._specs)
        self._parallel = parallel_tool_calls
        self._new_id = id_factory
        self._buf = ""
        self._out: list[Delta] = []
        self._reason_ws = ""  # trailing reasoning whitespace, emitted only if more reasoning follows
        self._content_ws = ""  # leading whitespace-only content, held until non-whitespace or finish
        self._content_nonws = False
        self._tool_block_seen = False
        self._call: _Call | None = None
        self._n_calls = 0
        self.tool_calls: list[dict[str, Any]] = []  # completed, reported calls (OpenAI shape)
        self.reasoning_ended = not thinking
        self._finished = False

    # --- public API ----------------------------------------------------------------------------------------------
    @property
    def in_reasoning(self) -> bool:
        """True while generated tokens count as reasoning tokens."""
        return self.state is State.REASONING

    def feed(self, text: str) -> list[Delta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        self._lex()
        return self._take()

    def finish(self) -> list[Delta]:
        """End of generation: flush held text, close an open call (truncated output), emit held content."""
        if not self._finished:
            self._finished = True
            buf, self._buf = self._buf, ""
            if buf:
                self._text(buf)
            self._close_structures()
            if self._content_ws and not self._tool_block_seen:
                self._emit(Delta(content=self._content_ws))
            self._content_ws = ""
            self.state = State.DONE
        return self._take()

    # --- lexer ---------------------------------------------------------------------------------------------------
    def _lex(self) -> None:
        while self._buf and self.state is not State.DONE:
            buf, terms = self._buf, _TERMS[self.state]
            pos, term = -1, ""
            for t in terms:
                p = buf.find(t)
                if p != -1 and (pos == -1 or p < pos or (p == pos and len(t) > len(term))):
                    pos, term = p, t
            if pos == -1:
                cut = self._holdback(buf)
                if cut:
                    self._buf = buf[cut:]
                    self._text(buf[:cut])
                return
            self._buf = buf[pos + len(term) :]
            if pos:
                self._text(buf[:pos])
            self._terminal(term)

    def _holdback(self, buf: str) -> int:
        """Length of the prefix of `buf` that cannot start a terminal of the current state."""
        terms, firsts = _TERMS[self.state], _FIRSTS[self.state]
        for i in range(max(0, len(buf) - _MAXLEN[self.state] + 1), len(buf)):
            if buf[i] in firsts:
                tail = buf[i:]
                if any(t.startswith(tail) for t in terms):
                    return i
        return len(buf)

    # --- text and terminals ----------------------------------------------------------------------------------------
    def _text(self, s: str) -> None:
        st, call = self.state, self._call
        if st is State.REASONING:
            combined = self._reason_ws + s
            trimmed = combined.rstrip()
            self._reason_ws = combined[len(trimmed) :]
            if trimmed:
                self._emit(Delta(reasoning=trimmed))
        elif st is State.CONTENT:
            if self._content_nonws:
                self._emit(Delta(content=s))
            else:
                self._content_ws += s
                if self._content_ws.strip():
                    self._content_nonws = True
                    self._emit(Delta(content=self._content_ws))
                    self._content_ws = ""
        elif call is not None and st is State.TOOL_NAME:
            call.name_buf += s
        elif call is not None and st is State.PARAM_HEADER:
            call.header += s
        elif call is not None and st is State.PARAM_VALUE:
            call.value += s
            if call.streaming and call.key is not None:
                self._args(call, _dumps(s)[1:-1])
        # other states: structural whitespace / junk between tags is dropped

    def _terminal(self, t: str) -> None:
        st = self.state
        if t == EOS:
            self._close_structures()
            self.state = State.DONE
        elif st in (State.REASONING, State.CONTENT):
            if t == THINK_START:
                self.state = State.REASONING
            elif t == THINK_END:
                self._end_reasoning()
                self.state = State.CONTENT
            else:
                self._end_reasoning()
                self._start_tools()
                self.state = State.TOOL_PREAMBLE
                if t == INVOKE_PREFIX:
                    self._start_call()
        elif t in TOOL_STARTS:
            self.state = State.TOOL_PREAMBLE
        elif t == INVOKE_PREFIX:
            self._start_call()
        elif t in TOOL_ENDS or t == INVOKE_END:
            self._close_structures()
            self.state = State.AFTER_TOOLS if t in TOOL_ENDS else State.TOOL_BETWEEN
        elif st is State.TOOL_NAME:  # INVOKE_NAME_END
            self._name_done()
        elif t == PARAM_START:
            if st is State.PARAM_VALUE:
                self._close_param(self._call)
            self._open_header()
        elif t == PARAM_CLOSE:
            if st is State.PARAM_VALUE:
                self._close_param(self._call)
            self.state = State.TOOL_ARGS
        elif t == HEADER_END:
            self._header_done()

    def _end_reasoning(self) -> None:
        self._reason_ws = ""
        self.reasoning_ended = True

    def _start_tools(self) -> None:
        self._tool_block_seen = True
        if not self._content_nonws:
            self._content_ws = ""  # whitespace-only content before a tool block is dropped

    # --- tool calls ----------------------------------------------------------------------------------------------
    def _start_call(self) -> None:
        self._close_structures()
        self._call = _Call(index=None, id="")
        self.state = State.TOOL_NAME

    def _name_done(self) -> None:
        call = self._call
        assert call is not None
        call.name = call.name_buf.strip()
        self.state = State.TOOL_ARGS
        if not call.name or self._suppress or (not self._parallel and self._n_calls >= 1):
            return
        call.index, call.id = self._n_calls, self._new_id()
        self._n_calls += 1
        call.props = schema.find_properties(self._specs, call.name)
        self._emit(Delta(tool_calls=[ToolCallDelta(call.index, call.id, call.name)]))

    def _open_header(self) -> None:
        assert self._call is not None
        self._call.header, self._call.key, self._call.value = "", None, ""
        self.state = State.PARAM_HEADER

    def _header_done(self) -> None:
        call = self._call
        assert call is not None
        self.state = State.PARAM_VALUE
        attrs = schema.parse_param_header(call.header)
        key = attrs.get("name")
        if key is None or key in call.keys:
            call.key = None  # malformed or duplicate: the first occurrence wins
            return
        call.keys.add(key)
        call.key, call.is_str, call.value = key, attrs.get("string") == "true", ""
        props = call.props
        if not call.raw and not call.arguments and props and key in ("arguments", "input") and key not in props:
            call.hold = True
        call.streaming = (
            not call.hold
            and call.is_str
            and (props is None or key not in props or schema.schema_types(props[key]) == {"string"})
        )
        if not call.hold:
            sep = ", " if call.arguments else "{"
            self._args(call, call.pending + sep + _dumps(key) + ": " + ('"' if call.streaming else ""))
            call.pending = ""

    def _close_param(self, call: _Call | None) -> None:
        if call is None or call.key is None:
            return
        key, raw = call.key, call.value
        call.key = None
        if call.hold:
            call.raw.append((key, raw, call.is_str))
            return
        value = schema.param_value(raw, call.is_str)
        if call.props and isinstance(call.props.get(key), dict):
            value = schema.coerce_value(value, call.props[key])
        call.pending = '"' if call.streaming else _dumps(value)

    def _close_structures(self) -> None:
        """Close whatever is open (param, call); used by </invoke>, </tool_calls>, a new invoke, EOS and finish."""
        call = self._call
        if call is None:
            return
        self._call = None
        if self.state is State.TOOL_NAME:
            return  # the name never closed: no call
        if self.state is State.PARAM_VALUE:
            self._close_param(call)
        if call.hold:
            args = {k: schema.param_value(v, s) for k, v, s in call.raw}
            args = schema.coerce_args(schema.unwrap_wrapper(args, call.props), call.props)
            self._args(call, _dumps(args))
        else:
            self._args(call, call.pending + "}" if call.arguments else "{}")
        if call.index is not None:
            fn = {"name": call.name, "arguments": call.arguments}
            self.tool_calls.append({"id": call.id, "type": "function", "function": fn})

    def _args(self, call: _Call, frag: str) -> None:
        if not frag:
            return
        call.arguments += frag
        if call.index is None:
            return
        last = self._out[-1].tool_calls[-1] if self._out and self._out[-1].tool_calls else None
        if last is not None and last.index == call.index and last.id is None:
            last.arguments = (last.arguments or "") + frag
        else:
            self._emit(Delta(tool_calls=[ToolCallDelta(call.index, arguments=frag)]))

    # --- output --------------------------------------------------------------------------------------------------
    def _emit(self, d: Delta) -> None:
        last = self._out[-1] if self._out else None
        if last is not None and d.reasoning is not None and last.reasoning is not None:
            last.reasoning += d.reasoning
        elif last is not None and d.content is not None and last.content is not None:
            last.content += d.content
        else:
            self._out.append(d)

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out


def parse_output(
    text: str,
    *,
    thinking: bool,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool = True,
    id_factory: Callable[[], str] = new_tool_call_id,
) -> ParsedOutput:
    """Non-streaming parse: exactly what the stream parser's deltas add up to for the same text."""
    p = StreamParser(thinking, tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls,
                     id_factory=id_factory)  # fmt: skip
    merged = merge_deltas(p.feed(text) + p.finish())
    reasoning = merged.reasoning if merged else None
    content = merged.content if merged else None
    return ParsedOutput(reasoning or None, content or None, p.tool_calls)
