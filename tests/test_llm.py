"""③ offline API: `from ds4f import LLM, SamplingParams` on ds4f-tiny and on a checkpoint directory; text and token
prompts, stop strings cut the text, seeded sampling is reproducible whatever is batched with it."""

from __future__ import annotations

import pytest
import torch
from checkpoints import write_checkpoint

from ds4f import LLM, SamplingParams
from ds4f.model.args import tiny_config


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="ds4f-tiny", device="cpu", dtype="float32", kv_cache_memory=8 << 20, block_size=16,
               max_num_batched_tokens=32)


def test_generate_shapes_and_text(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(["Hello, my name is", "The capital of France is"], greedy)
    assert [o.prompt for o in outs] == ["Hello, my name is", "The capital of France is"]
    tok = llm.get_tokenizer()
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.finish_reason == "length" and len(c.token_ids) == 6
        assert o.prompt_token_ids == tok.encode(o.prompt)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # token-id prompts and a single string give the same greedy tokens
    again = llm.generate([outs[0].prompt_token_ids], greedy)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert llm.generate("Hello, my name is", greedy)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_stop_string_cuts_text(llm: LLM) -> None:
    base = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    text = base.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    out = llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                          stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_in_any_batch(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8, ignore_eos=True)
    alone = llm.generate("Seeded prompt", p)[0].outputs[0].token_ids
    mixed = llm.generate(["Other", "Seeded prompt", "Another one here"],
                         [SamplingParams(temperature=1.0, max_tokens=5), p, SamplingParams(temperature=0.0)])
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate("Seeded prompt", SamplingParams(temperature=1.0, seed=99, max_tokens=8,
                                                              ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_logprobs(llm: LLM) -> None:
    out = llm.generate("Logprobs please", SamplingParams(temperature=0.0, max_tokens=4, logprobs=2,
                                                         ignore_eos=True))[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 4
    tok = llm.get_tokenizer()
    for t, entry in zip(out.token_ids, out.logprobs):
        assert t in entry and entry[t].rank == 1 and 2 <= len(entry) <= 3  # greedy: the sampled token is the top
        assert all(lp.decoded_token == tok.decode([tid]) for tid, lp in entry.items())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_logits_processor_edits_logits_in_place(llm: LLM) -> None:
    def force_five(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[5] = 1e4  # in place, as the server's constrained decoding does
        return logits

    p = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logits_processors=[force_five])
    assert llm.generate("Anything", p)[0].outputs[0].token_ids == [5, 5, 5]


def test_bad_arguments(llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])
    with pytest.raises(TypeError, match="unknown engine option"):
        LLM(model=None, not_a_flag=1)
    with pytest.raises(ValueError, match="--kv-cache-dtype"):
        LLM(model=None, kv_cache_dtype="int4")
    assert not llm.engine.has_unfinished_requests()


def test_checkpoint_dir_generates_like_the_model(tmp_path) -> None:
    path = write_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3, quantized=False)
    llm = LLM(model=str(path), device="cpu", dtype="float32", kv_cache_memory=8 << 20, block_size=16)
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
    # the same weights through the model directly (one full prefill per token) give the same greedy tokens
    from ds4f.model.cache import AttnBatch, DenseCache

    model = llm.engine.runner.model
    ids = [5, 6, 7, 8]
    for _ in range(4):
        n = len(ids)
        with torch.no_grad():
            logits = model.compute_logits(model(torch.tensor(ids), torch.arange(n),
                                                AttnBatch([0, n], [0], DenseCache()))[-1:])
        ids.append(int(logits.argmax()))
    assert out.outputs[0].token_ids == ids[4:]
