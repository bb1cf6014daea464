"""Prompt-encoding tests: messages -> V4 prompt text and ids, golden against serving-spec §1 (vLLM's own outputs)."""

from __future__ import annotations

import json

import pytest

from ds4f.chat.encoding import ChatEncodingError, encode_chat, render_chat, resolve_mode
from ds4f.tokenizer import Tokenizer, load_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
LAUNCH = {"thinking": True, "reasoning_effort": "high"}  # --default-chat-template-kwargs of the target launch
HIGH = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and "
    "comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all "
    "potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, "
    "documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no "
    "assumption is left unchecked.\n\n"
)
MAX = (
    "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\nYou MUST reason with the utmost "
    "depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its most "
    "fundamental components, trace every causal chain to its root, and resolve the underlying cause rather than any "
    "surface symptom.\nDo not stop reasoning until you have independently verified the solution from multiple angles "
    "and are certain that no assumption remains unchecked and no error remains undiscovered.\n\n"
)
TOOLS_HEAD = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

"""  # noqa: E501
TOOLS_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
# The spec does not print Ex 3's description; this one reproduces its counts (277-token block, 374/466 prompts).
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
WEATHER_JSON = json.dumps(WEATHER["function"], ensure_ascii=False)
SYS = {"role": "system", "content": "You are a helpful assistant."}
CALL_BLOCK = (
    '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def render(messages, **kw) -> str:
    kw.setdefault("default_chat_template_kwargs", LAUNCH)
    return render_chat(messages, **kw).text


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# --- §1.5 worked examples -------------------------------------------------------------------------------------------
def test_ex1_plain_chat_ids(tok: Tokenizer) -> None:
    ids, p = encode_chat(
        tok, [SYS, user("Hello!")], chat_template_kwargs={"thinking": False}, default_chat_template_kwargs=LAUNCH
    )
    assert ids == [0, 3476, 477, 260, 11502, 22896, 16, 128803, 19923, 3, 128804, 128822]
    assert p.text == f"{BOS}You are a helpful assistant.{U}Hello!{A}</think>"
    assert (p.thinking, p.effort) == (False, None)


def test_ex1_server_defaults(tok: Tokenizer) -> None:
    ids, p = encode_chat(tok, [SYS, user("Hello!")], default_chat_template_kwargs=LAUNCH)
    assert p.text == f"{BOS}{HIGH}You are a helpful assistant.{U}Hello!{A}<think>"
    assert (len(ids), ids[0], ids[-1]) == (91, 0, 128821)
    assert (p.thinking, p.effort) == (True, "high")


def test_ex2_multi_turn_drops_reasoning(tok: Tokenizer) -> None:
    msgs = [
        user("Hi"),
        {"role": "assistant", "content": "Hello! How can I help?", "reasoning_content": "User greets."},
        user("What is 2+2?"),
    ]
    ids, p = encode_chat(tok, msgs, default_chat_template_kwargs=LAUNCH)
    assert p.text == f"{BOS}{HIGH}{U}Hi{A}</think>Hello! How can I help?{EOS}{U}What is 2+2?{A}<think>"
    assert len(ids) == 102


def _turn2(reasoning_key: str = "reasoning_content") -> list[dict]:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    }
    return [
        SYS,
        user("Weather in Paris for 2 days?"),
        {"role": "assistant", "content": "", reasoning_key: "Need the weather tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 18, "sky": "cloudy"}'},
    ]


def test_ex3_tool_round_trip(tok: Tokenizer) -> None:
    tools_block = TOOLS_HEAD + WEATHER_JSON + TOOLS_TAIL
    assert len(tok.encode(tools_block)) == 277
    ids, p = encode_chat(
        tok, [SYS, user("Weather in Paris for 2 days?")], tools=[WEATHER], default_chat_template_kwargs=LAUNCH
    )
    turn1 = f"{BOS}{HIGH}You are a helpful assistant.\n\n{tools_block}{U}Weather in Paris for 2 days?{A}<think>"
    assert p.text == turn1
    assert len(ids) == 374
    assert p.drop_thinking is False
    ids, p = encode_chat(tok, _turn2(), tools=[WEATHER], default_chat_template_kwargs=LAUNCH)
    expected = (
        turn1 + "Need the weather tool.</think>" + CALL_BLOCK + EOS
        + U + '<tool_result>{"temp_c": 18, "sky": "cloudy"}</tool_result>' + A + "<think>"
    )  # fmt: skip
    assert p.text == expected
    assert len(ids) == 466
    assert render(_turn2("reasoning"), tools=[WEATHER]) == expected


def test_ex3_chat_mode_and_later_request_without_tools() -> None:
    text = render(_turn2(), tools=[WEATHER], reasoning_effort="none")
    assert f"{A}</think>{CALL_BLOCK}{EOS}" in text
    assert text.endswith(f"</tool_result>{A}</think>")
    assert HIGH not in text
    # no tools -> drop_thinking applies again: the old tool turn loses its reasoning
    text = render(_turn2())
    assert text == (
        f"{BOS}{HIGH}You are a helpful assistant.{U}Weather in Paris for 2 days?{A}</think>{CALL_BLOCK}{EOS}"
        f'{U}<tool_result>{{"temp_c": 18, "sky": "cloudy"}}</tool_result>{A}<think>'
    )


def test_parallel_results_reordered_and_merged() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    msgs = [
        user("go"),
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "b", "content": "R"},
        {"role": "tool", "tool_call_id": "a", "content": "P"},
        user("and then?"),
    ]
    text = render(msgs, tools=[WEATHER])
    assert text.endswith(f"{U}<tool_result>P</tool_result>\n\n<tool_result>R</tool_result>\n\nand then?{A}<think>")


# --- §1.2 mode and effort ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_kw", "thinking", "preamble", "ending"),
    [
        ({}, True, HIGH, "<think>"),
        ({"reasoning_effort": "none"}, False, "", "</think>"),
        ({"reasoning_effort": "low"}, True, "", "<think>"),
        ({"reasoning_effort": "medium"}, True, "", "<think>"),
        ({"reasoning_effort": "minimal"}, True, "", "<think>"),
        ({"reasoning_effort": "max"}, True, MAX, "<think>"),
        ({"reasoning_effort": "xhigh"}, True, HIGH, "<think>"),
        ({"chat_template_kwargs": {"thinking": False}}, False, "", "</think>"),
        ({"chat_template_kwargs": {"reasoning_effort": "max"}}, True, MAX, "<think>"),
        ({"chat_template_kwargs": {"reasoning_effort": "auto"}}, True, HIGH, "<think>"),
    ],
)
def test_mode_table(request_kw: dict, thinking: bool, preamble: str, ending: str) -> None:
    p = render_chat([user("q")], default_chat_template_kwargs=LAUNCH, **request_kw)
    assert p.thinking is thinking
    assert p.text == f"{BOS}{preamble}{U}q{A}{ending}"


def test_enable_thinking_false_ds4f_rule_vs_vllm_quirk() -> None:
    req = {"chat_template_kwargs": {"enable_thinking": False}}
    # ds4f: the request's own switch wins over the server default `thinking=true`
    p = render_chat([user("q")], default_chat_template_kwargs=LAUNCH, **req)
    assert (p.thinking, p.text) == (False, f"{BOS}{U}q{A}</think>")
    # vLLM 0.33 ORs the default back in (spec §1.2 "still thinking")
    p = render_chat([user("q")], default_chat_template_kwargs=LAUNCH, vllm_enable_thinking_quirk=True, **req)
    assert (p.thinking, p.text) == (True, f"{BOS}{HIGH}{U}q{A}<think>")


def test_resolve_mode_rules() -> None:
    assert resolve_mode()[:2] == (True, "high")  # neither key present -> thinking
    assert resolve_mode({"thinking": False})[:2] == (False, None)
    assert resolve_mode({"enable_thinking": True, "reasoning_effort": 3})[:2] == (True, "high")
    # a top-level effort sets enable_thinking unless the request's kwargs already hold it
    assert resolve_mode({"thinking": False}, reasoning_effort="max")[:2] == (True, "max")
    assert resolve_mode({"enable_thinking": False}, reasoning_effort="max")[:2] == (False, None)
    assert resolve_mode(None, {"thinking": False}, "low")[:2] == (True, "low")  # effort sets enable_thinking
    assert resolve_mode(None, LAUNCH, "none")[:2] == (False, None)


def test_effort_goes_before_first_message_whatever_role() -> None:
    dev = {"role": "developer", "content": "Be brief."}
    kw = {"chat_template_kwargs": {"drop_thinking": False}}  # else the developer message would be dropped
    assert render([dev, user("q")], **kw) == f"{BOS}{HIGH}{U}Be brief.{U}q{A}<think>"
    reminder = {"role": "latest_reminder", "content": "R"}
    assert render([reminder, user("q")]) == f"{BOS}{HIGH}<｜latest_reminder｜>R{U}q{A}<think>"
    assert render([{"role": "assistant", "content": "hi"}, user("q")]) == f"{BOS}{HIGH}hi{EOS}{U}q{A}<think>"


# --- §1.3 / §1.4 rules -----------------------------------------------------------------------------------------------
def test_tools_rendering_rules() -> None:
    noop = {"type": "function", "function": {"name": "noop"}}
    strict = {"type": "function", "function": {"name": "s", "description": "d", "parameters": {}, "strict": True}}
    text = render([user("q")], tools=[noop, strict], reasoning_effort="none")
    schemas = '{"name": "noop", "description": null, "parameters": null}\n'
    schemas += '{"name": "s", "description": "d", "parameters": {}, "strict": true}'
    # no system message -> an empty one is inserted at index 0 and carries the tools
    assert text == f"{BOS}\n\n{TOOLS_HEAD}{schemas}{TOOLS_TAIL}{U}q{A}</think>"
    # tool_choice none still renders them (vLLM's --exclude-tools-when-tool-choice-none is off)
    assert render([user("q")], tools=[noop], tool_choice="none") == render([user("q")], tools=[noop])
    # the first system message carries them even when it is not at index 0
    text = render([user("q"), {"role": "system", "content": "S"}], tools=[noop], reasoning_effort="none")
    assert text.startswith(f"{BOS}{U}qS\n\n## Tools")


def test_content_parts_and_images() -> None:
    parts = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "b"},
    ]
    tool_parts = [{"type": "text", "text": "t1"}, {"type": "text", "text": "t2"}]
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "s1"}, {"type": "text", "text": "s2"}]},
        {"role": "user", "content": parts},
        {
            "role": "assistant",
            "content": "x",
            "tool_calls": [{"id": "i", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "i", "content": tool_parts},
    ]
    text = render(msgs, reasoning_effort="none")
    assert text.startswith(f"{BOS}s1\n\ns2{U}a\n\n<｜deepseek_image｜>\n\nb{A}</think>x")
    assert text.endswith(f"{U}<tool_result>t1\nt2</tool_result>{A}</think>")


def test_assistant_tool_call_arguments() -> None:
    def call(args):
        return {"id": "i", "type": "function", "function": {"name": "f", "arguments": args}}

    args = {"s": 'a "q" <b>\n', "n": 1.5, "b": True, "z": None, "l": [1, "x"], "o": {"k": "é"}}
    msgs = [user("q"), {"role": "assistant", "content": "", "tool_calls": [call(json.dumps(args)), call("{bad")]}]
    text = render(msgs, reasoning_effort="none")
    assert text.endswith(
        f'{A}</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="s" string="true">a "q" <b>\n</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">1.5</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="b" string="false">true</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="z" string="false">null</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="l" string="false">[1, "x"]</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="o" string="false">{"k": "é"}</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS
    )
    # a non-object JSON value renders as {} too (a warning, never a 400)
    assert render([user("q"), {"role": "assistant", "tool_calls": [call("[1]")]}]) == render(
        [user("q"), {"role": "assistant", "tool_calls": [call({})]}]
    )


def test_developer_dropped_before_last_user_in_thinking_mode_only() -> None:
    msgs = [
        user("u1"),
        {"role": "developer", "content": "D"},
        {"role": "assistant", "content": "A1", "reasoning": "r1"},
        user("u2"),
    ]
    assert render(msgs) == f"{BOS}{HIGH}{U}u1{A}</think>A1{EOS}{U}u2{A}<think>"
    assert render(msgs, reasoning_effort="none") == f"{BOS}{U}u1{U}D{A}</think>A1{EOS}{U}u2{A}</think>"
    # drop_thinking:false keeps the reasoning and opens <think> everywhere
    kept = render(msgs, chat_template_kwargs={"drop_thinking": False})
    assert kept == f"{BOS}{HIGH}{U}u1{U}D{A}<think>r1</think>A1{EOS}{U}u2{A}<think>"


def test_second_system_message_and_transitions() -> None:
    msgs = [
        user("U1"),
        {"role": "assistant", "content": "A1"},
        {"role": "system", "content": "S2"},
        user("U2"),
    ]
    assert render(msgs, reasoning_effort="none") == f"{BOS}{U}U1{A}</think>A1{EOS}S2{U}U2{A}</think>"
    # a system message that is last gets the transition; a final assistant still gets EOS
    assert render([{"role": "system", "content": "S"}], reasoning_effort="none") == f"{BOS}S{A}</think>"
    assert render([user("U"), {"role": "assistant", "content": "A"}], reasoning_effort="none").endswith(f"A{EOS}")
    wo = render([user("U"), {"role": "assistant", "content": "A", "wo_eos": True}], reasoning_effort="none")
    assert wo.endswith(f"{A}</think>A")


def test_latest_reminder_task_and_response_format() -> None:
    msgs = [user("U"), {"role": "latest_reminder", "content": "R"}]
    assert render(msgs, reasoning_effort="none") == f"{BOS}{U}U{A}</think><｜latest_reminder｜>R"
    assert render([{"role": "user", "content": "U", "task": "query"}]) == f"{BOS}{HIGH}{U}U<｜query｜>"
    action = render([{"role": "user", "content": "U", "task": "action"}])
    assert action == f"{BOS}{HIGH}{U}U{A}<think><｜action｜>"
    rf = {"type": "object"}
    text = render([{"role": "system", "content": "S", "response_format": rf}, user("U")], reasoning_effort="none")
    assert text == (
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        f'{{"type": "object"}}{U}U{A}</think>'
    )


def test_context_means_no_bos_and_no_rerender() -> None:
    ctx = [user("U1"), {"role": "assistant", "content": "A1"}]
    p = render_chat([user("U2")], context=ctx, reasoning_effort="none")
    assert p.text == f"{U}U2{A}</think>"
    full = render([*ctx, user("U2")], reasoning_effort="none")
    assert full.endswith(p.text) and full.startswith(BOS)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "wizard", "content": "x"}], "role"),
        ([{"role": "developer", "content": ""}], "developer"),
        ([{"role": "user", "content": 3}], "content"),
        ([{"role": "user", "content": [{"type": "audio", "x": 1}]}], "unsupported"),
        (["hello"], "object"),
        ([], "empty"),
        ([{"role": "assistant", "tool_calls": {"a": 1}}], "tool_calls"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "name"),
        ([{"role": "user", "content": "x", "task": "nope"}], "task"),
    ],
)
def test_invalid_input_raises(messages: list, fragment: str) -> None:
    with pytest.raises(ChatEncodingError, match=fragment):
        render_chat(messages)
    assert issubclass(ChatEncodingError, ValueError)


def test_invalid_tools_and_kwargs_raise() -> None:
    with pytest.raises(ChatEncodingError, match="tools"):
        render_chat([user("q")], tools=[{"type": "function", "function": {"description": "no name"}}])
    with pytest.raises(ChatEncodingError, match="messages"):
        render_chat("hello")  # type: ignore[arg-type]
    with pytest.raises(ChatEncodingError, match="reasoning_effort"):
        render_chat([user("q")], reasoning_effort=5)  # type: ignore[arg-type]


def test_developer_message_tools_and_response_format() -> None:
    noop = {"type": "function", "function": {"name": "noop"}}
    dev = {"role": "developer", "content": "D", "tools": [noop], "response_format": {"type": "object"}}
    text = render([dev], reasoning_effort="none")
    schemas = '{"name": "noop", "description": null, "parameters": null}'
    assert text == (
        f"{BOS}{U}D\n\n{TOOLS_HEAD}{schemas}{TOOLS_TAIL}\n\n## Response Format:\n\nYou MUST strictly adhere to the "
        f'following schema to reply:\n{{"type": "object"}}{A}</think>'
    )
    with pytest.raises(ChatEncodingError, match="tools"):
        render([{"role": "developer", "content": "D", "tools": [{"function": {}}]}])
