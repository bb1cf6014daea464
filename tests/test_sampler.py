"""Sampler: hand-computed keep-sets and penalties on a 6-token vocab, sampling frequencies, seeding, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from ds4f.sample.params import SamplingParams
from ds4f.sample.sampler import Sampler, SamplingRequest, make_generator

INF = float("inf")
# softmax(LOGITS) == PROBS exactly up to fp32 rounding
PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def req(params: SamplingParams | None = None, prompt: list[int] | None = None, out: list[int] | None = None,
        gen: torch.Generator | None = None) -> SamplingRequest:
    return SamplingRequest(params or SamplingParams(), prompt or [], out or [], gen)


def kept(**kw: object) -> set[int]:
    warped = Sampler.warp(LOGITS[None].clone(), [req(SamplingParams(**kw))])[0]
    return {i for i in range(6) if warped[i] > -INF}


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, {0, 1, 2, 3, 4, 5}),
    ({"top_k": 2}, {0, 1}),
    ({"top_k": -1}, {0, 1, 2, 3, 4, 5}),
    ({"top_k": 6}, {0, 1, 2, 3, 4, 5}),
    # ascending cumsum 0.04 .10 .20 .35 .60 1.0; drop where <= 1 - top_p
    ({"top_p": 0.7}, {0, 1, 2}),
    ({"top_p": 0.5}, {0, 1}),
    ({"top_p": 0.3}, {0}),
    # min_p keeps p >= min_p * 0.4
    ({"min_p": 0.3}, {0, 1, 2}),
    ({"min_p": 0.5}, {0, 1}),
    ({"min_p": 0.05}, {0, 1, 2, 3, 4, 5}),
    ({"min_p": 0.7}, {0}),
    # min_p runs after temperature: T=2 gives p ~ sqrt(PROBS), floor 0.7 * sqrt(0.4) = 0.443
    ({"min_p": 0.7, "temperature": 2.0}, {0, 1}),
    # top_p runs on the min_p/top_k survivors renormalized (0.5, 0.3125, 0.1875): cumsum .1875 .5 1 -> drop token 2
    ({"min_p": 0.3, "top_p": 0.7}, {0, 1}),
    ({"top_k": 3, "top_p": 0.7}, {0, 1}),
    ({"top_k": 4, "min_p": 0.5}, {0, 1}),
])
def test_keep_sets(kw: dict, expected: set[int]) -> None:
    assert kept(**kw) == expected


def test_top_k_keeps_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    warped = Sampler.warp(logits, [req(SamplingParams(top_k=2))])[0]
    assert (warped > -INF).tolist() == [False, True, True, True, False]


def test_warp_rows_are_independent() -> None:
    ps = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(top_p=0.5, temperature=0.5)]
    warped = Sampler.warp(LOGITS.repeat(3, 1), [req(p) for p in ps])
    for row, p in zip(warped, ps):
        assert torch.equal(row, Sampler.warp(LOGITS[None].clone(), [req(p)])[0])
    # T=0.5 squares the probabilities (0.615 for token 0), so top_p=0.5 keeps token 0 alone
    assert torch.allclose(warped[1], LOGITS) and torch.allclose(warped[2, 0], LOGITS[0] / 0.5)
    assert (warped[2] > -INF).tolist() == [True] + [False] * 5


def frequencies(params: SamplingParams, n: int = 4000, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    out = Sampler()(LOGITS.repeat(n, 1), [req(params) for _ in range(n)])
    return [out.token_ids.count(i) / n for i in range(6)]


def renorm(ws: list[float]) -> list[float]:
    return [w / sum(ws) for w in ws]


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, PROBS),
    ({"temperature": 0.5}, renorm([p * p for p in PROBS])),
    ({"top_k": 2}, renorm(PROBS[:2] + [0] * 4)),
    ({"top_p": 0.7}, renorm(PROBS[:3] + [0] * 3)),
    ({"min_p": 0.7, "temperature": 2.0}, renorm([math.sqrt(p) for p in PROBS[:2]] + [0] * 4)),
])
def test_sampling_frequencies(kw: dict, expected: list[float]) -> None:
    freq = frequencies(SamplingParams(**kw))
    for f, e in zip(freq, expected):
        assert abs(f - e) < 0.03, (freq, expected)  # ~4 sigma at n=4000
        assert (f == 0) == (e == 0)


def test_greedy_is_argmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 1000)
    out = Sampler()(logits.clone(), [req(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs is None
    # greedy rows of a mixed batch are untouched by the random rows
    mixed = [req(SamplingParams(temperature=0.0 if i % 2 else 1.0)) for i in range(5)]
    got = Sampler()(logits.clone(), mixed).token_ids
    assert [got[i] for i in (1, 3)] == [logits[i].argmax().item() for i in (1, 3)]


def test_greedy_rows_same_alone_or_batched() -> None:
    # a batch of plain greedy rows takes only the argmax; one row needing process() sends the batch the long way:
    # every row's token must not depend on which path its batch took
    torch.manual_seed(2)
    logits = torch.randn(5, 50)
    logits[:, 7] += 4.0  # token 7 (the eos below) wins unless masked
    ps = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logits_processors=[]),
          SamplingParams(temperature=0.0, min_tokens=3), SamplingParams(temperature=0.0, repetition_penalty=1.5),
          SamplingParams(temperature=0.0, min_tokens=1)]
    rs = [req(p, [7, 3], [7]) for p in ps]
    s = Sampler(eos_token_id=7)
    alone = [s(logits[i: i + 1].clone(), [r]).token_ids[0] for i, r in enumerate(rs)]
    assert alone[0] == alone[1] == alone[4] == 7 and alone[2] != 7  # min_tokens 3 > 1 output: eos masked
    assert s(logits.clone(), rs).token_ids == alone
    assert s(logits[[0, 1, 4]].clone(), [rs[0], rs[1], rs[4]]).token_ids == [7, 7, 7]


def test_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.0]] * 5)
    prompt, out = [0, 1], [2, 2, 3]
    reqs = [req(SamplingParams(repetition_penalty=2.0), prompt, out),
            req(SamplingParams(frequency_penalty=0.5), prompt, out),
            req(SamplingParams(), prompt, out),
            req(SamplingParams(presence_penalty=0.25), prompt, out),
            req(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), prompt, out)]
    Sampler().process(logits, reqs)
    expected = torch.tensor([
        [1.0, -2.0, 0.25, -1.0, 1.0, 0.0],  # seen in prompt or output: positive / 2, negative * 2
        [2.0, -1.0, -0.5, -1.0, 1.0, 0.0],  # output counts 2 and 1
        [2.0, -1.0, 0.5, -0.5, 1.0, 0.0],  # no penalties: untouched
        [2.0, -1.0, 0.25, -0.75, 1.0, 0.0],  # output tokens only, not the prompt
        [1.0, -2.0, -1.0, -1.75, 1.0, 0.0],
    ])
    assert torch.allclose(logits, expected)


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    assert Sampler()(logits.clone(), [req(SamplingParams(temperature=0))]).token_ids == [0]
    assert Sampler()(logits.clone(), [req(SamplingParams(temperature=0, repetition_penalty=1.2), [0])]).token_ids == [1]
    assert Sampler()(logits.clone(), [req(SamplingParams(temperature=0, presence_penalty=0.2), [], [0])]).token_ids \
        == [1]


def test_allowed_token_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    reqs = [req(SamplingParams(temperature=0, allowed_token_ids=[3, 4])), req(SamplingParams(temperature=0)),
            req(SamplingParams(allowed_token_ids=[2, 5]))]
    for seed in range(20):
        torch.manual_seed(seed)
        a, b, c = Sampler()(logits.clone(), reqs).token_ids
        assert (a, b) == (3, 0) and c in (2, 5)


def test_logits_processors_see_output_ids() -> None:
    seen: list[list[int]] = []

    def boost_next(out: list[int], row: torch.Tensor) -> torch.Tensor:
        seen.append(out)
        row[out[-1] + 1] += 100
        return row

    r = req(SamplingParams(temperature=0, logits_processors=[boost_next]), [0], [1, 3])
    assert Sampler()(torch.zeros(2, 6), [r, req(SamplingParams(temperature=0))]).token_ids == [4, 0]
    assert seen == [[1, 3]]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_eos_and_stop_ids(ignore_eos: bool) -> None:
    eos = 1
    logits = torch.tensor([[3.0, 4.0, 1.0, 2.0, 0.0, 0.0]])
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[0], ignore_eos=ignore_eos)
    s = Sampler(eos_token_id=eos)
    assert s(logits.clone(), [req(p, [5], [])]).token_ids == [3]  # eos (1) and stop id (0) masked
    assert s(logits.clone(), [req(p, [5], [4])]).token_ids == [3]
    assert s(logits.clone(), [req(p, [5], [4, 4])]).token_ids == [eos]  # min_tokens reached


def test_seeded_reproducible_whatever_the_batch() -> None:
    torch.manual_seed(3)
    V, steps = 1000, 6
    mine = torch.randn(steps, V)
    p = SamplingParams(seed=1234, top_p=0.95)

    def run(position: int, others: list[SamplingParams]) -> list[int]:
        gen = make_generator(p.seed)
        got = []
        for t in range(steps):
            reqs = [req(q, gen=make_generator(q.seed)) for q in others]
            reqs.insert(position, req(p, gen=gen))
            logits = torch.randn(len(reqs), V) * 3
            logits[position] = mine[t]
            got.append(Sampler()(logits, reqs).token_ids[position])
        return got

    alone = run(0, [])
    assert run(2, [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=5, seed=9)]) == alone
    assert run(1, [SamplingParams(temperature=0.3, min_p=0.1), SamplingParams(seed=7), SamplingParams()]) == alone
    # a different seed gives a different stream on a flat distribution
    flat = [Sampler()(torch.zeros(1, V), [req(SamplingParams(seed=s), gen=make_generator(s))]).token_ids[0]
            for s in (1, 2, 3, 4)]
    assert len(set(flat)) > 1


def test_logprobs_raw_values_and_ranks() -> None:
    torch.manual_seed(5)
    raw = torch.randn(3, 50)
    reqs = [req(SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.5), [1, 2], [3]),
            req(SamplingParams()),
            req(SamplingParams(logprobs=0, temperature=0))]
    out = Sampler()(raw.clone(), reqs)
    ref = torch.log_softmax(raw, -1)
    assert out.logprobs is not None and out.logprobs[1] is None
    e0, e2 = out.logprobs[0], out.logprobs[2]
    assert e0 is not None and e2 is not None
    tok = out.token_ids[0]
    top3 = ref[0].topk(3).indices.tolist()
    assert list(e0)[0] == tok and set(e0) == {tok, *top3}
    for r, t in enumerate(top3):
        assert e0[t].rank == r + 1 and e0[t].logprob == pytest.approx(ref[0, t].item(), abs=1e-6)
    assert e0[tok].rank == int((ref[0] > ref[0, tok]).sum()) + 1
    assert e0[tok].logprob == pytest.approx(ref[0, tok].item(), abs=1e-6)
    assert e0[tok].decoded_token is None
    # logprobs=0: only the sampled token; greedy -> rank 1
    assert list(e2) == [out.token_ids[2]] and e2[out.token_ids[2]].rank == 1
    assert e2[out.token_ids[2]].logprob == pytest.approx(ref[2].max().item(), abs=1e-6)


def test_logprobs_ignore_allowed_mask() -> None:
    # raw_logprobs: the model's distribution, before allowed_token_ids / penalties
    raw = torch.tensor([[4.0, 0.0, 1.0]])
    out = Sampler()(raw.clone(), [req(SamplingParams(temperature=0, allowed_token_ids=[2], logprobs=1))])
    assert out.token_ids == [2] and out.logprobs is not None and out.logprobs[0] is not None
    e = out.logprobs[0]
    assert e[2].rank == 2 and e[0].rank == 1
    assert e[2].logprob == pytest.approx(torch.log_softmax(raw, -1)[0, 2].item(), abs=1e-6)


def test_two_stage_argmax_is_torch_argmax() -> None:
    """sampler.argmax's pieces (forced on CPU): the first maximal index, ties within and across pieces included."""
    from ds4f.sample.sampler import argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1280, generator=g)
    x[1, [3, 700, 1279]] = 9.0  # ties across pieces: the first wins
    x[2, [700, 701]] = 9.0  # a tie inside one piece
    x[3] = float("-inf")
    x[3, 1000] = -1e30
    x[4] = 1.0  # all equal: index 0
    x[5, 1279] = 50.0  # the last column
    for chunks in (128, 64, 10, 1):
        assert torch.equal(argmax(x, chunks), x.argmax(-1)), chunks
    assert argmax(x).tolist() == x.argmax(-1).tolist()  # CPU: torch's own
    with pytest.raises(RuntimeError):
        argmax(x, 7)  # must divide V
