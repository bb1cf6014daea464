"""SamplingParams: vLLM defaults, normalization and the ValueError for every out-of-range field."""

from __future__ import annotations

import pytest

from ds4f.sample.params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and p.spaces_between_special_tokens and not p.include_stop_str_in_output
    assert p.output_kind == "cumulative" and not p.ignore_eos and not p.greedy


def test_normalization() -> None:
    p = SamplingParams(stop="###", stop_token_ids=[5, 3, 5], seed=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 3] and p.seed is None
    assert SamplingParams(stop=["a", "bc"]).stop == ["a", "bc"]
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_greedy_threshold_and_clamp() -> None:
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.3)
    assert g.greedy and (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    # vLLM raises 0 < t < 0.01 to 0.01 before the greedy test, so only t == 0 is greedy
    small = SamplingParams(temperature=1e-6, top_k=7)
    assert small.temperature == 0.01 and not small.greedy and small.top_k == 7
    assert SamplingParams(temperature=0.5).temperature == 0.5


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n": 2}, "n"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.1}, "presence_penalty"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"frequency_penalty": 3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # > max_tokens=16
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"output_kind": "final_only"}, "output_kind"),
    ({"logits_processors": [3]}, "logits_processors"),
    ({"seed": 1.5}, "seed"),
])
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**kwargs)


def test_boundaries_accepted() -> None:
    SamplingParams(temperature=2.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
                   repetition_penalty=0.01, logprobs=20, min_tokens=16, max_tokens=16)
    SamplingParams(logprobs=0, min_tokens=5, max_tokens=None)


def test_verify_vocab() -> None:
    SamplingParams(allowed_token_ids=[0, 9], stop_token_ids=[9]).verify(vocab_size=10)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[10]).verify(vocab_size=10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[12]).verify(vocab_size=10)
