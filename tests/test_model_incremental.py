"""Cache seam: prefill + decode steps, chunked prefill, mixed batches and rollback all equal one full prefill."""

from __future__ import annotations

import pytest
import torch

from ds4f.model.args import CSA, ModelArgs, tiny_config
from ds4f.model.cache import AttnBatch, DenseCache
from ds4f.model.deepseek_v4 import Transformer, init_random_

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model() -> Transformer:
    return init_random_(Transformer(ModelArgs.from_hf(tiny_config())), seed=0)


class ContractCache(DenseCache):
    """DenseCache that asserts the AttnCache contract (cache.py) on every call; `start_pos` is set per forward."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args, self.start_pos = args, [0]

    def _ratio(self, layer: int) -> int:
        return self.args.compress_ratio(layer)

    def read_window(self, layer: int, seq: int, lo: int, hi: int) -> torch.Tensor:
        s = self.start_pos[seq]
        assert 0 <= lo < hi <= s and lo >= s - (self.args.sliding_window - 1), (layer, seq, lo, hi, s)
        return super().read_window(layer, seq, lo, hi)

    def write_window(self, layer: int, seq: int, lo: int, rows: torch.Tensor) -> None:
        assert lo == self.start_pos[seq] and rows.shape[1] == self.args.head_dim
        super().write_window(layer, seq, lo, rows)

    def read_state(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        s, m = self.start_pos[seq], self._ratio(layer)
        back = 2 * m if self.args.layer_type(layer) == CSA else m
        assert 0 <= lo < hi <= s and s - lo <= back, (layer, seq, kind, lo, hi, s)
        return super().read_state(layer, seq, kind, lo, hi)

    def write_state(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None:
        a, csa = self.args, self.args.layer_type(layer) == CSA
        width = {"attn": 2 * (2 if csa else 1) * a.head_dim, "index": 4 * a.index_head_dim}[kind]
        assert lo == self.start_pos[seq] and rows.dtype == torch.float32 and rows.shape[1] == width
        super().write_state(layer, seq, kind, lo, rows)

    def read_compressed(self, layer: int, seq: int, kind: str, lo: int, hi: int) -> torch.Tensor:
        assert 0 <= lo < hi <= self.start_pos[seq] // self._ratio(layer), (layer, seq, kind, lo, hi)
        return super().read_compressed(layer, seq, kind, lo, hi)

    def write_compressed(self, layer: int, seq: int, kind: str, lo: int, rows: torch.Tensor) -> None:
        assert lo == self.start_pos[seq] // self._ratio(layer)
        assert rows.shape[1] == {"kv": self.args.head_dim, "index": self.args.index_head_dim}[kind]
        super().write_compressed(layer, seq, kind, lo, rows)


def batch(loc: list[int], starts: list[int], cache: DenseCache) -> AttnBatch:
    if isinstance(cache, ContractCache):
        cache.start_pos = list(starts)
    return AttnBatch(loc, starts, cache)


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 129280, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run_chunks(model: Transformer, ids: torch.Tensor, sizes: list[int], cache: DenseCache | None = None,
               start: int = 0) -> torch.Tensor:
    """Feed ids in consecutive chunks of `sizes` (one sequence) and return all logits [len(ids), V]."""
    cache = cache if cache is not None else ContractCache(model.args)
    out, pos = [], start
    for n in sizes:
        chunk = ids[pos - start: pos - start + n]
        streams = model(chunk, torch.arange(pos, pos + n), batch([0, n], [pos], cache))
        out.append(model.compute_logits(streams))
        pos += n
    return torch.cat(out)


@torch.no_grad()
def full(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return run_chunks(model, ids, [len(ids)])


# tiny config: window 8, CSA ratio 4 with top-4 (selection starts at t=19), HCA ratio 16
@pytest.mark.parametrize(("n", "k"), [(1, 40), (7, 26), (16, 9), (37, 12)])
def test_prefill_then_decode_equals_one_prefill(model: Transformer, n: int, k: int) -> None:
    ids = _ids(n + k, seed=n)
    ref = full(model, ids)
    got = run_chunks(model, ids, [n] + [1] * k)
    torch.testing.assert_close(got, ref, **TOL)


def test_chunked_prefill_equals_one_prefill(model: Transformer) -> None:
    ids = _ids(130, seed=3)
    ref = full(model, ids)
    sizes = [3, 1, 9, 17, 2, 33, 5, 4, 16, 40]
    assert sum(sizes) == 130
    torch.testing.assert_close(run_chunks(model, ids, sizes), ref, **TOL)


@torch.no_grad()
def test_mixed_batch_equals_each_sequence_alone(model: Transformer) -> None:
    # (prefix already cached, new tokens this forward): decode, mid-prompt chunk, fresh prompt, a 1-token prompt
    plan = [(50, 1), (29, 23), (0, 20), (0, 1), (63, 2)]
    seqs = [_ids(p + n, seed=100 + i) for i, (p, n) in enumerate(plan)]
    alone = [run_chunks(model, s, [p, n] if p else [n])[p:] for s, (p, n) in zip(seqs, plan)]

    cache = ContractCache(model.args).bind([10, 11, 12, 13, 14])
    # prefill the prefixes through the shared cache, one sequence per forward (seq index 0 -> that id)
    for b, (s, (p, _)) in enumerate(zip(seqs, plan)):
        if p:
            cache.seq_ids = [10 + b]
            model(s[:p], torch.arange(p), batch([0, p], [0], cache))
    cache.seq_ids = [10, 11, 12, 13, 14]
    loc = [0]
    for _, n in plan:
        loc.append(loc[-1] + n)
    ids = torch.cat([s[p:] for s, (p, _) in zip(seqs, plan)])
    pos = torch.cat([torch.arange(p, p + n) for p, n in plan])
    logits = model.compute_logits(model(ids, pos, batch(loc, [p for p, _ in plan], cache)))
    for b in range(len(plan)):
        torch.testing.assert_close(logits[loc[b]: loc[b + 1]], alone[b], **TOL)


@torch.no_grad()
def test_rollback_overwrites_rejected_positions(model: Transformer) -> None:
    """A rejected draft chunk is undone by simply re-running from the rollback point (position-indexed state)."""
    ids = _ids(60, seed=7)
    ref = full(model, ids)
    cache = ContractCache(model.args)
    run_chunks(model, ids[:45], [45], cache)
    junk = _ids(6, seed=8)
    model(junk, torch.arange(45, 51), batch([0, 6], [45], cache))  # drafts for 45..50, all rejected
    model(junk[:3], torch.arange(45, 48), batch([0, 3], [45], cache))  # and a second, shorter rejected try
    got = run_chunks(model, ids[45:], [2, 1, 12], cache, start=45)
    torch.testing.assert_close(got, ref[45:], **TOL)


@torch.no_grad()
def test_mtp_block_incremental_and_position0(model: Transformer) -> None:
    mtp = model.mtp[0]
    ids = _ids(30, seed=9)
    streams = model(ids, torch.arange(30), AttnBatch([0, 30], [0], DenseCache()))
    nxt = torch.cat([ids[1:], ids[:1]])
    ref = mtp(streams, nxt, torch.arange(30), AttnBatch([0, 30], [0], DenseCache()))
    cache, outs = ContractCache(model.args), []
    for lo, hi in [(0, 11), (11, 12), (12, 30)]:
        outs.append(mtp(streams[lo:hi], nxt[lo:hi], torch.arange(lo, hi), batch([0, hi - lo], [lo], cache)))
    torch.testing.assert_close(torch.cat(outs), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the next-token embedding is zeroed at position 0: changing that token changes nothing there, but does elsewhere
    other = nxt.clone()
    other[0] += 1
    other[5] += 1
    alt = mtp(streams, other, torch.arange(30), AttnBatch([0, 30], [0], DenseCache()))
    torch.testing.assert_close(alt[0], ref[0], rtol=0, atol=1e-6)
    assert (alt[5] - ref[5]).abs().max() > 1e-3
    logits = mtp.compute_logits(ref, model.head)
    assert logits.shape == (30, 129280) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
