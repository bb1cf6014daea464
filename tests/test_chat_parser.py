"""Response-parser tests: model text (whole / any split / token by token) -> reasoning, content, tool calls (§2-3)."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds4f.chat.parser import Delta, StreamParser, merge_deltas, parse_output
from ds4f.tokenizer import load_tokenizer

D = "｜DSML｜"
TS, TE = f"<{D}tool_calls>", f"</{D}tool_calls>"
IE = f"</{D}invoke>"
EOS = "<｜end▁of▁sentence｜>"


def inv(name: str, *params: str) -> str:
    return f'<{D}invoke name="{name}">\n' + "\n".join(params) + f"\n{IE}"


def par(name: str, value: str, string: str | None = "true") -> str:
    attr = f' string="{string}"' if string is not None else ""
    return f'<{D}parameter name="{name}"{attr}>{value}</{D}parameter>'


def block(*invokes: str) -> str:
    return f"\n\n{TS}\n" + "\n".join(invokes) + f"\n{TE}"


def tool(name: str, props: dict | None = None) -> dict:
    params = {"type": "object", "properties": props} if props is not None else None
    return {"type": "function", "function": {"name": name, "parameters": params}}


WEATHER = tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}, "flags": {"type": "array"}})
EX3 = "Need the weather tool.</think>" + block(inv("get_weather", par("city", "Paris"), par("days", "2", "false")))


def ids():
    counter = itertools.count()
    return lambda: f"chatcmpl-tool-{next(counter):016x}"


def run(pieces: list[str], **kw) -> tuple[str | None, str | None, list[dict], list[Delta]]:
    """Feed pieces; rebuild the message from the deltas alone (what an SSE client would assemble)."""
    p = StreamParser(kw.pop("thinking"), kw.pop("tools", None), id_factory=ids(), **kw)
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += p.feed(piece)
    deltas += p.finish()
    calls: dict[int, dict] = {}
    for d in deltas:
        assert sum(x is not None and x != [] for x in (d.reasoning, d.content, d.tool_calls)) == 1
        for tc in d.tool_calls:
            if tc.id is not None:
                assert tc.index not in calls and tc.arguments is None and tc.name
                calls[tc.index] = {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}
            else:
                calls[tc.index]["function"]["arguments"] += tc.arguments
    merged = merge_deltas(deltas)
    reasoning = merged.reasoning if merged else None
    content = merged.content if merged else None
    assert list(calls) == list(range(len(calls)))
    assert list(calls.values()) == p.tool_calls
    return reasoning or None, content or None, list(calls.values()), deltas


_TOK = load_tokenizer()


def token_pieces(text: str) -> list[str]:
    """Incremental detokenization: each token's text, multi-byte characters completed by later tokens."""
    out, pending = [], b""
    for i in _TOK.encode(text):
        pending += _TOK.token_bytes(i)
        try:
            out.append(pending.decode())
            pending = b""
        except UnicodeDecodeError:
            continue
    assert not pending
    return out


def check_all_splits(text: str, **kw) -> tuple[str | None, str | None, list[dict]]:
    """parse_output == stream fed whole == every 2-way char split == char by char == token by token."""
    whole = parse_output(text, id_factory=ids(), **kw)
    expected = (whole.reasoning, whole.content, whole.tool_calls)
    assert run([text], **dict(kw))[:3] == expected
    assert run(list(text), **dict(kw))[:3] == expected
    assert run(token_pieces(text), **dict(kw))[:3] == expected
    for i in range(1, len(text)):
        assert run([text[:i], text[i:]], **dict(kw))[:3] == expected, i
    for call in whole.tool_calls:
        args = call["function"]["arguments"]
        assert json.dumps(json.loads(args), ensure_ascii=False) == args
    return expected


# --- §1.5 Ex 3 / §2.3 -----------------------------------------------------------------------------------------------
def test_ex3_tool_call() -> None:
    reasoning, content, calls = check_all_splits(EX3 + EOS, thinking=True, tools=[WEATHER])
    assert (reasoning, content) == ("Need the weather tool.", None)
    assert calls == [
        {
            "id": "chatcmpl-tool-0000000000000000",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
        }
    ]
    real = parse_output(EX3, thinking=True, tools=[WEATHER]).tool_calls[0]["id"]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", real)


