"""③ scheduler: waiting/running Requests in, one SchedulerOutput per step out (CPU bookkeeping, no torch.cuda)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from ds4f.cache.manager import KVCacheManager
from ds4f.engine.outputs import AHEAD, RunnerOutput, ScheduledSeq, SchedulerOutput
from ds4f.engine.request import QueueFullError, Request, RequestStatus


class Scheduler:
    """NOTE: there is no prefill or decode phase. Each request has num_computed_tokens and num_tokens; a step gives
    each scheduled request a chunk that moves the first toward the second, within one token budget. Decodes go first,
    then running prefill chunks, then new requests, each group first come first served. When blocks run out, the
    latest-arrived running request is preempted (cache freed, recomputed later from its prompt + outputs so far)."""

    def __init__(self, manager: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_waiting: int | None = None) -> None:
        self.manager = manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []

    # ---- requests in / out ----
    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens < 1:
            raise ValueError("the prompt is empty; give at least one token")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens but max_model_len is {self.max_model_len}: "
                             "prompt + at least one generated token must fit")

    def add_request(self, req: Request) -> None:
        self.check_prompt(req.num_prompt_tokens)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting} requests)")
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish a running or waiting request now and free its cache at once (also how abort works)."""
        if req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.manager.free(req.request_id)
        req.status, req.finish_reason, req.stop_reason = RequestStatus.FINISHED, reason, stop_reason
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)

    def abort(self, req_ids: Iterable[str]) -> list[Request]:
        out = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.finish(req, "abort")
                out.append(req)
        return out

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.manager.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _seq(self, req: Request, n: int) -> ScheduledSeq:
        lo = req.num_computed_tokens
        return ScheduledSeq(
            req_id=req.request_id, token_ids=req.token_ids(lo, lo + n), start_pos=lo,
            block_table=list(self.manager.block_table(req.request_id)), slot=self.manager.slot(req.request_id),
            sample=lo + n == req.num_tokens, params=req.params, prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids, generator=req.generator)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: dict[str, ScheduledSeq] = {}
        preempted: list[str] = []
        # decodes first, then running prefill chunks; FCFS inside each group
        order = sorted(self.running, key=lambda r: (r.num_tokens - r.num_computed_tokens > 1, r.arrival))
        for req in order:
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.manager.allocate(req.request_id, req.num_computed_tokens + n):
                victim = max(self.running, key=lambda r: r.arrival)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim.request_id in scheduled:
                    budget += len(scheduled.pop(victim.request_id).token_ids)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                scheduled[req.request_id] = self._seq(req, n)
                budget -= n
        # new (and preempted) requests, FCFS; none admitted in a step that had to preempt
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.manager.allocate(req.request_id, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = self._seq(req, n)
            budget -= n
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(seqs=list(scheduled.values()), num_batched_tokens=self.max_num_batched_tokens - budget,
                               preempted_req_ids=preempted, finished_req_ids=finished)

    def schedule_ahead(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """--async-scheduling: the step after `prev` while prev's tokens are still on the device, or None when it
        cannot be known yet. Only for a pure-decode prev whose sequences are every running request, no waiting
        request admissible (schedule() admits none while max_num_seqs run), each request able to go on (not at
        max_tokens / max_model_len; no logprobs, penalties, logits processors or min_tokens to reach, which read the
        tokens) and a block for its next position without preempting: then the same sequences in the same order, one
        position further, each with one AHEAD token. A request that prev finishes (EOS, a stop string) still runs
        this step (update_from_output skips it); a request waiting for its slot is admitted one step later."""
        if (self.waiting and len(self.running) < self.max_num_seqs) or len(prev.seqs) != len(self.running) \
                or not prev.seqs:
            return None
        seqs = []
        for s in prev.seqs:
            req = self.requests.get(s.req_id)
            if req is None or req.status is not RequestStatus.RUNNING or len(s.token_ids) != 1 or not s.sample \
                    or s.start_pos + 1 != req.num_tokens or not _ahead_ok(req, self.max_model_len):
                return None
            if not self.manager.allocate(req.request_id, s.start_pos + 2):
                return None  # blocks already taken for the others are theirs for the next step anyway
            seqs.append(ScheduledSeq(
                req_id=req.request_id, token_ids=[AHEAD], start_pos=s.start_pos + 1,
                block_table=list(self.manager.block_table(req.request_id)), slot=s.slot, sample=True,
                params=req.params, prompt_token_ids=req.prompt_token_ids, output_token_ids=req.output_token_ids,
                generator=req.generator))
        return SchedulerOutput(seqs=seqs, num_batched_tokens=len(seqs))

    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> list[tuple[Request, int, int]]:
        """Advance num_computed_tokens and append sampled tokens -> [(request, token_id, index into result)]."""
        sampled = {rid: i for i, rid in enumerate(result.req_ids)}
        new = []
        for seq in out.seqs:
            req = self.requests.get(seq.req_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # finished or preempted meanwhile
            req.num_computed_tokens += len(seq.token_ids)
            i = sampled.get(seq.req_id)
            if i is not None:
                tok = result.token_ids[i]
                req.output_token_ids.append(tok)
                new.append((req, tok, i))
        return new


def _ahead_ok(req: Request, max_model_len: int) -> bool:
    """req may run a step before its last token is known: it has room for two more tokens, and nothing in its
    sampling reads its output tokens or returns logprobs."""
    p = req.params
    n_out = len(req.output_token_ids) + 1  # prev's token, not appended yet
    if p.max_tokens is not None and n_out + 1 > p.max_tokens or req.num_tokens + 2 > max_model_len:
        return False
    return (p.logprobs is None and not p.logits_processors and p.min_tokens <= n_out - 1  # met before prev's token
            and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty)
