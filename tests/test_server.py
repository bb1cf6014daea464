"""Server tests over HTTP (FakeEngine): vLLM/OpenAI shapes of every endpoint, SSE framing, auth, queue, disconnect."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_fakes import FakeEngine, ServerThread, settings, tokenizer

from ds4f.server.api import build_app

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
# serving-spec.md §1.5 Ex 1: exact ids of system + user with thinking off.
EX1_IDS = [0, 3476, 477, 260, 11502, 22896, 16, 128803, 19923, 3, 128804, 128822]
EX1_MESSAGES = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def url(engine: FakeEngine) -> Iterator[str]:
    s = settings(default_chat_template_kwargs={"thinking": True, "reasoning_effort": "high"})
    with ServerThread(build_app(engine, s)) as srv:
        yield srv.url


def sse(text: str) -> list[Any]:
    """SSE body -> JSON objects, with "[DONE]" kept as the string; asserts the framing."""
    frames = text.split("\n\n")
    assert frames[-1] == "", "the body must end with a blank line"
    out = []
    for f in frames[:-1]:
        assert f.startswith("data: "), f
        payload = f[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat(url: str, **body: Any) -> httpx.Response:
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def test_models_health_version(url: str) -> None:
    m = httpx.get(f"{url}/v1/models").json()
    assert m["object"] == "list"
    assert [d["id"] for d in m["data"]] == ["ds4f-test", "alias"]
    d = m["data"][0]
    assert (d["object"], d["owned_by"], d["root"], d["parent"], d["max_model_len"]) == (
        "model", "vllm", "ds4f-tiny", None, 4096)
    assert d["permission"][0]["object"] == "model_permission"
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.content == b""
    assert httpx.get(f"{url}/version").json()["version"] == "0.33.0"


def test_chat_non_stream_shape(url: str) -> None:
    r = chat(url, max_tokens=64)
    assert r.status_code == 200
    j = r.json()
    assert j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-") and j["model"] == "ds4f-test"
    # serving-spec.md §4.4, vLLM's non-stream response keys
    assert set(j) == {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
                      "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                      "ec_transfer_params", "metrics"}
    assert set(j["choices"][0]) == {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
                                    "routed_experts", "weight_versions"}
    msg = j["choices"][0]["message"]
    assert list(msg)[:6] == ["role", "content", "refusal", "annotations", "audio", "function_call"]
    assert "tool_calls" not in msg
    assert msg["content"] == "Echo: Hi"
    assert msg["reasoning"] == msg["reasoning_content"] == "Let me think."
    assert j["choices"][0]["finish_reason"] == "stop" and j["choices"][0]["stop_reason"] is None
    u = j["usage"]
    n_out = len(tokenizer().encode("Let me think.</think>Echo: Hi")) + 1  # EOS counts
    assert u["completion_tokens"] == n_out
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # tokens generated in the REASONING state, `</think>` (the one that ends it) included
    assert u["completion_tokens_details"]["reasoning_tokens"] == len(tokenizer().encode("Let me think.</think>"))


def test_chat_stream_sse(url: str) -> None:
    r = chat(url, max_tokens=64, stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:] if c["choices"])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    body = [c for c in chunks[1:-1]]
    assert body[-1]["choices"][0]["finish_reason"] == "stop" and body[-1]["choices"][0]["delta"] == {}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning", "") for c in body)
    assert (content, reasoning) == ("Echo: Hi", "Let me think.")
    # llama-benchy counts tokens from token_ids when every text chunk has them
    text_chunks = [c for c in body if c["choices"][0]["delta"]]
    assert all(isinstance(c["choices"][0]["token_ids"], list) for c in text_chunks)
    n_ids = sum(len(c["choices"][0]["token_ids"] or []) for c in body)
    assert n_ids == usage_chunk["usage"]["completion_tokens"]


def test_stream_without_usage_has_no_usage_chunk(url: str) -> None:
    events = sse(chat(url, max_tokens=8, stream=True).text)
    assert events[-1] == "[DONE]" and all(e["choices"] for e in events[:-1])
    assert all(e["choices"][0].get("token_ids") is None for e in events[:-1])


def test_chat_tools_auto_and_none_and_parallel(url: str, engine: FakeEngine) -> None:
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    j = chat(url, messages=msgs, tools=[WEATHER_TOOL]).json()
    call = j["choices"][0]["message"]["tool_calls"][0]
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}
    assert j["choices"][0]["finish_reason"] == "tool_calls"
    assert "## Tools" in tokenizer().decode(engine.last_prompt)
    j = chat(url, messages=msgs, tools=[WEATHER_TOOL], tool_choice="none").json()
    m = j["choices"][0]["message"]
    assert "tool_calls" not in m and "DSML" not in (m["content"] or "")
    assert j["choices"][0]["finish_reason"] == "stop"
    j = chat(url, messages=msgs, tools=[WEATHER_TOOL], parallel_tool_calls=False).json()
    assert len(j["choices"][0]["message"]["tool_calls"]) == 1


def test_chat_tool_stream_deltas(url: str) -> None:
    events = sse(chat(url, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL],
                      stream=True).text)
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    tc = [t for d in deltas for t in d.get("tool_calls", [])]
    assert tc[0]["id"].startswith("chatcmpl-tool-") and tc[0]["function"] == {"name": "get_weather"}
    assert "".join(t["function"].get("arguments", "") for t in tc[1:]) == '{"city": "Paris", "days": 2}'
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_enable_thinking_false_wins_over_server_default(url: str, engine: FakeEngine) -> None:
    j = chat(url, chat_template_kwargs={"enable_thinking": False}).json()
    assert engine.last_prompt[-1] == 128822  # prompt ends `<｜Assistant｜></think>`: chat mode
    assert j["choices"][0]["message"]["reasoning"] is None
    chat(url)
    assert engine.last_prompt[-1] == 128821


def test_tokenize_chat_form_matches_engine_prompt(url: str, engine: FakeEngine) -> None:
    body = {"messages": EX1_MESSAGES, "chat_template_kwargs": {"thinking": False}}
    t = httpx.post(f"{url}/tokenize", json=body).json()
    assert t["tokens"] == EX1_IDS and t["count"] == 12 and t["max_model_len"] == 4096 and t["token_strs"] is None
    chat(url, **body, max_tokens=2)
    assert engine.last_prompt == EX1_IDS
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER_TOOL], "max_tokens": 3}
    t = httpx.post(f"{url}/tokenize", json=body).json()
    chat(url, **body)
    assert engine.last_prompt == t["tokens"]


def test_tokenize_plain_and_detokenize(url: str) -> None:
    t = httpx.post(f"{url}/tokenize", json={"prompt": "Hello!", "return_token_strs": True}).json()
    assert t["tokens"] == [19923, 3] and t["count"] == 2 and len(t["token_strs"]) == 2
    d = httpx.post(f"{url}/detokenize", json={"tokens": EX1_IDS[:3]}).json()
    assert d == {"prompt": "<｜begin▁of▁sentence｜>You are"}


def test_completions_plain_batch_and_fim(url: str, engine: FakeEngine) -> None:
    j = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}).json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-")
    c = j["choices"][0]
    assert (c["index"], c["finish_reason"]) == (0, "length") and c["text"] == "Echo: Hello"[: len(c["text"])]
    assert j["usage"]["completion_tokens"] == 3 and engine.last_params.max_tokens == 3
    j = httpx.post(f"{url}/v1/completions", json={"prompt": ["a", "Hello!"], "max_tokens": 2}).json()
    assert [c["index"] for c in j["choices"]] == [0, 1] and j["usage"]["prompt_tokens"] == 3
    httpx.post(f"{url}/v1/completions", json={"prompt": "def f(", "suffix": "return x", "max_tokens": 2})
    assert engine.last_prompt == tokenizer().encode("<｜fim▁begin｜>def f(<｜fim▁hole｜>return x<｜fim▁end｜>")
    assert engine.last_prompt[0] == 128801 and 128800 in engine.last_prompt and engine.last_prompt[-1] == 128802
    j = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 16, "echo": True}).json()
    assert j["choices"][0]["text"].startswith("HiEcho: Hi")


def test_completions_stream(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 30, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == "Echo: Hello" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] > 0
    assert events[-3]["choices"][0]["finish_reason"] == "stop"


def test_stop_strings_and_logprobs(url: str) -> None:
    j = chat(url, chat_template_kwargs={"thinking": False}, stop=[":"], logprobs=True, top_logprobs=2).json()
    ch = j["choices"][0]
    assert ch["message"]["content"] == "Echo" and ch["finish_reason"] == "stop" and ch["stop_reason"] == ":"
    lp = ch["logprobs"]["content"]
    assert lp[0]["logprob"] == -0.25 and len(lp[0]["top_logprobs"]) == 2
    assert "".join(t["token"] for t in lp) == "Echo:"  # one entry per generated token, the stop string's included
    j = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "logprobs": 1}).json()
    lp = j["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.25, -0.25] and len(lp["top_logprobs"][0]) == 1


def test_metrics_vllm_names_and_counters(url: str) -> None:
    before = httpx.get(f"{url}/metrics").text
    chat(url, max_tokens=4)
    text = httpx.get(f"{url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:request_success_total", "vllm:cache_config_info"):
        assert name in text, name
    assert 'model_name="ds4f-test"' in text and 'block_size="256"' in text

    def value(t: str, metric: str) -> float:
        line = next(x for x in t.splitlines() if x.startswith(metric + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value(text, "vllm:generation_tokens_total") > value(before, "vllm:generation_tokens_total")
    assert value(text, "vllm:e2e_request_latency_seconds_count") == (
        value(before, "vllm:e2e_request_latency_seconds_count") + 1)


# --- servers with a slow engine: timing, disconnects, queue, auth ---------------------------------------------------
def test_role_chunk_waits_for_first_token() -> None:
    eng = FakeEngine(step_s=0.4)
    with ServerThread(build_app(eng, settings())) as srv:
        t0 = time.monotonic()
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                                "max_tokens": 2}) as r:
            first = next(r.iter_lines())
            waited = time.monotonic() - t0
        assert json.loads(first[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
        assert waited >= 0.35, "the role chunk must not precede the first sampled token"


def _wait_idle(eng: FakeEngine, timeout: float = 3.0) -> float:
    t0 = time.monotonic()
    while eng.stats()["num_running"] and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    return time.monotonic() - t0


def test_client_disconnect_aborts_stream_and_non_stream() -> None:
    eng = FakeEngine(step_s=0.02)
    with ServerThread(build_app(eng, settings())) as srv:
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 2000,
                "ignore_eos": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert eng.stats()["num_running"] == 1
        assert _wait_idle(eng) < 2.0 and eng.stats()["num_running"] == 0
        assert list(eng.finished.values()) == ["abort"]
        # non-stream: the client gives up (read timeout) while the engine is still generating
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
        assert _wait_idle(eng) < 2.0 and eng.stats()["num_running"] == 0
        assert list(eng.finished.values()) == ["abort", "abort"]
        assert chat(srv.url, max_tokens=4).status_code == 200


def test_queue_full_gets_429_with_retry_after() -> None:
    eng = FakeEngine(step_s=0.05)
    with ServerThread(build_app(eng, settings(max_num_seqs=1, max_waiting=0))) as srv:
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "ignore_eos": True}
        holder = threading.Thread(target=chat, args=(srv.url,), kwargs=body)
        holder.start()
        deadline = time.monotonic() + 5
        while eng.stats()["num_running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = chat(srv.url, max_tokens=2)
        holder.join()
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == 429 and "capacity" in r.json()["error"]["message"]
        assert chat(srv.url, max_tokens=2).status_code == 200
        assert "ds4f:requests_rejected_total" in httpx.get(f"{srv.url}/metrics").text


def test_api_key() -> None:
    with ServerThread(build_app(FakeEngine(), settings(api_key="sekrit"))) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            r = httpx.get(f"{srv.url}/v1/models", headers=headers)
            assert r.status_code == 401
            err = r.json()["error"]
            assert err["code"] == 401 and err["type"] == "AuthenticationError" and "--api-key" in err["message"]
        ok = {"Authorization": "Bearer sekrit"}
        assert httpx.get(f"{srv.url}/v1/models", headers=ok).status_code == 200
        assert httpx.post(f"{srv.url}/v1/chat/completions", headers=ok, timeout=30,
                          json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).status_code == 200
        assert httpx.get(f"{srv.url}/health").status_code == 200  # like vLLM, only /v1 is guarded


@pytest.mark.parametrize("choice,finish", [("required", "tool_calls"),
                                           ({"type": "function", "function": {"name": "get_weather"}}, "stop")],
                         ids=["required", "named"])
def test_forced_tool_choice_goes_through_the_grammar(url: str, engine: FakeEngine, choice: Any, finish: str) -> None:
    # the fake's script answers "Echo: ..." for this prompt; only the DSML grammar can turn it into a call
    j = chat(url, messages=[{"role": "user", "content": "Tell me a joke"}], tools=[WEATHER_TOOL], tool_choice=choice,
             max_tokens=60, chat_template_kwargs={"thinking": False}).json()
    procs = engine.last_params.logits_processors
    assert procs and len(procs) == 1
    ch = j["choices"][0]
    assert ch["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert ch["message"]["content"] == ""  # forced choice: "" rather than null, as vLLM
    assert ch["finish_reason"] in (finish, "length")
    # with the script already a valid call, the grammar lets it through and the finish reason follows vLLM
    j = chat(url, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL], tool_choice=choice,
             chat_template_kwargs={"thinking": False}).json()
    assert j["choices"][0]["finish_reason"] == finish
    assert json.loads(j["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris",
                                                                                                "days": 2}


def test_auto_tool_choice_needs_the_flag() -> None:
    with ServerThread(build_app(FakeEngine(), settings(enable_auto_tool_choice=False))) as srv:
        r = chat(srv.url, tools=[WEATHER_TOOL])
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]
        assert chat(srv.url, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=4).status_code == 200


def test_continuous_usage_and_include_reasoning_false(url: str) -> None:
    events = sse(chat(url, max_tokens=64, stream=True, include_reasoning=False,
                      stream_options={"include_usage": True, "continuous_usage_stats": True}).text)
    chunks = [e for e in events[:-1] if e["choices"]]
    assert all("usage" in c for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in chunks] == sorted(c["usage"]["completion_tokens"] for c in chunks)
    assert not any("reasoning" in c["choices"][0]["delta"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Echo: Hi"


def test_dead_engine_gives_503_health_and_500_requests() -> None:
    eng = FakeEngine()
    with ServerThread(build_app(eng, settings())) as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        eng.healthy = False

        async def dead(*_: Any, **__: Any) -> Any:
            raise RuntimeError("engine loop stopped")
            yield  # an async generator, like AsyncEngine.generate

        eng.generate = dead  # type: ignore[method-assign]
        assert httpx.get(f"{srv.url}/health").status_code == 503
        r = chat(srv.url)
        assert r.status_code == 500 and "engine loop stopped" in r.json()["error"]["message"]