def test_streaming_fragments_match_spec_sequence() -> None:
    pieces = [
        f'{TS}\n<{D}invoke name="get_weather">\n',
        f'<{D}parameter name="city" string="true">',
        "Paris",
        f'</{D}parameter>\n<{D}parameter name="days" string="false">',
        "2",
        f'</{D}parameter>\n<{D}parameter name="flags" string="false">',
        '["a", "b"]',
        f"</{D}parameter>\n{IE}\n{TE}",
    ]
    _, _, calls, deltas = run(pieces, thinking=False, tools=[WEATHER])
    first = deltas[0].tool_calls[0].to_openai()
    assert first == {"id": calls[0]["id"], "type": "function", "index": 0, "function": {"name": "get_weather"}}
    frags = [tc.arguments for d in deltas[1:] for tc in d.tool_calls]
    assert frags == ['{"city": "', "Paris", '", "days": ', '2, "flags": ', '["a", "b"]}']


def test_reasoning_whitespace_deferred_and_ws_chunks_held() -> None:
    p = StreamParser(thinking=True)
    assert [d.reasoning for d in p.feed(".")] == ["."]
    assert p.feed("\n") == []  # whitespace-only: held, no delta for this token
    assert [d.reasoning for d in p.feed("OK  ")] == ["\nOK"]
    assert p.feed("</think>") == []  # </think> produces no text; the held "  " is dropped
    assert p.feed("\n\n") == []  # leading whitespace-only content is held too
    assert [d.content for d in p.feed("Hi")] == ["\n\nHi"]
    assert p.finish() == []


# --- §3 reasoning parser ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "thinking", "reasoning", "content"),
    [
        ("The user asks…</think>2 + 2 = 4.", True, "The user asks…", "2 + 2 = 4."),
        ("still thinking \n", True, "still thinking", None),  # truncated during thinking
        ("plain answer", False, None, "plain answer"),
        ("<think>r</think>c", False, "r", "c"),  # <think> switches to reasoning even in chat mode
        ("a</think>b</think>c", True, "a", "bc"),  # stray </think> in content is swallowed
        ("a<think>b</think>c", True, "ab", "c"),  # duplicate <think> in reasoning is swallowed
        ("</think>\n\n", True, None, "\n\n"),  # whitespace-only content without tools is kept at the end
        ("x <thin", False, None, "x <thin"),  # a held-back partial marker is flushed as text at the end
        ("r</think>ok" + EOS + "junk", True, "r", "ok"),  # EOS text ends the turn
        ("", True, None, None),
    ],
)
def test_reasoning_and_content(text: str, thinking: bool, reasoning: str | None, content: str | None) -> None:
    assert check_all_splits(text, thinking=thinking) == (reasoning, content, [])


def test_partial_marker_is_never_emitted_as_content() -> None:
    p = StreamParser(thinking=False)
    assert [d.content for d in p.feed("Hello <")] == ["Hello "]
    assert p.feed("｜DSML｜tool") == []
    assert [d.content for d in p.feed("ing>")] == [f"<{D}tooling>"]
    assert [d.content for d in p.feed("<b")] == ["<b"]


# --- §2.2 tool calls ----------------------------------------------------------------------------------------------
def args_of(text: str, **kw) -> list[tuple[str, dict]]:
    _, _, calls = check_all_splits(text, **kw)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_tool_call_without_think_end_ends_reasoning() -> None:
    text = "thinking..." + block(inv("f", par("a", "1", "false")))
    reasoning, content, calls = check_all_splits(text, thinking=True)
    assert (reasoning, content, calls[0]["function"]["arguments"]) == ("thinking...", None, '{"a": 1}')


@pytest.mark.parametrize("header", [TS, f"<{D}toolcalls>", f"<{D}tool>", ""])
def test_block_variants_and_headerless_invoke(header: str) -> None:
    text = f"{header}\n" + inv("f", par("q", "x y")) + f"\n{TE}"
    assert args_of(text, thinking=False) == [("f", {"q": "x y"})]


