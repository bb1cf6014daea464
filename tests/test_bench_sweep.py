"""bench.common.sweep (the tile sweeps' shared loop) on CPU with a fake clock: the pick is the fastest eligible
variant that matched and beat the baseline by >= 5 % (and kept the extra timing within 2 %); a variant that raises
is skipped; every variant that ran is recorded once."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import sweep  # noqa: E402


def _run_sweep(times: dict[tuple, float], wrong: set[tuple], broken: set[tuple], **kw: object) -> tuple:
    def run(*v: object) -> tuple:
        if v in broken:
            raise RuntimeError("out of resource")
        return ("bad",) if v in wrong else ("same",)

    current: list[tuple] = []

    def timer(fn: object) -> float:
        fn()  # type: ignore[operator]
        return times[current[-1]]

    def run_tracked(*v: object) -> tuple:
        current.append(v)
        return run(*v)

    recs: list[tuple] = []
    pick = sweep("t", list(times), run_tracked, lambda out, base: (out == base, 0.0 if out == base else 1.0),
                 lambda v, us, us2, ok, err: recs.append((v, us, ok)), timer=timer, **kw)  # type: ignore[arg-type]
    return pick, recs


def test_sweep_picks_the_fastest_matching_variant() -> None:
    times = {(0,): 100.0, (1,): 96.0, (2,): 80.0, (3,): 70.0, (4,): 60.0, (5,): 90.0}
    pick, recs = _run_sweep(times, wrong={(3,)}, broken={(4,)})
    assert pick == (2,)  # (3,) is faster but wrong, (4,) does not run, (1,) is within 5 % of the baseline
    assert [r[0] for r in recs] == [(0,), (1,), (2,), (3,), (5,)]
    assert [r[2] for r in recs] == [True, True, True, False, True]


def test_sweep_none_beats_baseline_and_eligibility() -> None:
    assert _run_sweep({(0,): 100.0, (1,): 97.0}, set(), set())[0] is None
    times = {(1, "base"): 100.0, (1, "other"): 50.0, (2, "x"): 80.0}
    assert _run_sweep(times, set(), set(), eligible=lambda v: v[0] > 1)[0] == (2, "x")


def test_sweep_extra_timing_must_not_worsen() -> None:
    times = {(0,): 100.0, (1,): 50.0, (2,): 60.0}
    extra = {(0,): 10.0, (1,): 10.5, (2,): 10.1}
    pick, _ = _run_sweep(times, set(), set(), extra=lambda v: extra[v])
    assert pick == (2,)  # (1,) is faster but 5 % slower on the extra timing
