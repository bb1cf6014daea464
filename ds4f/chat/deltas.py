"""The parsing stage's output shapes: reasoning / content / tool-call deltas as streamed (and their OpenAI JSON), one
step's deltas merged into one SSE chunk, and a whole response parsed (ds4f/chat/parser.py makes them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None  # set (with name) only on the first delta of a call
    name: str | None = None
    arguments: str | None = None  # a prefix-safe fragment of the final JSON string

    def to_openai(self) -> dict[str, Any]:
        if self.id is not None:
            return {"id": self.id, "type": "function", "index": self.index, "function": {"name": self.name}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class Delta:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.content is not None:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = [tc.to_openai() for tc in self.tool_calls]
        return out


def merge_deltas(deltas: Sequence[Delta]) -> Delta | None:
    """Coalesce one step's deltas into one SSE delta (tool fragments of one call joined; header kept first)."""
    if not deltas:
        return None
    out = Delta()
    for d in deltas:
        if d.reasoning is not None:
            out.reasoning = (out.reasoning or "") + d.reasoning
        if d.content is not None:
            out.content = (out.content or "") + d.content
        for tc in d.tool_calls:
            last = out.tool_calls[-1] if out.tool_calls else None
            if last is not None and last.index == tc.index and tc.id is None and last.arguments is not None:
                last.arguments += tc.arguments or ""
            else:
                out.tool_calls.append(ToolCallDelta(tc.index, tc.id, tc.name, tc.arguments))
    return out


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[dict[str, Any]]  # OpenAI shape: {"id", "type": "function", "function": {"name", "arguments"}}
