"""The one-shot all-reduce's guard (CPU): every rank takes it or none does, and Comm routes only the
messages it fits to it (the GPU kernel itself: tests/gpu/test_symm_allreduce.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ds4f.distributed import symm
from ds4f.distributed.comm import Comm


class FakeAR:
    def __init__(self, *args: Any, **kw: Any) -> None:
        self.calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() <= 8

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2  # what two ranks holding the same x would sum to


def test_off_when_asked_or_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def agree(ctrl: Any, v: int) -> int:
        seen.append(v)
        return v

    monkeypatch.setenv("DS4F_ALLREDUCE", "nccl")
    assert symm.try_symm(None, None, 0, 2, torch.device("cuda"), True, agree) is None
    monkeypatch.delenv("DS4F_ALLREDUCE", raising=False)  # the default: symm where it can run
    assert symm.try_symm(None, None, 0, 2, torch.device("cpu"), True, agree) is None
    assert symm.try_symm(None, None, 0, 2, torch.device("cuda"), False, agree) is None  # two nodes: no P2P
    assert seen == []  # decided from the config alone: every rank skips the agreement alike


@pytest.mark.parametrize("others", [0, 1])
def test_every_rank_or_none(monkeypatch: pytest.MonkeyPatch, others: int) -> None:
    # this rank builds one; the other rank did (1) or failed (0): the agreed minimum decides for both
    monkeypatch.setenv("DS4F_ALLREDUCE", "symm")
    monkeypatch.setattr(symm, "SymmAllReduce", FakeAR)
    got = symm.try_symm(None, None, 0, 2, torch.device("cuda"), True, lambda ctrl, v: min(v, others))
    assert (got is not None) == bool(others)


def test_failed_build_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS4F_ALLREDUCE", "symm")

    def boom(*args: Any, **kw: Any) -> None:
        raise RuntimeError("no P2P")

    monkeypatch.setattr(symm, "SymmAllReduce", boom)
    votes: list[int] = []
    assert symm.try_symm(None, None, 1, 2, torch.device("cuda"), True, lambda c, v: votes.append(v) or v) is None
    assert votes == [0]  # the other ranks learn that this one has none


def test_comm_routes_small_messages() -> None:
    class PG:
        def __init__(self) -> None:
            self.n = 0

        def allreduce(self, xs: list[torch.Tensor]) -> Any:
            self.n += 1
            return type("W", (), {"wait": lambda self: None})()

    pg, ar = PG(), FakeAR()
    c = Comm(0, 2, pg, ar)
    assert torch.equal(c.all_reduce(torch.ones(8)), torch.full((8,), 2.0))
    c.all_reduce(torch.ones(9))
    assert ar.calls == 1 and pg.n == 1 and c.counts["all_reduce"] == 2


def test_comm_all_reduce_add_routes_the_term() -> None:
    """all_reduce_add (x fp32, extra bf16): the fast path's own add when it has one and the message fits, else
    bf16(x + extra) rounded once and the plain all-reduce; one rank: just the rounded sum. Counted as all-reduces."""

    class AddAR(FakeAR):
        def __init__(self) -> None:
            super().__init__()
            self.adds = 0

        def all_reduce_add(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            self.adds += 1
            return (x + extra.float()).bfloat16() * 2

    x = torch.tensor([1.0, 2 ** -9, -3.0, 0.5, 0.0, 7.0, 1e-3, -1.0]) + 2 ** -12
    ex = torch.linspace(-1, 1, 8).bfloat16()
    want = (x + ex.float()).bfloat16()
    ar = AddAR()
    c = Comm(0, 2, object(), ar)
    got = c.all_reduce_add(x, ex)
    assert ar.adds == 1 and ar.calls == 0 and got.dtype == torch.bfloat16 and torch.equal(got, want * 2)
    ar2 = FakeAR()  # a fast path without the add: the term added here, then its plain all-reduce
    c2 = Comm(0, 2, object(), ar2)
    assert torch.equal(c2.all_reduce_add(x, ex), want * 2) and ar2.calls == 1
    assert torch.equal(Comm(0, 1).all_reduce_add(x, ex), want)  # one rank: nothing to reduce
    assert c.counts["all_reduce"] == 1 and c2.counts["all_reduce"] == 1
