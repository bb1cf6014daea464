"""Constrained-decoding tests: tool_choice required/named -> logits masks whose greedy output parses to valid calls."""

from __future__ import annotations

import json

import pytest
import torch

from ds4f.chat.constrain import OPEN, build_tool_call_processor
from ds4f.chat.parser import parse_output
from ds4f.tokenizer import Tokenizer, load_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "note": {"type": ["string", "null"]},
            },
            "required": ["city", "days"],
        },
    },
}
NOOP = {"type": "function", "function": {"name": "noop"}}
GET = {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, NOOP, GET]


@pytest.fixture(scope="module")
def tok():
    # one intra-op thread: on a loaded 2-core box, multi-threaded 129k-element ops are several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_tokenizer()
    torch.set_num_threads(threads)


def greedy(tok: Tokenizer, proc, seed: int, max_steps: int = 600) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        logits = proc(ids, torch.randn(tok.vocab_size, generator=g))
        ids.append(int(torch.argmax(logits)))
        assert torch.isfinite(logits[ids[-1]])  # some token is always allowed
        if ids[-1] == tok.eos_token_id:
            break
    return ids


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("thinking", [False, True])
def test_greedy_random_logits_yield_valid_calls(tok: Tokenizer, seed: int, thinking: bool) -> None:
    parallel = seed % 2 == 0
    choice = "required" if seed < 4 else {"type": "function", "function": {"name": "get_weather"}}
    allowed = {"get_weather"} if isinstance(choice, dict) else {"get_weather", "noop", "get"}
    proc = build_tool_call_processor(
        tok, TOOLS, choice, parallel_tool_calls=parallel, thinking=thinking, max_free_tokens=3
    )
    ids = greedy(tok, proc, seed)
    assert ids[-1] == tok.eos_token_id
    text = tok.decode(ids[:-1])
    out = parse_output(text, thinking=thinking, tools=TOOLS)
    assert out.content is None
    assert (out.reasoning is not None) == (thinking and not text.startswith("</think>"))
    assert len(out.tool_calls) >= 1 and (parallel or len(out.tool_calls) == 1)
    for call in out.tool_calls:
        name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
        assert name in allowed
        if name == "get_weather":
            assert {"city", "days"} <= set(args) <= {"city", "days", "note"}
        else:
            assert args == {}


def test_forced_state_matches_brute_force(tok: Tokenizer) -> None:
    proc = build_tool_call_processor(tok, TOOLS, "required")
    logits = proc([], torch.zeros(tok.vocab_size))
    got = set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())
    names = [b'get_weather">\n', b'noop">\n', b'get">\n']
    special = set(tok.all_special_ids)
    want = set()
    for i, b in enumerate(tok.all_token_bytes()):
        if not b or i in special:
            continue
        if OPEN.startswith(b) or (b.startswith(OPEN) and any(n.startswith(b[len(OPEN) :]) for n in names)):
            want.add(i)
    assert got == want and tok.encode("\n\n")[0] in got


def test_free_segment_bans_markers_not_text(tok: Tokenizer) -> None:
    proc = build_tool_call_processor(tok, [WEATHER], "required", thinking=True)
    logits = proc(tok.encode("Let me think"), torch.zeros(tok.vocab_size))
    ok = torch.isfinite(logits)
    dsml, think_end, eos = 128825, 128822, tok.eos_token_id
    assert not ok[dsml] and not ok[eos] and not ok[tok.bos_token_id]
    assert ok[think_end] and ok[tok.encode(" about")[0]] and ok[tok.encode("<")[0]]
    assert int(ok.sum()) > tok.vocab_size - 3000
    # after </think> the block is forced: "\n\n" is allowed, text is not
    logits = proc([*tok.encode("Let me think"), think_end], torch.zeros(tok.vocab_size))
    ok = torch.isfinite(logits)
    assert ok[tok.encode("\n\n")[0]] and not ok[tok.encode(" about")[0]] and int(ok.sum()) < 20


def test_rollback_and_outside_grammar(tok: Tokenizer) -> None:
    proc = build_tool_call_processor(tok, [WEATHER], "required", thinking=True)
    fresh = build_tool_call_processor(tok, [WEATHER], "required", thinking=True)
    base = tok.encode("abc") + [128822]
    x = torch.randn(tok.vocab_size)
    proc(base + tok.encode("\n\nxyz"), x)  # a rejected speculative continuation
    assert torch.equal(proc(base, x), fresh(base, x))
    # a prefix outside the grammar (a step that was not constrained) -> no masking rather than a dead end
    assert torch.equal(proc(tok.encode("</think>hello"), x), x)
    # after EOS nothing is masked
    done = tok.encode('</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n')
    assert not torch.isfinite(proc(done, x)[tok.eos_token_id])


def test_build_rules(tok: Tokenizer) -> None:
    assert build_tool_call_processor(tok, TOOLS, "auto") is None
    assert build_tool_call_processor(tok, TOOLS, "none") is None
    assert build_tool_call_processor(tok, TOOLS, None) is None
    with pytest.raises(ValueError, match="nope"):
        build_tool_call_processor(tok, TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="at least one"):
        build_tool_call_processor(tok, [], "required")


INVOKE = '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'


@pytest.mark.parametrize(
    "prefix",
    [
        "Let me think",  # free reasoning, nothing pending
        "x｜DS </thi",  # free reasoning, a partial </think> pending
        INVOKE + '<｜DSML｜parameter name="city" string="true">a</｜DS',  # a value, its close tag pending
        INVOKE + '<｜DSML｜parameter name="city" string="true">a｜DS',  # a value, a partial forbidden marker
        INVOKE + '<｜DSML｜parameter name="ci',  # forced: parameter names
        '</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="',  # forced: tool names
    ],
)
def test_fast_mask_equals_exhaustive_scan(tok: Tokenizer, prefix: str) -> None:
    """The candidate shortcuts (by first byte / pattern bytes) agree with checking every token of the vocabulary."""
    proc = build_tool_call_processor(tok, TOOLS, "required", thinking=True)
    ids = tok.encode(prefix)
    state = proc.state_for(ids)
    assert state is not None
    logits = proc(ids, torch.zeros(tok.vocab_size))
    got = torch.isfinite(logits).nonzero().flatten().tolist()
    want = [i for i in range(tok.vocab_size) if proc._step(state, i) is not None]
    assert got == want
