"""StopChecker: EOS / stop ids / length / stop strings over a toy tokenizer whose token texts are chosen by hand."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from ds4f.engine.detokenize import IncrementalDetokenizer
from ds4f.engine.stop import StopChecker
from ds4f.sample.params import SamplingParams

PIECES = ["<eos>", "Hel", "lo", " wor", "ld", "#", "##", "END", "x", "<stop>", "a##bEND"]
EOS, HEL, LO, WOR, LD, H1, H2, END, X, STOP, MULTI = range(len(PIECES))


class ToyTokenizer:
    all_special_ids = [EOS, STOP]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids))


def generate(tokens: list[int], *, max_model_len: int | None = None, prompt_len: int = 0,
             **kw: object) -> tuple[StopChecker, str, int, list[str]]:
    """Feed tokens until finished -> (checker, output text, tokens consumed, the stream of visible texts)."""
    params = SamplingParams(**{"max_tokens": None, **kw})  # type: ignore[arg-type]
    sc = StopChecker(params, EOS, max_model_len=max_model_len, prompt_len=prompt_len)
    d = IncrementalDetokenizer(ToyTokenizer(), skip_special_tokens=params.skip_special_tokens)
    stream = []
    n = 0
    for t in tokens:
        n += 1
        sc.step(t, d)
        stream.append(sc.output_text(d.text))
        if sc.finished:
            break
    return sc, sc.output_text(d.text), n, stream


def test_stop_string_across_tokens() -> None:
    sc, text, n, _ = generate([HEL, LO, WOR, LD], stop="lo w")
    assert (sc.finish_reason, sc.stop_reason, text, n) == ("stop", "lo w", "Hel", 3)
    sc, text, _, _ = generate([HEL, LO, WOR, LD], stop="lo w", include_stop_str_in_output=True)
    assert (sc.stop_reason, text) == ("lo w", "Hello w")
    sc, text, _, _ = generate([HEL, LO, WOR], stop="wor", include_stop_str_in_output=True)
    assert text == "Hello wor"


def test_earliest_stop_string_wins() -> None:
    sc, text, _, _ = generate([X, MULTI], stop=["END", "##"])
    assert (sc.stop_reason, text) == ("##", "xa")


def test_hold_back_partial_stop_string() -> None:
    sc, text, _, stream = generate([X, H1, H1, X, H2, H1], stop="###")
    assert stream == ["x", "x", "x", "x##x", "x##x", "x##x"]
    assert (sc.stop_reason, text) == ("###", "x##x")
    # include_stop_str_in_output: nothing is held back (vLLM stop_buffer_length = 0)
    _, text, _, stream = generate([X, H1, H1, H1], stop="###", include_stop_str_in_output=True)
    assert stream == ["x", "x#", "x##", "x###"] and text == "x###"
    # a tail that can no longer become a stop string is released; length finish releases everything
    _, text, _, stream = generate([X, H1, H1], stop="##!", max_tokens=3)
    assert stream == ["x", "x", "x##"] and text == "x##"


def test_eos_and_ignore_eos() -> None:
    sc, text, n, _ = generate([HEL, EOS, LO])
    assert (sc.finish_reason, sc.stop_reason, text, n, sc.render_token) == ("stop", None, "Hel", 2, False)
    sc, text, n, _ = generate([HEL, EOS, LO], ignore_eos=True, max_tokens=3)
    assert (sc.finish_reason, text, n) == ("length", "Hello", 3)
    sc, text, n, _ = generate([HEL, EOS, LO], ignore_eos=True, skip_special_tokens=False, max_tokens=3)
    assert text == "Hel<eos>lo"


def test_min_tokens_delays_eos_and_stop_ids() -> None:
    sc, _, n, _ = generate([HEL, EOS, EOS, LO], min_tokens=3)
    assert (sc.finish_reason, n) == ("stop", 3)
    sc, text, n, _ = generate([STOP, LO, STOP], min_tokens=2, stop_token_ids=[STOP])
    assert (sc.finish_reason, sc.stop_reason, n, text) == ("stop", STOP, 3, "lo")


def test_stop_token_ids_text() -> None:
    sc, text, n, _ = generate([HEL, STOP, LO], stop_token_ids=[STOP])
    assert (sc.finish_reason, sc.stop_reason, n, text) == ("stop", STOP, 2, "Hel")
    _, text, _, _ = generate([HEL, STOP], stop_token_ids=[STOP], include_stop_str_in_output=True,
                             skip_special_tokens=False)
    assert text == "Hel<stop>"


def test_length_limits() -> None:
    sc, text, n, _ = generate([HEL, LO, WOR, LD], max_tokens=3)
    assert (sc.finish_reason, sc.stop_reason, n, text) == ("length", None, 3, "Hello wor")
    sc, _, n, _ = generate([HEL, LO, EOS, LD], max_tokens=3)
    assert (sc.finish_reason, n) == ("stop", 3)  # EOS is checked before length
    assert generate([HEL] * 9, max_model_len=10, prompt_len=7)[2] == 3
    assert generate([HEL] * 9, max_tokens=5, max_model_len=10, prompt_len=7)[2] == 3
    assert generate([HEL] * 9, max_tokens=2, max_model_len=10, prompt_len=7)[2] == 2
    # a stop string completed by the last allowed token reports stop
    sc, text, _, _ = generate([HEL, LO, WOR], max_tokens=3, stop="o w")
    assert (sc.finish_reason, sc.stop_reason, text) == ("stop", "o w", "Hell")


def test_stop_strings_at_one_position() -> None:
    # two stop strings found at the same place in one token's text: the shorter one (hypothesis found this case)
    for stops in (["##", "#"], ["#", "##"]):
        sc, text, _, _ = generate([H2], stop=stops, include_stop_str_in_output=True)
        assert (sc.stop_reason, text) == ("#", "#"), stops


def test_min_tokens_and_stop_strings() -> None:
    # "lo" lies wholly inside the first two tokens' text: ignored; "o w" straddles the boundary: found
    sc, _, n, _ = generate([HEL, LO, WOR, LD], stop="lo", min_tokens=2, max_tokens=4)
    assert (sc.finish_reason, n) == ("length", 4)
    sc, text, n, _ = generate([HEL, LO, WOR, LD], stop="o w", min_tokens=2)
    assert (sc.stop_reason, text, n) == ("o w", "Hell", 3)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from([H1, H2, X, END, LO, MULTI]), min_size=1, max_size=15),
       stops=st.lists(st.text(alphabet="#xE", min_size=1, max_size=4), min_size=1, max_size=3),
       include=st.booleans())
def test_stream_matches_oracle(tokens: list[int], stops: list[str], include: bool) -> None:
    sc, text, n, stream = generate(tokens, stop=stops, include_stop_str_in_output=include, max_tokens=len(tokens))
    # oracle: stop at the first prefix of the token stream whose text holds a stop string, cut at its earliest one
    full = ""
    expected, expected_n = None, len(tokens)
    for i, t in enumerate(tokens):
        full += PIECES[t]
        hits = [(full.find(s), s) for s in stops if s in full]
        if hits:
            at, s = min(hits)
            expected, expected_n = full[:at + len(s)] if include else full[:at], i + 1
            break
    assert n == expected_n
    if expected is None:
        assert sc.finish_reason == "length" and text == full
    else:
        assert sc.finish_reason == "stop" and text == expected
    # streaming never retracts and never shows a stop string the final text lacks
    for a, b in zip(stream, stream[1:]):
        assert b.startswith(a)
    assert all(text.startswith(v) for v in stream)
