"""⑦ TP wire format: a SchedulerOutput in, a compact message for the workers out (and back to a SchedulerOutput).

Only what a worker's forward reads crosses: request ids, chunk token ids, start positions, slots, the sample flags
and block tables. Block tables go as diffs against what the receiver already has (style.md §3 item 3): a running
sequence at 1M context holds ~4096 block ids and grows by at most one per step, so a decode step sends ~0 of them.
A decode step of the same requests in the same order as the last step, none of whose tables changed (the common
step), goes as (num_batched_tokens, [token id, position, ...]) only: the receiver reuses the last step's ids, slots,
sample flags and tables.
"""

from __future__ import annotations

from typing import Any

from ds4f.engine.outputs import ScheduledSeq, SchedulerOutput


class WireEncoder:
    """Rank 0: remembers the block table last sent per request."""

    def __init__(self) -> None:
        self.sent: dict[str, list[int]] = {}
        self.last: list[tuple[str, int, bool]] = []  # (req_id, slot, sample) of each sequence of the last message

    def encode(self, sched: Any) -> tuple[Any, ...]:
        """-> (num_batched_tokens, [(req_id, token_ids, start_pos, keep, new_blocks, slot, sample)], dropped ids);
        the receiver's table for req_id becomes its first `keep` entries + new_blocks. Or, for a step of the last
        step's sequences with one token each and unchanged tables: (num_batched_tokens, [token, position, ...])."""
        dropped = [*sched.finished_req_ids, *sched.preempted_req_ids]
        if not dropped and len(sched.seqs) == len(self.last) and self._same(sched.seqs):
            flat = []
            for s in sched.seqs:
                flat += (s.token_ids[0], s.start_pos)
            return sched.num_batched_tokens, flat
        for rid in dropped:
            self.sent.pop(rid, None)
        seqs = []
        for s in sched.seqs:
            prev, table = self.sent.get(s.req_id), s.block_table
            k = -1 if prev is None else len(prev)
            if 0 <= k <= len(table) and (table == prev if k == len(table) else table[:k] == prev):
                new = table[k:]
                prev.extend(new)  # type: ignore[union-attr]
            else:  # first step, or the table changed below what was sent: send it whole
                k, new = 0, list(table)
                self.sent[s.req_id] = list(table)
            seqs.append((s.req_id, s.token_ids, s.start_pos, k, new, s.slot, s.sample))
        self.last = [(s.req_id, s.slot, s.sample) for s in sched.seqs]
        return sched.num_batched_tokens, seqs, dropped

    def _same(self, seqs: list[Any]) -> bool:
        """Each sequence is the last message's at the same index (id, slot, sample flag), has one token and the
        table that was sent."""
        sent = self.sent
        for s, (rid, slot, sample) in zip(seqs, self.last):
            if s.req_id != rid or s.slot != slot or s.sample != sample or len(s.token_ids) != 1 \
                    or s.block_table != sent.get(rid):
                return False
        return True


class WireDecoder:
    """A worker: rebuilds each step's SchedulerOutput (without sampling state) from the encoder's messages."""

    def __init__(self) -> None:
        self.tables: dict[str, list[int]] = {}
        self.last: list[tuple[str, list[int], int, bool]] = []  # (req_id, table, slot, sample) of the last step

    def decode(self, msg: tuple[Any, ...]) -> SchedulerOutput:
        """The step's ScheduledSeqs; a block_table is the decoder's own list (never edited in place: a changed table
        is a new list), shared by the steps in which it did not change."""
        if len(msg) == 2:  # the last step's sequences, one token each, same tables
            n, flat = msg
            seqs = [ScheduledSeq(req_id=rid, token_ids=[flat[2 * i]], start_pos=flat[2 * i + 1], block_table=table,
                                 slot=slot, sample=sample) for i, (rid, table, slot, sample) in enumerate(self.last)]
            return SchedulerOutput(seqs=seqs, num_batched_tokens=n)
        n, seqs, dropped = msg
        for rid in dropped:
            self.tables.pop(rid, None)
        out = []
        for rid, token_ids, start_pos, keep, new, slot, sample in seqs:
            prev = self.tables.get(rid)
            if prev is None or keep != len(prev) or new:
                table = self.tables[rid] = (prev or [])[:keep] + list(new)
            else:
                table = prev
            out.append(ScheduledSeq(req_id=rid, token_ids=token_ids, start_pos=start_pos, block_table=table,
                                    slot=slot, sample=sample))
        self.last = [(s.req_id, s.block_table, s.slot, s.sample) for s in out]
        return SchedulerOutput(seqs=out, num_batched_tokens=n, finished_req_ids=list(dropped))
