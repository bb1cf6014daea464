"""TP wire format: what workers rebuild from the encoder's messages equals what rank 0 scheduled, step after step
(growing tables sent as diffs, a preempted request re-admitted on other blocks, finished requests dropped)."""

from __future__ import annotations

import pickle

from ds4f.distributed.wire import WireDecoder, WireEncoder
from ds4f.engine.outputs import ScheduledSeq, SchedulerOutput
from ds4f.sample.params import SamplingParams

FIELDS = ("req_id", "token_ids", "start_pos", "block_table", "slot", "sample")


def seq(rid: str, toks: list[int], start: int, table: list[int], slot: int, sample: bool = True) -> ScheduledSeq:
    return ScheduledSeq(rid, toks, start, table, slot, sample, params=SamplingParams(), prompt_token_ids=[1, 2])


def test_workers_rebuild_every_step_and_tables_travel_as_diffs() -> None:
    long_table = list(range(100, 4196))  # a 1M-token sequence at block size 256
    steps = [
        SchedulerOutput([seq("a", [5] * 8, 0, [7], 0, False), seq("b", [9], 1048000, long_table, 1)], 9),
        SchedulerOutput([seq("a", [5] * 4, 8, [7, 8], 0), seq("b", [3], 1048001, long_table, 1)], 5),
        SchedulerOutput([seq("a", [4], 12, [7, 8, 11], 0), seq("b", [2], 1048002, long_table + [5000], 1)], 2),
        # b preempted (its blocks freed), a continues; then b comes back on other blocks, a has finished
        SchedulerOutput([seq("a", [6], 13, [7, 8, 11], 0)], 1, preempted_req_ids=["b"]),
        SchedulerOutput([seq("b", [1] * 3, 0, [40, 41], 2, False)], 3, finished_req_ids=["a"]),
    ]
    enc, dec = WireEncoder(), WireDecoder()
    sizes = []
    for sched in steps:
        msg = pickle.loads(pickle.dumps(enc.encode(sched)))  # what crosses the gloo broadcast
        sizes.append(len(pickle.dumps(msg)))
        got = dec.decode(msg)
        assert [[getattr(s, f) for f in FIELDS] for s in got.seqs] == [[getattr(s, f) for f in FIELDS]
                                                                        for s in sched.seqs]
        assert got.num_batched_tokens == sched.num_batched_tokens
        assert all(s.params is None and s.generator is None for s in got.seqs)  # sampling state stays on rank 0
    assert sizes[0] > 8000 and sizes[1] < 300 and sizes[2] < 300, sizes  # 4096 block ids once, then diffs
    assert set(dec.tables) == {"b"} and set(enc.sent) == {"b"}  # finished / preempted requests are forgotten


def test_steady_decode_steps_travel_as_tokens_and_positions() -> None:
    # random decode steps (rows join / leave / come back on new blocks / reorder, tables grow): every step decodes to
    # what was scheduled; steps of the same sequences with unchanged tables go as the short form
    import random

    from test_decode_inputs import _steps

    enc, dec = WireEncoder(), WireDecoder()
    short = full = 0
    for seqs in _steps(random.Random(1), 6, 64, 16, 10, 400):
        sched = SchedulerOutput(seqs, len(seqs))
        msg = pickle.loads(pickle.dumps(enc.encode(sched)))
        short += len(msg) == 2
        full += len(msg) == 3
        got = dec.decode(msg)
        assert [[getattr(s, f) for f in FIELDS] for s in got.seqs] == [[getattr(s, f) for f in FIELDS] for s in seqs]
    assert short > 50 and full > 50, (short, full)  # both forms exercised
    # a preempted request's id is dropped: the next step goes whole even if the others are unchanged
    a, b = seq("a", [1], 40, [3, 4, 5], 0), seq("b", [2], 20, [6, 7], 1)
    enc, dec = WireEncoder(), WireDecoder()
    steps = [SchedulerOutput([a, b], 2), SchedulerOutput([a, b], 2),
             SchedulerOutput([a], 1, preempted_req_ids=["b"]), SchedulerOutput([a], 1)]
    for sched in steps:
        msg = enc.encode(sched)
        got = dec.decode(pickle.loads(pickle.dumps(msg)))
        assert [[getattr(s, f) for f in FIELDS] for s in got.seqs] == [[getattr(s, f) for f in FIELDS]
                                                                        for s in sched.seqs]
    assert set(dec.tables) == {"a"} and len(msg) == 2
