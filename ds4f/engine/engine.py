"""③ engine loop: requests in; step() = schedule → runner.execute → update_from_output → RequestOutputs out."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ds4f.cache.manager import KVCacheManager
from ds4f.config import EngineConfig
from ds4f.engine.detokenize import IncrementalDetokenizer
from ds4f.engine.outputs import SchedulerOutput
from ds4f.engine.request import CompletionOutput, Request, RequestOutput
from ds4f.engine.roofline import DecodeRoofline, measure_bandwidth
from ds4f.engine.scheduler import Scheduler
from ds4f.engine.stop import StopChecker
from ds4f.sample.params import SamplingParams
from ds4f.sample.sampler import make_generator


class LLMEngine:
    """Runs in one thread. `runner` is built by the launcher (ds4f.engine.llm.build_engine) and needs only
    `.execute(SchedulerOutput) -> RunnerOutput`, `.device`, `.layout`, `.num_blocks`, `.num_slots`."""

    def __init__(self, config: EngineConfig, runner: Any, tokenizer: Any, model_args: Any, max_model_len: int) -> None:
        self.config, self.runner, self.tokenizer, self.model_args = config, runner, tokenizer, model_args
        self.max_model_len = max_model_len
        self.manager = KVCacheManager(runner.layout, runner.num_blocks, runner.num_slots)
        self.scheduler = Scheduler(self.manager, max_num_seqs=min(config.max_num_seqs, runner.num_slots),
                                   max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len,
                                   max_waiting=config.max_waiting)
        self.eos_token_id = model_args.eos_token_id
        self._ids = itertools.count()
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.check_integrity_each_step = False  # tests turn this on
        # --async-scheduling: a step launched ahead (Scheduler.schedule_ahead) while the one before is collected
        # None (default): on wherever the runner launches ahead, TP included (two H200s, TP=2, full model: 172.4 vs
        # 150.6 tok/s at batch 1, 485.0 vs 441.6 at batch 4)
        can = bool(getattr(runner, "supports_launch", False))
        self.async_scheduling = can and (config.async_scheduling is None or bool(config.async_scheduling))
        if config.async_scheduling and not self.async_scheduling:
            from ds4f.runner.model_runner import log

            log("--async-scheduling: this runner runs each step synchronously (the fast runner, --runner fast, "
                "launches steady decode steps ahead)")
        self._ahead: tuple[SchedulerOutput, Any] | None = None
        self._t_collected: float | None = None
        # weights as the runner reads them: its own `weight_format`, else the compute dtype (dequantized at load)
        layout = runner.layout
        self.roofline = DecodeRoofline(model_args, getattr(runner, "weight_format", config.resolved_dtype),
                                       layout.kv_row_bytes, layout.index_row_bytes,
                                       measure_bandwidth(str(runner.device)))

    # ---- requests ----
    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt: str | None = None) -> Request:
        """Validate (over-long prompt, vocab, full queue raise before anything is queued) and queue a request."""
        params = params if params is not None else SamplingParams()
        ids = [int(t) for t in prompt_token_ids]
        self.scheduler.check_prompt(len(ids))
        vocab = self.model_args.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        params.verify(vocab)
        req = Request(request_id=request_id if request_id is not None else str(next(self._ids)),
                      prompt_token_ids=ids, params=params, prompt=prompt,
                      generator=make_generator(params.seed, self.runner.device))
        req.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens,
                                                 spaces_between_special_tokens=params.spaces_between_special_tokens)
        req.stop_checker = StopChecker(params, self.eos_token_id, max_model_len=self.max_model_len,
                                       prompt_len=len(ids))
        if params.logprobs is not None:
            req.logprobs, req.cumulative_logprob = [], 0.0
        self.scheduler.add_request(req)
        return req

    def abort_request(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        return [self._output(r) for r in self.scheduler.abort(request_ids)]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._ahead is not None

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        if self.async_scheduling:
            return self._step_async()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        t0 = time.perf_counter()
        result = self.runner.execute(sched)
        return self._finish_step(sched, result, time.perf_counter() - t0)

    def _step_async(self) -> list[RequestOutput]:
        """Collect one step, but launch the step after it first when the scheduler can tell it without its tokens
        (steady decode): the host's bookkeeping, the next step's schedule and (TP) its broadcast overlap the GPU."""
        if self._ahead is not None:
            (sched, pending), self._ahead = self._ahead, None
        else:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return []
            t0 = time.perf_counter()
            pending = self.runner.launch(sched)
            self._t_collected = t0
        nxt = self.scheduler.schedule_ahead(sched)
        if nxt is not None:
            self._ahead = (nxt, self.runner.launch(nxt, pending))
        result = self.runner.collect(pending)
        now = time.perf_counter()
        seconds, self._t_collected = now - (self._t_collected or now), now  # a decode step's period
        return self._finish_step(sched, result, seconds)

    def _finish_step(self, sched: SchedulerOutput, result: Any, seconds: float) -> list[RequestOutput]:
        if all(len(s.token_ids) == 1 and s.start_pos >= len(s.prompt_token_ids) for s in sched.seqs):
            self.roofline.observe([s.start_pos for s in sched.seqs], seconds)
        outs = self._update(sched, result)
        self.num_steps += 1
        if self.check_integrity_each_step:
            self.manager.check_integrity()
        return outs

    def _update(self, sched: SchedulerOutput, result: Any) -> list[RequestOutput]:
        for s in sched.seqs:
            req = self.scheduler.requests.get(s.req_id)
            if req is not None and s.start_pos == 0 and req.num_preemptions == 0:  # counted once, not on recompute
                self.prompt_tokens_total += req.num_prompt_tokens
        outs = []
        for req, tok, i in self.scheduler.update_from_output(sched, result):
            self.generation_tokens_total += 1
            if req.logprobs is not None and result.logprobs is not None and result.logprobs[i] is not None:
                entry = result.logprobs[i]
                for tid, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([tid])
                req.logprobs.append(entry)
                req.cumulative_logprob += entry[tok].logprob
            if req.stop_checker.step(tok, req.detokenizer) is not None:
                if req.stop_checker.text_end is None:
                    req.detokenizer.flush()  # finished without a stop string: emit a trailing partial character
                self.scheduler.finish(req, req.stop_checker.finish_reason, req.stop_checker.stop_reason)
            outs.append(self._output(req))
        return outs

    def _output(self, req: Request) -> RequestOutput:
        text = req.stop_checker.output_text(req.detokenizer.text)
        toks, lps = req.output_token_ids, req.logprobs
        if req.params.output_kind == "delta":
            n_tok, n_txt = req.sent_tokens, req.sent_text
            req.sent_tokens, req.sent_text = len(toks), max(len(text), n_txt)
            toks, text = toks[n_tok:], text[n_txt:]
            lps = None if lps is None else lps[n_tok:]
        comp = CompletionOutput(index=0, text=text, token_ids=list(toks), cumulative_logprob=req.cumulative_logprob,
                                logprobs=None if lps is None else list(lps), finish_reason=req.finish_reason,
                                stop_reason=req.stop_reason)
        return RequestOutput(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, outputs=[comp],
                             finished=req.finished, prompt=req.prompt)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
            "kv_usage": self.manager.usage, "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_preemptions": self.scheduler.num_preemptions, "num_steps": self.num_steps,
            "num_blocks": self.manager.blocks.num_blocks, "num_free_blocks": self.manager.blocks.num_free,
            "num_slots": self.manager.slots.num_blocks, **self.roofline.stats(),
        }
