"""⑦ TP wire format: a SchedulerOutput in, a compact message for the workers out (and back to a SchedulerOutput).

Only what a worker's forward reads crosses: request ids, chunk token ids, start positions, slots, the sample flags
and block tables. Block tables go as diffs against what the receiver already has (style.md §3 item 3): a running
sequence at 1M context holds ~4096 block ids and grows by at most one per step, so a decode step sends ~0 of them.
"""

from __future__ import annotations

from typing import Any


class WireEncoder:
    """Rank 0: remembers the block table last sent per request."""

    def __init__(self) -> None:
        self.sent: dict[str, list[int]] = {}

    def encode(self, sched: Any) -> tuple[Any, ...]:
        """-> (num_batched_tokens, [(req_id, token_ids, start_pos, keep, new_blocks, slot, sample)], dropped ids);
        the receiver's table for req_id becomes its first `keep` entries + new_blocks."""
        for rid in [*sched.finished_req_ids, *sched.preempted_req_ids]:
            self.sent.pop(rid, None)
        seqs = []
        for s in sched.seqs:
            prev, table = self.sent.get(s.req_id, []), s.block_table
            keep = len(prev) if len(prev) <= len(table) and table[: len(prev)] == prev else 0
            seqs.append((s.req_id, s.token_ids, s.start_pos, keep, table[keep:], s.slot, s.sample))
            self.sent[s.req_id] = list(table)
        dropped = [*sched.finished_req_ids, *sched.preempted_req_ids]
        return sched.num_batched_tokens, seqs, dropped


class WireDecoder:
    """A worker: rebuilds each step's SchedulerOutput (without sampling state) from the encoder's messages."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}

    def decode(self, msg: tuple[Any, ...]) -> Any:
        from ds4f.engine.outputs import ScheduledSeq, SchedulerOutput

        n, seqs, dropped = msg
        for rid in dropped:
            self.tables.pop(rid, None)
        out = []
        for rid, token_ids, start_pos, keep, new, slot, sample in seqs:
            table = self.tables.get(rid, [])[:keep] + list(new)
            self.tables[rid] = table
            out.append(ScheduledSeq(req_id=rid, token_ids=token_ids, start_pos=start_pos, block_table=list(table),
                                    slot=slot, sample=sample))
        return SchedulerOutput(seqs=out, num_batched_tokens=n, finished_req_ids=list(dropped))
