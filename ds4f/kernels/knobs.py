"""Kernel tuning knobs from the environment: "a,b,..." integer tuples parsed once at import; a bad value raises a
ValueError naming the variable and an example (never a silent fallback)."""

from __future__ import annotations

import os


def env_knobs(name: str, n: int, example: str, minimum: int = 1) -> tuple[int, ...]:
    """The env var `name` as n comma-separated integers >= minimum; () when unset or empty (the built-in choice)."""
    raw = os.environ.get(name, "")
    try:
        vals = tuple(int(v) for v in raw.split(",")) if raw else ()
        assert not vals or (len(vals) == n and all(v >= minimum for v in vals))
    except (ValueError, AssertionError):
        raise ValueError(f"{name}={raw!r}: expected {n} comma-separated integers >= {minimum}, e.g. {example!r}, "
                         "or empty for the built-in choice") from None
    return vals


def env_buckets(name: str, default: str) -> tuple[int, ...]:
    """The env var `name` (unset: `default`) as a comma-separated list of token buckets ("" = none)."""
    v = os.environ.get(name, default)
    try:
        return tuple(int(b) for b in v.split(",") if b)
    except ValueError:
        raise ValueError(f"{name}={v!r}: expected token buckets such as '1,4' (or '' for none)") from None
