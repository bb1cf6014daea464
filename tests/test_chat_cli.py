"""`ds4f chat`: SSE folding, dimmed reasoning, pretty tool calls, session history; the real CLI on `ds4f serve`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ds4f.tools import chat_cli
from ds4f.tools.endpoint import child_env

pytest.importorskip("rich")
from rich.console import Console


def _sse(*chunks: dict[str, object]) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _delta(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


TOOL_REPLY = _sse(
    _delta({"role": "assistant", "content": ""}),
    _delta({"reasoning": "The user wants weather."}),
    _delta({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                            "function": {"name": "get_weather", "arguments": ""}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    _delta({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _delta({}, "tool_calls"),
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
)
TEXT_REPLY = _sse(_delta({"reasoning": "Reading the result."}), _delta({"content": "It is 20 C in Paris."}),
                  _delta({}, "stop"))


class Fake:
    """A chat endpoint answering with canned SSE bodies in order, recording each request body."""

    def __init__(self, *bodies: bytes) -> None:
        self.bodies = list(bodies)
        self.requests: list[dict[str, object]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(json.loads(request.content))
        return httpx.Response(200, content=self.bodies.pop(0), headers={"content-type": "text/event-stream"})


def _args(**kw: object) -> argparse.Namespace:
    base = {"system": None, "tools": None, "max_tokens": None, "temperature": None, "reasoning_effort": None,
            "hide_reasoning": False}
    return argparse.Namespace(**(base | kw))


def _console() -> Console:
    return Console(record=True, force_terminal=True, color_system="standard", width=100)


def _reader(lines: list[str]) -> Callable[[], str]:
    """Pops typed lines; EOF (Ctrl-D) once they run out."""

    def read() -> str:
        if not lines:
            raise EOFError
        return lines.pop(0)

    return read


def test_stream_folds_tool_call_fragments_and_reasoning() -> None:
    seen: list[tuple[str, str]] = []
    with httpx.Client(transport=httpx.MockTransport(Fake(TOOL_REPLY))) as client:
        turn = chat_cli.stream_turn(client, "http://x/v1/chat/completions", {"model": "m", "messages": []},
                                    lambda t: seen.append(("r", t)), lambda t: seen.append(("c", t)))
    assert turn.reasoning == "The user wants weather." and turn.content == "" and turn.finish_reason == "tool_calls"
    assert turn.tool_calls == [{"id": "call_1", "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert seen == [("r", "The user wants weather.")]


def test_loop_dims_reasoning_pretty_prints_tools_and_keeps_history(tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]))
    fake = Fake(TOOL_REPLY, TEXT_REPLY)
    console = _console()
    inputs = ["weather in Paris?", '/tool {"temp_c": 20}', "/exit", "never read"]
    with httpx.Client(transport=httpx.MockTransport(fake)) as client:
        history = chat_cli.chat_loop(client, "http://x/v1/chat/completions", "m", _args(system="be brief", tools=tools),
                                     _reader(inputs), console)
    assert inputs == ["never read"]  # /exit stopped reading
    first, second = fake.requests
    assert first["stream"] is True and first["tools"] and [m["role"] for m in first["messages"]] == ["system", "user"]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert second["messages"][3] == {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                                     "content": '{"temp_c": 20}'}
    assert history[-1] == {"role": "assistant", "content": "It is 20 C in Paris."}
    styled = console.export_text(styles=True, clear=False)
    assert "\x1b[2mThe user wants weather.\x1b[0m" in styled  # reasoning dimmed (SGR 2)
    text = console.export_text()
    assert "tool call: get_weather" in text and '"city": "Paris"' in text and "It is 20 C in Paris." in text


def test_reset_clears_history_but_keeps_system() -> None:
    fake = Fake(TEXT_REPLY, TEXT_REPLY)
    inputs = ["one", "/reset", "two"]
    with httpx.Client(transport=httpx.MockTransport(fake)) as client:
        history = chat_cli.chat_loop(client, "http://x/v1/chat/completions", "m", _args(system="s"),
                                     _reader(inputs), _console())
    assert [m["role"] for m in fake.requests[1]["messages"]] == ["system", "user"]
    assert [m["content"] for m in history] == ["s", "two", "It is 20 C in Paris."]


@pytest.mark.slow
def test_chat_cli_against_ds4f_serve(server: str) -> None:
    p = subprocess.run([sys.executable, "-m", "ds4f", "chat", "--base-url", server, "--max-tokens", "6"],
                       input="Hello there\nAnd again\n/exit\n", env=child_env(), text=True, capture_output=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ds4f-tiny" in p.stdout and "error" not in p.stdout.lower()
    assert p.stdout.count("> ") >= 3  # prompted for each line until /exit


def test_chat_against_a_down_server_fails_fast() -> None:
    p = subprocess.run([sys.executable, "-m", "ds4f", "chat", "--base-url", "http://127.0.0.1:9"], env=child_env(),
                       text=True, capture_output=True, timeout=60)
    assert p.returncode == 2 and "http://127.0.0.1:9" in p.stderr and "ds4f serve" in p.stderr
