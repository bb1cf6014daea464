"""③ scheduler: token budget, chunked prefill, decodes first, FCFS, max_num_seqs, preemption order, abort, limits;
and the bookkeeping modules import with CUDA hidden and torch.cuda / ds4f.model / ds4f.runner poisoned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ds4f.cache.manager import CacheLayout, KVCacheManager
from ds4f.engine.outputs import RunnerOutput, SchedulerOutput
from ds4f.engine.request import QueueFullError, Request, RequestStatus
from ds4f.engine.scheduler import Scheduler
from ds4f.model.args import ModelArgs, tiny_config

LAYOUT = CacheLayout.from_model_args(ModelArgs.from_hf(tiny_config()), 16, "float32")


def make(num_blocks: int = 64, num_slots: int = 8, budget: int = 64, max_num_seqs: int = 8,
         max_model_len: int = 1024, max_waiting: int | None = None) -> Scheduler:
    return Scheduler(KVCacheManager(LAYOUT, num_blocks, num_slots), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_model_len=max_model_len, max_waiting=max_waiting)


def req(rid: str, n: int) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(range(10, 10 + n)), params=None)


def run(s: Scheduler, tok: int = 7) -> SchedulerOutput:
    """One step with a fake runner that samples `tok` for every sampling sequence."""
    out = s.schedule()
    sampled = [x.req_id for x in out.seqs if x.sample]
    s.update_from_output(out, RunnerOutput(sampled, [tok] * len(sampled)))
    return out


def chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(x.req_id, x.start_pos, len(x.token_ids), x.sample) for x in out.seqs]


def test_chunked_prefill_budget_and_decodes_first() -> None:
    s = make(budget=64)
    for rid, n in (("a", 100), ("b", 5), ("c", 30)):
        s.add_request(req(rid, n))
    assert chunks(run(s)) == [("a", 0, 64, False)]
    assert chunks(run(s)) == [("a", 64, 36, True), ("b", 0, 5, True), ("c", 0, 23, False)]
    # a and b now decode (1 token each) and go first; c's prefill continues after them
    out = run(s)
    assert chunks(out) == [("a", 100, 1, True), ("b", 5, 1, True), ("c", 23, 7, True)]
    assert out.seqs[0].token_ids == [7] and out.num_batched_tokens == 9
    assert chunks(run(s)) == [("a", 101, 1, True), ("b", 6, 1, True), ("c", 30, 1, True)]
    s.manager.check_integrity()


def test_block_tables_cover_the_chunk() -> None:
    s = make(budget=40)
    s.add_request(req("a", 70))
    out = run(s)
    assert out.seqs[0].block_table == [0, 1, 2]  # 40 tokens / 16 per block
    out = run(s)
    assert out.seqs[0].block_table == [0, 1, 2, 3, 4] and out.seqs[0].slot == 0


def test_max_num_seqs_and_slots_limit_admission() -> None:
    s = make(budget=1000, max_num_seqs=2)
    for i in range(4):
        s.add_request(req(str(i), 3))
    assert [x.req_id for x in run(s).seqs] == ["0", "1"]
    assert (s.num_running, s.num_waiting) == (2, 2)
    s2 = make(budget=1000, num_slots=1)
    s2.add_request(req("a", 3))
    s2.add_request(req("b", 3))
    assert [x.req_id for x in run(s2).seqs] == ["a"]


def test_preemption_evicts_latest_arrival_and_recomputes() -> None:
    s = make(num_blocks=4, budget=200)
    s.add_request(req("old", 30))  # 2 blocks
    s.add_request(req("new", 30))  # 2 blocks
    run(s)
    assert s.manager.blocks.num_free == 0
    assert chunks(run(s)) == [("old", 30, 1, True), ("new", 30, 1, True)]
    assert chunks(run(s)) == [("old", 31, 1, True), ("new", 31, 1, True)]
    out = run(s)  # position 32 needs a 3rd block for "old": "new" (the latest arrival) is preempted
    assert out.preempted_req_ids == ["new"] and chunks(out) == [("old", 32, 1, True)]
    new = s.requests["new"]
    assert (new.status, new.num_computed_tokens, new.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert new.output_token_ids == [7, 7, 7] and s.waiting[0] is new
    assert s.num_preemptions == 1
    s.manager.check_integrity()
    s.finish(s.requests["old"], "stop")
    out = run(s)  # resumes: recompute prompt + its 2 outputs, then sample the 3rd token
    assert chunks(out) == [("new", 0, 33, True)]
    assert out.seqs[0].token_ids == new.prompt_token_ids + [7, 7, 7]


def test_latest_arrival_preempts_itself_and_waits_at_the_head() -> None:
    s = make(num_blocks=3, budget=200)
    s.add_request(req("a", 15))
    s.add_request(req("b", 32))
    assert chunks(run(s)) == [("a", 0, 15, True), ("b", 0, 32, True)]
    out = run(s)  # b's position 32 needs a 3rd block; b is the latest arrival, so it preempts itself
    assert out.preempted_req_ids == ["b"] and chunks(out) == [("a", 15, 1, True)]
    s.manager.check_integrity()
    s2 = make(num_blocks=3, budget=200)
    s2.add_request(req("a", 15))
    s2.add_request(req("b", 17))
    assert chunks(run(s2)) == [("a", 0, 15, True), ("b", 0, 17, True)]  # a: 1 block, b: 2 blocks
    out = run(s2)  # a's position 15 fits its block; b's 17 fits too
    assert chunks(out) == [("a", 15, 1, True), ("b", 17, 1, True)]
    out = run(s2)  # a's position 16 needs a 2nd block: b is preempted; then only a runs
    assert out.preempted_req_ids == ["b"] and chunks(out) == [("a", 16, 1, True)]
    s2.add_request(req("c", 1))
    for _ in range(15):
        out = run(s2)  # b waits at the head of the queue; c, behind it, is not admitted first (FCFS)
        assert [x.req_id for x in out.seqs] in (["a"], ["a", "b"])
    s2.manager.check_integrity()


def test_abort_frees_everything_at_once() -> None:
    s = make(budget=20)
    s.add_request(req("a", 50))
    s.add_request(req("b", 5))
    run(s)
    assert s.manager.blocks.num_used == 2
    aborted = s.abort(["a", "b", "nope"])
    assert [r.request_id for r in aborted] == ["a", "b"]
    assert all(r.finish_reason == "abort" for r in aborted)
    assert s.manager.blocks.num_used == 0 and s.manager.slots.num_used == 0 and not s.has_unfinished()
    assert sorted(s.schedule().finished_req_ids) == ["a", "b"]
    s.manager.check_integrity()


def test_limits() -> None:
    s = make(max_model_len=100, max_waiting=2)
    with pytest.raises(ValueError, match="the prompt has 100 tokens but max_model_len is 100"):
        s.add_request(req("long", 100))
    with pytest.raises(ValueError, match="empty"):
        s.add_request(req("empty", 0))
    s.add_request(req("a", 5))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", 5))
    s.add_request(req("b", 5))
    with pytest.raises(QueueFullError, match="2 requests"):
        s.add_request(req("c", 5))


POISON = """
import importlib.abc, sys
class Poison(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch.cuda" or name.startswith(("torch.cuda.", "ds4f.model", "ds4f.runner")):
            raise ImportError(f"poisoned: {name}")
sys.meta_path.insert(0, Poison())
import ds4f.engine.scheduler, ds4f.engine.outputs, ds4f.engine.request, ds4f.cache.manager, ds4f.cache.block_pool
bad = [m for m in sys.modules if m == "torch.cuda" or m.startswith(("ds4f.model", "ds4f.runner"))]
assert not bad, bad
print("ok")
"""


def test_bookkeeping_imports_without_cuda_model_or_runner() -> None:
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", POISON], cwd=root, capture_output=True, text=True,
                       env={"CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@st.composite
def workloads(draw: st.DrawFn) -> tuple[dict, list[tuple[int, int, int, int | None]]]:
    num_blocks = draw(st.integers(4, 24))
    cfg = {"num_blocks": num_blocks, "num_slots": draw(st.integers(1, 4)), "budget": draw(st.integers(1, 64)),
           "max_num_seqs": draw(st.integers(1, 4)), "max_model_len": min(num_blocks * 16, 200)}
    reqs = []
    for _ in range(draw(st.integers(1, 8))):
        n = draw(st.integers(1, cfg["max_model_len"] - 1))
        out = draw(st.integers(1, cfg["max_model_len"] - n))
        reqs.append((n, out, draw(st.integers(0, 20)), draw(st.none() | st.integers(0, 60))))
    return cfg, reqs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_invariants_and_finish(w: tuple[dict, list]) -> None:
    """Any mix of arrivals, aborts, chunking and preemption: the budget and limits hold, chunks continue exactly
    where the request stands and are covered by its blocks, the pool stays consistent, and everything finishes."""
    cfg, reqs = w
    s = make(**cfg)
    pending = sorted(range(len(reqs)), key=lambda i: reqs[i][2])
    done: set[str] = set()
    for step in range(3000):
        while pending and reqs[pending[0]][2] <= step:
            i = pending.pop(0)
            s.add_request(req(str(i), reqs[i][0]))
        for rid in list(s.requests):
            if reqs[int(rid)][3] == step:
                s.abort([rid])
                done.add(rid)
        before = {rid: (r.num_computed_tokens, r.num_tokens) for rid, r in s.requests.items()}
        out = s.schedule()
        assert out.num_batched_tokens == sum(len(x.token_ids) for x in out.seqs) <= cfg["budget"]
        assert len(out.seqs) <= min(cfg["max_num_seqs"], cfg["num_slots"])
        for x in out.seqs:
            r = s.requests[x.req_id]
            computed = 0 if x.req_id in out.preempted_req_ids else before[x.req_id][0]
            assert x.start_pos == r.num_computed_tokens == computed
            assert x.token_ids == r.token_ids(x.start_pos, x.start_pos + len(x.token_ids))
            assert x.sample == (x.start_pos + len(x.token_ids) == r.num_tokens)
            assert len(x.block_table) * 16 >= x.start_pos + len(x.token_ids)
        s.manager.check_integrity()
        sampled = [x.req_id for x in out.seqs if x.sample]
        for r, _, _ in s.update_from_output(out, RunnerOutput(sampled, [7] * len(sampled))):
            assert r.num_tokens <= cfg["max_model_len"]
            if len(r.output_token_ids) >= reqs[int(r.request_id)][1]:
                s.finish(r, "length")
                done.add(r.request_id)
        if not pending and not s.has_unfinished():
            break
    assert done == {str(i) for i in range(len(reqs))}, "every request finishes or is aborted"
    assert s.manager.blocks.num_free == cfg["num_blocks"] and s.manager.slots.num_free == cfg["num_slots"]