def test_parameter_typing_without_schema() -> None:
    text = block(
        inv(
            "unknown_tool",
            par("s", "true"),  # string="true": raw string
            par("n", "1.5", "false"),
            par("o", '{"k": [1, null]}', "false"),
            par("m", "[1, 2]", None),  # missing string attribute: json.loads
            par("bad", "not json", "false"),  # falls back to the raw string
            par("e", "", "false"),
            par("nan", "NaN", "false"),  # non-finite is not JSON: kept as text
            par("s", "dup"),  # duplicate key: first wins
        )
    )
    assert args_of(text, thinking=False, tools=[WEATHER]) == [
        (
            "unknown_tool",
            {"s": "true", "n": 1.5, "o": {"k": [1, None]}, "m": [1, 2], "bad": "not json", "e": "", "nan": "NaN"},
        )
    ]


def test_schema_coercion() -> None:
    props = {
        "days": {"type": "integer"},
        "on": {"type": "boolean"},
        "off": {"type": "boolean"},
        "ratio": {"type": "number"},
        "maybe": {"type": ["null", "string"]},
        "mode": {"enum": [1, 2]},
        "label": {"type": "string"},
        "nested": {"type": "object", "properties": {"n": {"type": "integer"}}},
        "items": {"type": "array", "items": {"type": "boolean"}},
        "obj": {"type": "object"},
    }
    text = block(
        inv(
            "t",
            par("days", "7"),
            par("on", "true"),
            par("off", "0"),
            par("ratio", "2.50"),
            par("maybe", "null"),
            par("mode", "2"),
            par("label", "5", "false"),
            par("nested", '{"n": "3"}', "false"),
            par("items", '["1", "false"]', "false"),
            par("obj", '{"a": 1}'),
        )
    )
    expected = {
        "days": 7,
        "on": True,
        "off": False,
        "ratio": 2.5,
        "maybe": None,
        "mode": 2,
        "label": "5",
        "nested": {"n": 3},
        "items": [True, False],
        "obj": {"a": 1},
    }
    assert args_of(text, thinking=False, tools=[tool("t", props)]) == [("t", expected)]


@pytest.mark.parametrize("wrapper", ["arguments", "input"])
def test_wrapper_unwrap(wrapper: str) -> None:
    t = tool("t", {"a": {"type": "integer"}, "b": {"type": "string"}})
    text = block(inv("t", par(wrapper, '{"a": "1", "b": "x"}', "false")))
    assert args_of(text, thinking=False, tools=[t]) == [("t", {"a": 1, "b": "x"})]
    # an inner key outside the schema, or the wrapper key in the schema: no unwrap
    text = block(inv("t", par(wrapper, '{"zzz": 1}', "false")))
    assert args_of(text, thinking=False, tools=[t]) == [("t", {wrapper: {"zzz": 1}})]
    t2 = tool("t", {wrapper: {"type": "object"}})
    text = block(inv("t", par(wrapper, '{"a": 1}', "false")))
    assert args_of(text, thinking=False, tools=[t2]) == [("t", {wrapper: {"a": 1}})]


def test_multiple_calls_content_and_text_after_block() -> None:
    text = "Sure, checking." + block(inv("f", par("a", "1")), inv("g")) + "\nTrailing text is dropped."
    reasoning, content, calls = check_all_splits(text, thinking=False)
    assert (reasoning, content) == (None, "Sure, checking.\n\n")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("f", '{"a": "1"}'), ("g", "{}")]
    # whitespace-only content before a tool block is dropped
    assert check_all_splits("r</think>\n\n" + block(inv("f")), thinking=True)[:2] == ("r", None)


def test_tool_choice_none_and_parallel_false() -> None:
    text = "Here." + block(inv("f", par("a", "1")), inv("g"))
    assert check_all_splits(text, thinking=False, tools=[tool("f")], tool_choice="none") == (None, "Here.\n\n", [])
    _, _, calls = check_all_splits(text, thinking=False, parallel_tool_calls=False)
    assert [c["function"]["name"] for c in calls] == ["f"]


