"""Bad-input suite: each malformed request gets a 4xx in OpenAI's error shape naming the problem; serving goes on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_fakes import FakeEngine, ServerThread, settings

from ds4f.server.api import build_app

CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSGS = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
MAX_LEN = 256
MAX_BODY = 1 << 16


def j(**kw: Any) -> dict[str, Any]:
    return {"messages": MSGS, **kw}


# (id, path, body: dict | bytes, headers, expected status, substring of the message (lower-cased), param or None)
CASES: list[tuple[str, str, Any, dict[str, str], int, str, str | None]] = [
    ("malformed_json", CHAT, b'{"messages": [', {}, 400, "not valid json", None),
    ("empty_body", CHAT, b"", {}, 400, "empty", None),
    ("json_array_body", CHAT, b"[1, 2]", {}, 400, "json object", None),
    ("invalid_utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400, "utf-8", None),
    ("form_content_type", CHAT, b"messages=hi", {"content-type": "application/x-www-form-urlencoded"}, 400,
     "application/json", None),
    ("oversized_body", CHAT, {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}, {}, 413, "limit",
     None),
    ("missing_messages", CHAT, {"model": "ds4f-test"}, {}, 400, "field required", "messages"),
    ("messages_not_list", CHAT, {"messages": "hello"}, {}, 400, "valid list", "messages"),
    ("empty_messages", CHAT, {"messages": []}, {}, 400, "at least 1", "messages"),
    ("unknown_role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, {}, 400, "unknown role",
     "messages.0.role"),
    ("missing_role", CHAT, {"messages": [{"content": "hi"}]}, {}, 400, "field required", "messages.0.role"),
    ("user_without_content", CHAT, {"messages": [{"role": "user"}]}, {}, 400, "needs `content`", "messages.0"),
    ("content_wrong_type", CHAT, {"messages": [{"role": "user", "content": 42}]}, {}, 400, "valid", None),
    ("text_part_without_text", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, {}, 400,
     "needs a string `text`", None),
    ("empty_developer", CHAT, {"messages": [{"role": "developer", "content": ""}, *MSGS]}, {}, 400, "developer",
     None),
    ("max_tokens_string", CHAT, j(max_tokens="lots"), {}, 400, "valid integer", "max_tokens"),
    ("max_tokens_zero", CHAT, j(max_tokens=0), {}, 400, "greater than or equal to 1", "max_tokens"),
    ("huge_max_tokens", CHAT, j(max_tokens=10**12), {}, 400, "maximum context length is 256", "max_tokens"),
    ("huge_max_completion_tokens", CHAT, j(max_completion_tokens=10**9), {}, 400, "max_completion_tokens",
     "max_completion_tokens"),
    ("prompt_over_max_model_len", CHAT, {"messages": [{"role": "user", "content": "word " * 400}]}, {}, 400,
     "maximum context length is 256 tokens. however, your prompt contains", None),
    ("temperature_negative", CHAT, j(temperature=-1), {}, 400, "greater than or equal to 0", "temperature"),
    ("temperature_too_high", CHAT, j(temperature=7), {}, 400, "less than or equal to 2", "temperature"),
    ("temperature_string", CHAT, j(temperature="hot"), {}, 400, "valid number", "temperature"),
    ("top_p_zero", CHAT, j(top_p=0), {}, 400, "greater than 0", "top_p"),
    ("n_greater_than_1", CHAT, j(n=3), {}, 400, "only n=1", None),
    ("stop_wrong_type", CHAT, j(stop=5), {}, 400, "valid", "stop.str"),
    ("stop_list_of_ints", CHAT, j(stop=[1, 2]), {}, 400, "valid string", None),
    ("logprobs_out_of_range", CHAT, j(logprobs=True, top_logprobs=50), {}, 400, "less than or equal to 20",
     "top_logprobs"),
    ("top_logprobs_without_logprobs", CHAT, j(top_logprobs=2), {}, 400, "`logprobs` must be set", None),
    ("stream_options_without_stream", CHAT, j(stream_options={"include_usage": True}), {}, 400,
     "only be defined when `stream=true`", None),
    ("tools_not_list", CHAT, j(tools={"name": "x"}), {}, 400, "valid list", "tools"),
    ("tools_empty", CHAT, j(tools=[]), {}, 400, "empty list", None),
    ("tool_without_name", CHAT, j(tools=[{"type": "function", "function": {"parameters": {}}}]), {}, 400,
     "field required", "tools.0.function.name"),
    ("tool_parameters_not_object", CHAT,
     j(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), {}, 400,
     "type 'object'", None),
    ("tool_wrong_type", CHAT, j(tools=[{"type": "retrieval", "function": {"name": "f"}}]), {}, 400, "function",
     "tools.0.type"),
    ("duplicate_tool_names", CHAT, j(tools=[TOOL, TOOL]), {}, 400, "unique", None),
    ("tool_choice_missing_tool", CHAT, j(tools=[TOOL], tool_choice={"type": "function",
                                                                    "function": {"name": "nope"}}), {}, 400,
     "'nope'", None),
    ("tool_choice_without_tools", CHAT, j(tool_choice="required"), {}, 400, "`tools` must be set", None),
    ("tool_choice_bad_string", CHAT, j(tools=[TOOL], tool_choice="always"), {}, 400, "'none', 'auto'", None),
    ("response_format_unknown", CHAT, j(response_format={"type": "xml"}), {}, 400, "response_format", None),
    ("stop_token_id_out_of_vocab", CHAT, j(stop_token_ids=[10**7]), {}, 400, "out of vocabulary",
     "stop_token_ids"),
    ("unknown_model", CHAT, j(model="gpt-4"), {}, 404, "does not exist. valid aliases: ds4f-test, alias", "model"),
    ("completion_missing_prompt", COMP, {"max_tokens": 3}, {}, 400, "field required", "prompt"),
    ("completion_empty_prompt", COMP, {"prompt": ""}, {}, 400, "empty", "prompt"),
    ("completion_empty_list", COMP, {"prompt": []}, {}, 400, "empty list", None),
    ("completion_token_out_of_vocab", COMP, {"prompt": [1, 2, 999999999]}, {}, 400, "out of vocabulary", "prompt"),
    ("completion_logprobs_too_many", COMP, {"prompt": "x", "logprobs": 99}, {}, 400, "less than or equal to 20",
     "logprobs"),
    ("completion_suffix_with_ids", COMP, {"prompt": [1, 2], "suffix": "x"}, {}, 400, "suffix", None),
    ("completion_best_of", COMP, {"prompt": "x", "best_of": 3}, {}, 400, "best_of", None),
    ("completion_unknown_model", COMP, {"prompt": "x", "model": "nope"}, {}, 404, "does not exist", "model"),
    ("detokenize_bad_ids", "/detokenize", {"tokens": [-1]}, {}, 400, "out of vocabulary", "tokens"),
    ("tokenize_missing_prompt", "/tokenize", {"model": "ds4f-test"}, {}, 400, "field required", "prompt"),
    ("unknown_route", "/v1/embeddings", {"input": "x"}, {}, 404, "no such route", None),
    ("deeply_nested_json", CHAT, b"[" * 30000 + b"]" * 30000, {}, 400, "too deeply", None),
    ("seed_out_of_range", CHAT, j(seed=2**70), {}, 400, "less than", "seed"),
    ("stop_empty_string", CHAT, j(stop=[""]), {}, 400, "stop", None),
]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerThread]:
    s = settings(max_body_bytes=MAX_BODY)
    with ServerThread(build_app(FakeEngine(max_model_len=MAX_LEN), s)) as server:
        yield server


def _post(srv: ServerThread, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    if isinstance(body, bytes):
        h = {"content-type": "application/json", **headers}
        return httpx.post(f"{srv.url}{path}", content=body, headers=h, timeout=30)
    return httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=30)


def test_at_least_30_shapes() -> None:
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(srv: ServerThread, case: tuple[Any, ...]) -> None:
    _, path, body, headers, status, needle, param = case
    r = _post(srv, path, body, headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and isinstance(err["type"], str) and err["type"]
    assert needle in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param


def test_openai_sdk_sees_typed_errors(srv: ServerThread) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ds4f-test", messages=MSGS, temperature=9)  # type: ignore[arg-type]
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSGS)  # type: ignore[arg-type]


def test_server_keeps_serving_after_bad_input(srv: ServerThread) -> None:
    for _, path, body, headers, *_ in CASES:
        _post(srv, path, body, headers)
    r = httpx.post(f"{srv.url}{CHAT}", json=j(max_tokens=8), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_unknown_fields_are_accepted(srv: ServerThread) -> None:
    r = httpx.post(f"{srv.url}{CHAT}", json=j(max_tokens=4, cache_prompt=False, some_future_field={"a": 1}),
                   timeout=30)
    assert r.status_code == 200
