"""End to end: the official `openai` SDK against a real `ds4f serve` subprocess on the built-in tiny model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from server_fakes import start_server

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CHAT_MODE = {"extra_body": {"chat_template_kwargs": {"thinking": False}}}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = start_server("--enable-auto-tool-choice", "--max-model-len", "4096", "--served-model-name",
                             "deepseek-v4-flash", "--default-chat-template-kwargs.thinking=true")
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="EMPTY", max_retries=0, timeout=120)


MODEL = "deepseek-v4-flash"
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    extra = models[0].model_extra or {}
    assert extra["root"] == "ds4f-tiny" and extra["max_model_len"] == 4096 and models[0].owned_by == "vllm"


def test_chat_non_stream(client: openai.OpenAI, server: str) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    ch = r.choices[0]
    assert r.object == "chat.completion" and ch.finish_reason in ("length", "stop")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 8
    n_prompt = httpx.post(f"{server}/tokenize", json={"messages": MSGS}).json()["count"]
    assert r.usage.prompt_tokens == n_prompt
    extra = ch.message.model_extra or {}
    text = (ch.message.content or "") + (extra.get("reasoning") or "")
    assert text, "8 generated tokens decode to some text"
    assert extra.get("reasoning_content") == extra.get("reasoning")
    # the same greedy request again gives the same answer
    again = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert again.choices[0].message == ch.message


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    n_ids = sum(len((c.choices[0].model_extra or {}).get("token_ids") or []) for c in chunks if c.choices)
    assert n_ids == chunks[-1].usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0] in ("length", "stop")


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens <= 5
    fim = client.completions.create(model=MODEL, prompt="def add(a, b):\n", suffix="\n", max_tokens=3)
    assert fim.usage is not None and fim.usage.prompt_tokens > 4


def test_tool_choice_none_and_auto(client: openai.OpenAI) -> None:
    for choice in ("none", "auto"):
        r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=choice,  # type: ignore[arg-type]
                                           max_tokens=8, **CHAT_MODE)
        ch = r.choices[0]
        assert ch.finish_reason in ("length", "stop", "tool_calls")
        if choice == "none":
            assert not ch.message.tool_calls


def test_stream_disconnect_frees_the_engine(server: str) -> None:
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)

    def running() -> float:
        text = httpx.get(f"{server}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("vllm:num_requests_running{"))
        return float(line.rsplit(" ", 1)[1])

    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running() == 0


# Last: a failure inside the engine loop would take the shared server down for the tests after it.
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_makes_a_call(client: openai.OpenAI, choice: object) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MSGS, tools=TOOLS, tool_choice=choice,  # type: ignore[arg-type]
                                       max_tokens=80, temperature=0, **CHAT_MODE)
    ch = r.choices[0]
    assert ch.message.tool_calls, f"constrained decoding must produce a call, got {ch.message}"
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    json.loads(call.function.arguments)
    if ch.finish_reason != "length":
        assert ch.finish_reason == ("stop" if isinstance(choice, dict) else "tool_calls")
