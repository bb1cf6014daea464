"""Sampling stage: last-position logits [B, V] fp32 + per-request params in, one token id (+ raw logprobs) per row out.

Order as vLLM v1 (vllm/v1/sample/sampler.py): raw logprobs are taken first; then allowed_token_ids, logits
processors, min_tokens, penalties; greedy rows take the argmax there; random rows go on through temperature,
min_p, top_k, top_p and an exponential race drawn from each request's own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ds4f.sample.params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class Logprob:
    """One entry of a token's logprobs dict; the engine fills decoded_token after detokenizing."""

    logprob: float
    rank: int | None = None  # 1 = most likely under the raw model distribution
    decoded_token: str | None = None


LogprobsEntry = dict[int, Logprob]  # token id -> Logprob: the sampled token first, then the top-N (N or N+1 keys)


@dataclass
class SamplingRequest:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None  # seeded requests only (make_generator); None: the global generator


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobsEntry | None] | None  # None when no request in the batch asked for logprobs


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator a seeded request keeps for its whole life (it must survive preemption)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Pinned + non_blocking: a pageable host->device copy would wait for the GPU queue (a hidden sync).
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without indexing by a Python list (that copies the index from pageable memory). All rows: x itself."""
    return x if len(rows) == x.shape[0] else x.index_select(0, _tensor(rows, torch.int64, x.device))


def _put(x: torch.Tensor, rows: list[int], src: torch.Tensor) -> None:
    if len(rows) == x.shape[0]:
        if src is not x:
            x.copy_(src)
    else:
        x.index_copy_(0, _tensor(rows, torch.int64, x.device), src)


def _padded(rows: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return _tensor([list(r) + [pad] * (width - len(r)) for r in rows], torch.int64, device)


class Sampler:
    """Stateless apart from eos_token_id (masked, with stop_token_ids, while a request is below min_tokens)."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> SamplerOutput:
        """logits [B, V] float32 is overwritten. One host sync (the final .tolist())."""
        assert logits.dim() == 2 and logits.shape[0] == len(reqs), (logits.shape, len(reqs))
        assert logits.dtype == torch.float32, logits.dtype
        lp_rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        raw_logprobs = _take(logits, lp_rows).log_softmax(-1) if lp_rows else None  # vLLM "raw_logprobs"
        sampled = self.tokens(logits, reqs)
        token_ids: list[int] = sampled.tolist()

        if raw_logprobs is None:
            return SamplerOutput(token_ids, None)
        entries: list[LogprobsEntry | None] = [None] * len(reqs)
        nums = [reqs[i].params.logprobs or 0 for i in lp_rows]
        for i, entry in zip(lp_rows, _gather_logprobs(raw_logprobs, _take(sampled, lp_rows), nums)):
            entries[i] = entry
        return SamplerOutput(token_ids, entries)

    def tokens(self, logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> torch.Tensor:
        """The sampled ids [B] int64 on logits' device, no host sync (no logprobs: __call__ takes those); logits
        [B, V] float32 is overwritten."""
        if all(_plain_greedy(r) for r in reqs):  # nothing to edit: the argmax alone
            return argmax(logits)
        self.process(logits, reqs)
        rand = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if len(rand) == len(reqs):  # no greedy row: no argmax of the raw rows
            return _exponential_race(self.warp(logits, list(reqs)), [r.generator for r in reqs])
        sampled = argmax(logits)  # greedy rows keep this
        if rand:
            warped = self.warp(_take(logits, rand), [reqs[i] for i in rand])
            _put(sampled, rand, _exponential_race(warped, [reqs[i].generator for i in rand]))
        return sampled

    def process(self, logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> None:
        """In place, greedy and random rows alike: allowed_token_ids, logits_processors, min_tokens, penalties."""
        self._apply_allowed(logits, reqs)
        self._apply_processors(logits, reqs)
        self._apply_min_tokens(logits, reqs)
        self._apply_penalties(logits, reqs)

    @staticmethod
    def warp(logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> torch.Tensor:
        """Non-greedy rows [b, V] -> new tensor: logits / temperature, -inf outside the min_p / top_k / top_p set."""
        ps = [r.params for r in reqs]
        dev = logits.device
        logits = logits / _tensor([p.temperature for p in ps], logits.dtype, dev)[:, None]
        if any(p.min_p > 0 for p in ps):
            probs = logits.softmax(-1)
            floor = probs.amax(-1, keepdim=True) * _tensor([p.min_p for p in ps], logits.dtype, dev)[:, None]
            logits.masked_fill_(probs < floor, NEG_INF)
        V = logits.shape[1]
        ks = [p.top_k if 0 < p.top_k < V else 0 for p in ps]
        if any(ks):
            # ties with the k-th largest value are kept, as in vLLM
            k = _tensor([max(k, 1) for k in ks], torch.int64, dev)[:, None]
            kth = logits.topk(max(ks), dim=-1).values.gather(1, k - 1)
            kth.masked_fill_(_tensor([k == 0 for k in ks], torch.bool, dev)[:, None], NEG_INF)
            logits.masked_fill_(logits < kth, NEG_INF)
        p_rows = [j for j, p in enumerate(ps) if p.top_p < 1.0]
        if p_rows:
            top_p = _tensor([ps[j].top_p for j in p_rows], logits.dtype, dev)
            _put(logits, p_rows, _top_p(_take(logits, p_rows), top_p))
        return logits

    @staticmethod
    def _apply_allowed(logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> None:
        rows = [i for i, r in enumerate(reqs) if r.params.allowed_token_ids is not None]
        if not rows:
            return
        dev = logits.device
        blocked = torch.ones(len(rows), logits.shape[1], dtype=torch.bool, device=dev)
        r_idx = [j for j, i in enumerate(rows) for _ in reqs[i].params.allowed_token_ids or ()]
        c_idx = [t for i in rows for t in reqs[i].params.allowed_token_ids or ()]
        blocked[_tensor(r_idx, torch.int64, dev), _tensor(c_idx, torch.int64, dev)] = False
        _put(logits, rows, _take(logits, rows).masked_fill_(blocked, NEG_INF))

    @staticmethod
    def _apply_processors(logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> None:
        for i, r in enumerate(reqs):
            for fn in r.params.logits_processors or ():
                logits[i] = fn(list(r.output_token_ids), logits[i])

    def _apply_min_tokens(self, logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> None:
        # vLLM masks EOS here even with ignore_eos (the model's EOS is always in _all_stop_token_ids).
        rows: list[int] = []
        cols: list[int] = []
        for i, r in enumerate(reqs):
            if len(r.output_token_ids) < r.params.min_tokens:
                stop_ids = set(r.params.stop_token_ids or ())
                if self.eos_token_id is not None:
                    stop_ids.add(self.eos_token_id)
                rows += [i] * len(stop_ids)
                cols += sorted(stop_ids)
        if rows:
            logits[_tensor(rows, torch.int64, logits.device), _tensor(cols, torch.int64, logits.device)] = NEG_INF

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, reqs: Sequence[SamplingRequest]) -> None:
        """vLLM apply_penalties: repetition over prompt + output (divide positive logits, multiply negative ones),
        then frequency (x count) and presence (x seen) over output tokens only."""
        rows = [i for i, r in enumerate(reqs)
                if r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty]
        if not rows:
            return
        V, dev = logits.shape[1], logits.device
        ps = [reqs[i].params for i in rows]
        # counts over V + 1 columns: the pad id V lands in the last column, which is dropped
        out_ids = _padded([reqs[i].output_token_ids for i in rows], V, dev)
        out_counts = torch.zeros(len(rows), V + 1, dtype=logits.dtype, device=dev)
        out_counts = out_counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))[:, :V]
        out_seen = out_counts > 0
        sub = _take(logits, rows)
        if any(p.repetition_penalty != 1.0 for p in ps):
            prompt_ids = _padded([reqs[i].prompt_token_ids for i in rows], V, dev)
            seen = torch.zeros(len(rows), V + 1, dtype=torch.bool, device=dev).scatter_(1, prompt_ids, True)[:, :V]
            rep = _tensor([p.repetition_penalty for p in ps], logits.dtype, dev)[:, None]
            penalty = torch.where(seen | out_seen, rep, 1.0)
            sub = torch.where(sub > 0, sub / penalty, sub * penalty)
        freq = _tensor([p.frequency_penalty for p in ps], logits.dtype, dev)[:, None]
        pres = _tensor([p.presence_penalty for p in ps], logits.dtype, dev)[:, None]
        _put(logits, rows, sub - freq * out_counts - pres * out_seen)


def _plain_greedy(r: SamplingRequest) -> bool:
    """Greedy, no logprobs, and nothing process() would change in its row (the argmax of the raw logits)."""
    p = r.params
    return (p.greedy and p.logprobs is None and p.allowed_token_ids is None and not p.logits_processors
            and len(r.output_token_ids) >= p.min_tokens and p.repetition_penalty == 1.0 and not p.presence_penalty
            and not p.frequency_penalty)


def _exponential_race(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i, with no host sync; taken as
    argmax(logit - log E) (the same order: log p = logit - logsumexp), so no softmax is needed (a 129K-wide row's
    softmax took 34.5 us on H200 in a decode step's timeline). Each seeded row draws its V noise values from its own
    generator, so its stream does not depend on the rest of the batch."""
    q = torch.empty_like(logits)
    if any(g is None for g in generators):
        q.exponential_()
    for j, g in enumerate(generators):
        if g is not None:
            q[j].exponential_(generator=g)
    return argmax(logits - q.log_())


def argmax(x: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """x [B, V] -> [B] int64, the first maximal index as torch.argmax. On CUDA for up to 16 rows in two stages (the
    max of each of `chunks` pieces of a row, then the argmax of those): torch reduces a row in one block, so a lone
    129K-wide row took 28 us on H200 in a decode step's timeline. chunks: forced (tests); it must divide V."""
    B, V = x.shape
    if chunks is None:
        if x.device.type != "cuda" or B > 16 or V < 8192:
            return x.argmax(-1)
        chunks = next((c for c in (128, 64, 32, 16) if V % c == 0), 0)
        if not chunks:
            return x.argmax(-1)
    w = V // chunks
    vals, idx = x.view(B, chunks, w).max(-1)  # first maximal index within each piece
    j = vals.argmax(-1, keepdim=True)  # the first piece holding the row's maximum
    return (j * w + idx.gather(1, j)).squeeze(1)


def _top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """vLLM's rule: sort ascending, drop tokens whose cumulative mass from the bottom is <= 1 - p; keep the top one."""
    srt, idx = logits.sort(-1)
    drop = srt.softmax(-1).cumsum(-1) <= (1 - p)[:, None]
    drop[:, -1] = False
    srt.masked_fill_(drop, NEG_INF)
    return srt.scatter(-1, idx, srt)


def _gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, nums: list[int]) -> list[LogprobsEntry]:
    """logprobs [b, V] raw, sampled [b] -> per row {sampled: rank = count of logprobs >= its own, top-n: 1..n}."""
    tok_lp = logprobs.gather(1, sampled[:, None])
    ranks = (logprobs >= tok_lp).sum(-1).tolist()
    top_lp, top_ids = logprobs.topk(max(nums), dim=-1)
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    out = []
    for j, (tok, lp) in enumerate(zip(sampled.tolist(), tok_lp[:, 0].tolist())):
        entry = {tok: Logprob(lp, ranks[j])}
        for r in range(nums[j]):
            entry[top_ids_l[j][r]] = Logprob(top_lp_l[j][r], r + 1)
        out.append(entry)
    return out
