"""③ offline API: prompts (text or token ids) + SamplingParams in, finished RequestOutputs (in prompt order) out."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ds4f.config import EngineConfig
from ds4f.engine.engine import LLMEngine
from ds4f.engine.request import RequestOutput
from ds4f.sample.params import SamplingParams


def build_engine(config: EngineConfig, *, model: Any = None, tokenizer: Any = None,
                 sampler: Any = None) -> LLMEngine:
    """The launcher: load the model and tokenizer, build the runner (which sizes the KV cache), hand it to the engine.
    `model` / `tokenizer` / `sampler` override what the config names (tests pass fakes)."""
    if config.tensor_parallel_size > 1:  # rank 0 of a TP group; the other ranks follow (ds4f.distributed)
        from ds4f.distributed.launch import launch_tp

        runner, args, max_model_len = launch_tp(config, model=model, sampler=sampler)
    else:
        from ds4f.distributed.executor import LocalExecutor
        from ds4f.runner.model_runner import build_runner

        local, args, max_model_len = build_runner(config, model=model, sampler=sampler)
        runner = LocalExecutor(local)
    if tokenizer is None:
        from ds4f.model.hub import resolve_model
        from ds4f.tokenizer import load_tokenizer

        path = config.tokenizer
        if path is None and model is None:
            found = resolve_model(config.model).tokenizer_path
            path = None if found is None else str(found)
        tokenizer = load_tokenizer(path)
    return LLMEngine(config, runner, tokenizer, args, max_model_len)


class LLM:
    """`LLM(model=None, **EngineConfig fields)`; model = checkpoint dir, HF repo id in the local cache, or
    None / "ds4f-tiny". Runs the engine loop in the calling thread."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        overrides = {k: kwargs.pop(k) for k in ("_model", "_tokenizer", "_sampler") if k in kwargs}
        self.config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.engine = build_engine(self.config, model=overrides.get("_model"), tokenizer=overrides.get("_tokenizer"),
                                   sampler=overrides.get("_sampler"))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params if sampling_params is not None else SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        tok = self.engine.tokenizer
        ids = []
        for p in prompts:
            ids.append((tok.encode(p), p) if isinstance(p, str) else ([int(t) for t in p], None))
        order: list[str] = []
        try:
            for (token_ids, text), sp in zip(ids, plist):
                if sp.output_kind != "cumulative":  # generate returns whole outputs
                    sp = dataclasses.replace(sp, output_kind="cumulative")
                order.append(self.engine.add_request(token_ids, sp, prompt=text).request_id)
            final: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            self.engine.abort_request(order)
            raise
        return [final[r] for r in order]
