"""Chat protocol stage: OpenAI chat requests -> V4 prompt ids, and generated text -> reasoning/content/tool calls."""

from __future__ import annotations

from ds4f.chat.encoding import ChatEncodingError, ChatPrompt, encode_chat, render_chat, resolve_mode
from ds4f.chat.parser import Delta, ParsedOutput, StreamParser, ToolCallDelta, merge_deltas, parse_output

__all__ = [
    "ChatEncodingError",
    "ChatPrompt",
    "Delta",
    "ParsedOutput",
    "StreamParser",
    "ToolCallDelta",
    "encode_chat",
    "merge_deltas",
    "parse_output",
    "render_chat",
    "resolve_mode",
]
