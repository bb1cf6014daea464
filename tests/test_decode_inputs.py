"""⑤ DecodeGraphs' host path (DecodeInputs.fill: one packed copy, block-table rows copied only where they changed)
leaves every static buffer a bucket's graph reads exactly as FastCache.fill_decode (the oracle: it rewrites every
field and the whole table each step) over a run of steps that grows tables, swaps sequences between rows, shrinks
and grows the batch across buckets and replaces a table by a shorter one (a preempted request back on other blocks).
"""

from __future__ import annotations

import random

import torch

from ds4f.engine.outputs import ScheduledSeq
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.runner.gpu.graphs import DecodeInputs
from ds4f.runner.gpu.pools import slice_meta
from ds4f.runner.gpu.runner import EngineCache

FIELDS = ("input_ids", "positions", "tok_slot", "tok_seq", "chunk_start", "chunk_end", "block_table", "last_tok")


def _steps(rng: random.Random, num_slots: int, num_blocks: int, block_size: int, max_blocks: int,
           n: int) -> list[list[ScheduledSeq]]:
    """Random decode steps: each live slot advances one position per step (its table growing at block boundaries);
    slots join, leave, come back with a fresh table; the batch order is shuffled at times."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    live: dict[int, tuple[int, list[int]]] = {}  # slot -> (position, table)
    out = []
    for _ in range(n):
        if live and rng.random() < 0.15:  # leave (finish / preempt): blocks back to the pool
            s = rng.choice(sorted(live))
            free += live.pop(s)[1]
        if len(live) < num_slots and rng.random() < 0.3:  # join at some depth
            s = rng.choice([x for x in range(num_slots) if x not in live])
            pos = rng.randrange(0, (max_blocks - 1) * block_size)
            live[s] = (pos, [])
        if not live:
            continue
        step = []
        for s in sorted(live):
            pos, table = live[s]
            while len(table) * block_size < pos + 1:
                table = table + [free.pop()]  # a new list, like the scheduler's copy of the manager's table
            live[s] = (pos + 1, table)
            step.append(ScheduledSeq(f"r{s}", [rng.randrange(1000)], pos, table, s, True))
            if (pos + 1) // block_size >= max_blocks:  # at max context: finished
                free += live.pop(s)[1]
        if rng.random() < 0.3:
            rng.shuffle(step)
        out.append(step)
    return out


def run_fill_vs_fill_decode(device: str, stall: object = None) -> int:
    """400 random steps through DecodeInputs.fill and FastCache.fill_decode; each step's bucket buffers snapshotted
    (stream-ordered clones, no host sync) and compared at the end -> block-table rows changed over the run.
    stall(): called before each fill (GPU: a sleep kernel, so copies lag the host that refills the staging)."""
    args = ModelArgs.from_hf(tiny_config())
    block_size, max_ctx, num_slots, num_blocks = 16, 160, 6, 64
    ratios = [4, 16]

    def cache() -> EngineCache:
        return EngineCache(args, max_seqs=num_slots, num_blocks=num_blocks, block_size=block_size, max_ctx=max_ctx,
                           max_tokens=8, device=device, dtype=torch.bfloat16)

    got_cache, want_cache = cache(), cache()
    inputs = DecodeInputs(got_cache, 8, ratios)
    want_buf = want_cache.decode_buffers(8, ratios)
    buckets = (1, 2, 4, 8)
    rng = random.Random(0)
    steps = _steps(rng, num_slots, num_blocks, block_size, got_cache.max_blocks, 400)
    snaps: list[tuple[int, list[torch.Tensor], list[torch.Tensor]]] = []
    changed = []
    for seqs in steps:
        b = next(x for x in buckets if x >= len(seqs))
        for c in (got_cache, want_cache):
            c.bind(seqs)
        before = inputs.meta.block_table.clone()
        host = [(s.slot, s.start_pos, s.token_ids[0]) for s in seqs]
        if stall is not None:
            stall()  # type: ignore[operator]
        inputs.fill(host, b)
        want_cache.fill_decode(slice_meta(want_buf, b), host)
        got, want = slice_meta(inputs.meta, b), slice_meta(want_buf, b)
        snaps.append((b, [getattr(got, f).clone() for f in FIELDS] + [got.ent_tok[m].clone() for m in ratios],
                      [getattr(want, f).clone() for f in FIELDS] + [want.ent_tok[m].clone() for m in ratios]))
        changed.append((inputs.meta.block_table != before).any(dim=1).sum())
    for (b, got_t, want_t), seqs in zip(snaps, steps):
        for name, g, w in zip([*FIELDS, *map(str, ratios)], got_t, want_t):
            assert torch.equal(g, w), (name, b, [(s.slot, s.start_pos) for s in seqs])
    assert len(steps) > 300
    return int(sum(changed))


def test_fill_matches_fill_decode() -> None:
    assert run_fill_vs_fill_decode("cpu") > 20  # tables did change (growth, swaps), and were followed
