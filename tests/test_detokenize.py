"""IncrementalDetokenizer vs the one-shot decode of the whole id list (DeepSeek's byte-level BPE tokenizer.json)."""

from __future__ import annotations

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st

from ds4f.engine.detokenize import IncrementalDetokenizer
from ds4f.tokenizer import Tokenizer, load_tokenizer

EOS = 1
# tokens cut through multi-byte characters: CJK (3 bytes), emoji (4 bytes), ZWJ sequences, combining marks
ALPHABET = "ab xyz.\n世界你好ありがとう😀👩‍👩‍👧🇯🇵é\u0301Ωß"


@cache
def tok() -> Tokenizer:
    return load_tokenizer()


def run(ids: list[int], skip: bool = True, prompt: list[int] | None = None) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok(), prompt, skip_special_tokens=skip)
    deltas = [d.add(i) for i in ids]
    assert "".join(deltas) == d.text
    return deltas, d.flush()


def test_emoji_split_over_tokens_is_held_back() -> None:
    ids = tok().encode("Hi 😀!")
    pieces = [tok().decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the emoji really is split
    deltas, rest = run(ids)
    assert "".join(deltas) == "Hi 😀!" and rest == ""
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in "".join(d for d in deltas if d)  # emitted whole, in one delta
    assert any(d.endswith("😀") for d in deltas)


def test_special_tokens_skipped_or_kept() -> None:
    ids = tok().encode("ok") + [EOS] + tok().encode("go")
    assert "".join(run(ids, skip=True)[0]) == "okgo"
    assert "".join(run(ids, skip=False)[0]) == "ok<｜end▁of▁sentence｜>go"
    # non-special added tokens (chat markers) are never skipped; byte-level decoding puts no spaces between them
    user, assistant = tok().convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>"])
    for spaces in (True, False):
        d = IncrementalDetokenizer(tok(), skip_special_tokens=True, spaces_between_special_tokens=spaces)
        for i in [user, assistant, *tok().encode("x")]:
            d.add(i)
        assert d.text == "<｜User｜><｜Assistant｜>x"


def test_prompt_is_context_not_output() -> None:
    prompt = tok().encode("The answer is")
    out = tok().encode(" 四十二 🇯🇵")
    deltas, rest = run(out, prompt=[0, *prompt])
    assert "".join(deltas) == " 四十二 🇯🇵" and rest == ""


def test_flush_releases_an_unfinished_character() -> None:
    ids = tok().encode("a😀")
    cut = ids[:-1]  # the emoji's last byte never arrives
    deltas, rest = run(cut)
    assert "".join(deltas) + rest == tok().decode(cut)
    assert rest.endswith("\ufffd") and all("\ufffd" not in d for d in deltas)


def _pieces(draw: st.DrawFn) -> list[int]:
    V = tok().vocab_size
    chunks = draw(st.lists(st.one_of(
        st.text(alphabet=ALPHABET, max_size=10).map(tok().encode),
        st.lists(st.integers(0, V - 1), max_size=3),  # any id: byte fragments, specials, added tokens
        st.just([EOS]),
    ), max_size=10))
    return [i for c in chunks for i in c]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_matches_full_decode(data: st.DataObject, skip: bool) -> None:
    ids = _pieces(data.draw)
    deltas, rest = run(ids, skip=skip)
    full = tok().decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + rest == full
    if "\ufffd" not in full:
        assert rest == "" and all("\ufffd" not in d for d in deltas)


@settings(max_examples=100, deadline=None)
@given(prompt=st.text(alphabet=ALPHABET, max_size=20), out=st.text(alphabet=ALPHABET, max_size=20))
def test_text_only_output_matches_with_prompt(prompt: str, out: str) -> None:
    p_ids, o_ids = tok().encode(prompt), tok().encode(out)
    deltas, rest = run(o_ids, prompt=p_ids)
    assert "".join(deltas) == tok().decode(o_ids) and rest == ""
    assert all("\ufffd" not in d for d in deltas)