def test_malformed_blocks() -> None:
    # missing </parameter> is fine when the next parameter starts; junk between tags is ignored
    text = f'{TS}\n<{D}invoke name=" f ">junk\n<{D}parameter name="a" string="true">1\n{par("b", "2", "false")}\n{IE}'
    assert args_of(text, thinking=False) == [("f", {"a": "1\n", "b": 2})]
    # an empty name drops the call; an unparseable parameter header drops the parameter
    text = block(inv(""), inv("g", f"<{D}parameter junk>v</{D}parameter>", par("ok", "1")))
    assert args_of(text, thinking=False) == [("g", {"ok": "1"})]
    # a second block after the first still parses; text between is dropped
    text = block(inv("f")) + "between" + block(inv("g"))
    assert [n for n, _ in args_of(text, thinking=False)] == ["f", "g"]


def test_truncated_mid_call() -> None:
    head = f'{TS}\n<{D}invoke name="get_weather">\n{par("days", "2", "false")}\n'
    text = head + f'<{D}parameter name="city" string="true">Par'
    _, _, calls, deltas = run(list(text), thinking=False, tools=[WEATHER])
    frags = [tc.arguments for d in deltas for tc in d.tool_calls if tc.id is None]
    assert "".join(frags[:-1]) == '{"days": 2, "city": "Par'  # what the stream had sent before the end
    # ds4f closes the JSON at finish so stream and non-stream agree (vLLM non-stream would report {})
    assert args_of(text, thinking=False, tools=[WEATHER]) == [("get_weather", {"days": 2, "city": "Par"})]
    # a call whose name never closed is not reported
    assert check_all_splits(f'{TS}\n<{D}invoke name="get_wea', thinking=False) == (None, None, [])


# --- fuzz -----------------------------------------------------------------------------------------------------------
_ATOMS = [
    "<think>", "</think>", TS, TE, f"<{D}invoke name=\"", '">', IE, f"<{D}parameter", f"</{D}parameter>",
    ' name="a"', ' name="b"', ' string="true"', ' string="false"', ">", "<", "</", D, "x", " ", "\n", '"', "1",
    "{", "[", "]", "}", "é", EOS, "true", "null", ' name="arguments"', '{"a": "1"}',
]  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(_ATOMS), max_size=30),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    st.booleans(),
    st.sampled_from([None, [tool("a", {"a": {"type": "integer"}, "b": {"type": "string"}})]]),
)
def test_fuzz_never_raises_and_split_equals_whole(atoms: list[str], cuts: list[int], thinking: bool, tools) -> None:
    text = "".join(atoms)
    whole = parse_output(text, thinking=thinking, tools=tools, id_factory=ids())
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
    assert run(pieces, thinking=thinking, tools=tools)[:3] == (whole.reasoning, whole.content, whole.tool_calls)
    assert run(list(text), thinking=thinking, tools=tools)[:3] == (whole.reasoning, whole.content, whole.tool_calls)
    for call in whole.tool_calls:
        assert isinstance(json.loads(call["function"]["arguments"]), dict)


# --- encoder -> parser round trip -------------------------------------------------------------------------------
_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12).filter(lambda s: "｜" not in s)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False, allow_infinity=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), _JSON, max_size=4), min_size=1, max_size=3)
)
def test_rendered_history_parses_back(calls: list[dict]) -> None:
    """What the encoder renders for a past assistant turn is exactly what the parser returns for that output."""
    from ds4f.chat.encoding import render_chat

    tool_calls = [
        {"id": f"c{i}", "function": {"name": f"f{i}", "arguments": json.dumps(a)}} for i, a in enumerate(calls)
    ]
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": tool_calls}]
    text = render_chat(msgs, reasoning_effort="none").text
    output = text[text.rindex("<｜Assistant｜></think>") + len("<｜Assistant｜></think>") :]
    out = parse_output(output, thinking=False)
    assert (out.reasoning, out.content) == (None, None)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in out.tool_calls] == [
        (f"f{i}", a) for i, a in enumerate(calls)
    ]
