"""Grammar stage: tokenizer + tools + tool_choice -> a logits processor forcing output into one DSML tool-call block.

The grammar (spec §2.4, vLLM's structural tag for `deepseek_v4`), at the byte level:
    [REASONING "</think>"] "\\n\\n<｜DSML｜tool_calls>\\n" INVOKE ("\\n" INVOKE)* "\\n</｜DSML｜tool_calls>" EOS
    INVOKE = '<｜DSML｜invoke name="' TOOL '">\\n' (PARAM "\\n")* '</｜DSML｜invoke>'
    PARAM  = '<｜DSML｜parameter name="' KEY '" string="' ("true"|"false") '">' VALUE "</｜DSML｜parameter>"
REASONING and VALUE are free text that may not contain "｜DSML｜" (outside their closing tag). Keys come from the
tool's schema (each at most once, required ones before the invoke closes); `string` is fixed by the key's type.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from ds4f.chat.tools import function_specs, schema_types

if TYPE_CHECKING:
    from ds4f.tokenizer import Tokenizer

__all__ = ["ToolCallConstraint", "build_tool_call_processor"]

_D = "｜DSML｜".encode()
THINK_END = b"</think>"
PARAM_CLOSE = b"</" + _D + b"parameter>"
OPEN = b"\n\n<" + _D + b"tool_calls>\n<" + _D + b'invoke name="'
NEXT_INVOKE = b"\n<" + _D + b'invoke name="'
CLOSE_BLOCK = b"\n</" + _D + b"tool_calls>"
INVOKE_END = b"</" + _D + b"invoke>"
_FORBID = (_D,)
_PATTERN_FIRST_BYTES = (ord("<"), _D[0])  # every terminator starts with "<", the forbidden marker with 0xEF

# States are small hashable tuples so masks can be cached per state:
#   ("free", kind, ctx, tail, count)  kind "reason" | "value"; tail = pending bytes that may start a pattern
#   ("lit", kind, ctx, done)          kind "open" | "name" | "params" | "nl" | "after" | "close"; done = bytes matched
#   ("end",) only EOS; ("done",) after EOS; None = left the grammar
State = tuple


class _Vocab:
    """Token bytes indexed for fast candidate lookup; built once per tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tb = tokenizer.all_token_bytes()
        self.special = frozenset(tokenizer.all_special_ids)
        self.by_first: dict[int, list[int]] = {}
        risky: list[int] = []
        pairs: list[tuple[bytes, int]] = []
        for i, b in enumerate(self.tb):
            if not b or i in self.special:
                continue
            self.by_first.setdefault(b[0], []).append(i)
            pairs.append((b, i))
            if any(c in b for c in _PATTERN_FIRST_BYTES):
                risky.append(i)
        self.risky = frozenset(risky)
        pairs.sort()
        self.sorted_bytes = [b for b, _ in pairs]
        self.sorted_ids = [i for _, i in pairs]

    def with_prefix(self, prefix: bytes) -> list[int]:
        """Ids whose bytes start with `prefix` (a contiguous run of the sorted vocabulary)."""
        lo = bisect_left(self.sorted_bytes, prefix)
        hi = lo
        while hi < len(self.sorted_bytes) and self.sorted_bytes[hi].startswith(prefix):
            hi += 1
        return self.sorted_ids[lo:hi]

    def exact(self, data: bytes) -> list[int]:
        lo = bisect_left(self.sorted_bytes, data)
        hi = bisect_right(self.sorted_bytes, data)
        return self.sorted_ids[lo:hi]


@lru_cache(maxsize=4)
def _vocab_index(tokenizer: Tokenizer) -> _Vocab:
    return _Vocab(tokenizer)


def _pending(buf: bytes, patterns: Sequence[bytes]) -> bytes:
    """Longest suffix of `buf` that is a proper prefix of one of `patterns`."""
    longest = max(len(p) for p in patterns) - 1
    for k in range(min(longest, len(buf)), 0, -1):
        tail = buf[-k:]
        if any(p.startswith(tail) and len(p) > k for p in patterns):
            return tail
    return b""


class ToolCallConstraint:
    """Per-request logits processor `fn(output_ids, logits) -> logits` (vLLM style; call once per decode step)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        tools: Sequence[Any],
        names: Sequence[str],
        *,
        parallel_tool_calls: bool = True,
        thinking: bool = False,
        max_free_tokens: int | None = None,
    ) -> None:
        self._v = _vocab_index(tokenizer)
        self._tb, self._special = self._v.tb, self._v.special
        self._eos = tokenizer.eos_token_id
        self._parallel = parallel_tool_calls
        self._max_free = max_free_tokens
        specs = {fn["name"]: fn for fn in function_specs(tools)}
        self._names = [n.encode() for n in names]
        self._params: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        self._required: dict[str, frozenset[str]] = {}
        for n in names:
            params = specs.get(n, {}).get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            props = props if isinstance(props, Mapping) else {}
            self._params[n] = [(k, _string_attrs(v)) for k, v in props.items()]
            req = params.get("required") if isinstance(params, Mapping) else None
            self._required[n] = frozenset(r for r in req or () if r in props)
        self._start: State = ("free", "reason", (), b"", 0) if thinking else ("lit", "open", (), b"")
        self._ids: list[int] = []
        self._states: list[State | None] = [self._start]
        self._masks: dict[tuple[State, torch.device], tuple[bool, torch.Tensor]] = {}

    # --- grammar --------------------------------------------------------------------------------------------------
    def _options(self, kind: str, ctx: tuple) -> list[tuple[bytes, State]]:
        if kind == "open":
            return [(OPEN, ("lit", "name", (), b""))]
        if kind == "name":
            return [(n + b'">\n', ("lit", "params", (n.decode(), frozenset()), b"")) for n in self._names]
        if kind == "params":
            name, used = ctx
            opts = [
                (f'<｜DSML｜parameter name="{k}" string="{s}">'.encode(), ("free", "value", (name, used | {k}), b"", 0))
                for k, attrs in self._params[name]
                if k not in used
                for s in attrs
            ]
            if self._required[name] <= used:
                opts.append((INVOKE_END, ("lit", "after", (), b"")))
                if not used:
                    opts.append((b"\n" + INVOKE_END, ("lit", "after", (), b"")))
            return opts
        if kind == "nl":
            return [(b"\n", ("lit", "params", ctx, b""))]
        if kind == "after":
            opts = [(CLOSE_BLOCK, ("end",))]
            return [(NEXT_INVOKE, ("lit", "name", (), b"")), *opts] if self._parallel else opts
        # "close": a free segment forced shut at max_free_tokens; ctx = (remaining terminator, next state)
        return [(ctx[0], ctx[1])]

    @staticmethod
    def _free_term(kind: str, ctx: tuple) -> tuple[bytes, State]:
        if kind == "reason":
            return THINK_END, ("lit", "open", (), b"")
        return PARAM_CLOSE, ("lit", "nl", ctx, b"")

    def _advance(self, state: State | None, data: bytes) -> State | None:
        while data and state is not None:
            if state[0] == "lit":
                _, kind, ctx, done = state
                buf = done + data
                opts = self._options(kind, ctx)
                if any(lit.startswith(buf) and lit != buf for lit, _ in opts):
                    return ("lit", kind, ctx, buf)
                nxt = next(((lit, st) for lit, st in opts if buf.startswith(lit)), None)
                if nxt is None:
                    return None
                state, data = nxt[1], buf[len(nxt[0]) :]
            elif state[0] == "free":
                _, kind, ctx, tail, count = state
                term, after = self._free_term(kind, ctx)
                buf = tail + data
                p = buf.find(term)
                body = buf[:p] if p >= 0 else buf[: len(buf) - len(_pending(buf, (term,)))]
                if any(f in body for f in _FORBID):
                    return None
                if p >= 0:
                    state, data = after, buf[p + len(term) :]
                    continue
                return ("free", kind, ctx, _pending(buf, (term, *_FORBID)), count)
            else:
                return None
        return state

    def _step(self, state: State | None, token: int) -> State | None:
        if state is None or state[0] == "done":
            return state
        if token == self._eos:
            return ("done",) if state[0] == "end" else None
        if token in self._special:
            return None
        new = self._advance(state, self._tb[token])
        if new is not None and new[0] == "free" and self._max_free is not None:
            grew = state[0] == "free" and state[1:3] == new[1:3]
            new = (*new[:4], state[4] + 1 if grew else 1)
            if new[4] >= self._max_free:
                term, after = self._free_term(new[1], new[2])
                k = len(_pending(new[3], (term,)))
                new = ("lit", "close", (term[k:], after), b"")
        return new

    # --- masks ----------------------------------------------------------------------------------------------------
    def _mask(self, state: State, device: torch.device) -> tuple[bool, torch.Tensor]:
        """(True, ids allowed) for forced states, (False, ids banned) for free ones; cached per state."""
        key = (state[:4] if state[0] == "free" else state, device)
        hit = self._masks.get(key)
        if hit is not None:
            return hit
        if state[0] == "end":
            allow, ids = True, [self._eos]
        elif state[0] == "free":
            _, kind, ctx, tail, _ = state
            term, _ = self._free_term(kind, ctx)
            nxt = {p[len(tail)] for p in (term, *_FORBID) if tail and p.startswith(tail) and len(p) > len(tail)}
            cands = self._v.risky.union(*(self._v.by_first.get(b, ()) for b in nxt))
            allow, ids = False, [*self._special, *(i for i in cands if self._advance(state, self._tb[i]) is None)]
        else:
            _, kind, ctx, done = state
            good: set[int] = set()
            for lit, _ in self._options(kind, ctx):
                if not lit.startswith(done) or lit == done:
                    continue
                rest = lit[len(done) :]
                for k in range(1, len(rest) + 1):
                    good.update(self._v.exact(rest[:k]))  # a piece of the literal
                longer = (i for i in self._v.with_prefix(rest) if len(self._tb[i]) > len(rest))
                good.update(i for i in longer if self._step(state, i) is not None)  # the literal, then more
            allow, ids = True, sorted(good)
        hit = (allow, torch.tensor(ids, dtype=torch.long, device=device))
        if len(self._masks) > 512:
            self._masks.clear()
        self._masks[key] = hit
        return hit

    def state_for(self, output_ids: Sequence[int]) -> State | None:
        """Grammar state after `output_ids` (reuses the longest common prefix with the previous call)."""
        n = len(self._ids)
        if len(output_ids) < n or list(output_ids[:n]) != self._ids:
            n = 0
            limit = min(len(self._ids), len(output_ids))
            while n < limit and self._ids[n] == output_ids[n]:
                n += 1
        del self._ids[n:], self._states[n + 1 :]
        for t in output_ids[n:]:
            self._states.append(self._step(self._states[-1], int(t)))
            self._ids.append(int(t))
        return self._states[-1]

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        state = self.state_for(output_ids)
        if state is None or state[0] == "done":
            return logits  # left the grammar (not enforced on some step) or finished: do not mask
        allow, ids = self._mask(state, logits.device)
        if not allow:
            return logits.index_fill(-1, ids, float("-inf"))
        out = torch.full_like(logits, float("-inf"))
        out[..., ids] = logits[..., ids]
        return out


def _string_attrs(schema: Any) -> tuple[str, ...]:
    types = schema_types(schema)
    if types == {"string"}:
        return ("true",)
    return ("false",) if "string" not in types else ("true", "false")


def build_tool_call_processor(
    tokenizer: Tokenizer,
    tools: Sequence[Any] | None,
    tool_choice: Any,
    *,
    parallel_tool_calls: bool = True,
    thinking: bool = False,
    max_free_tokens: int | None = None,
) -> Callable[[Sequence[int], torch.Tensor], torch.Tensor] | None:
    """A processor for `tool_choice` "required" or `{"type": "function", "function": {"name": N}}`; else None.

    `thinking`: the prompt ended with `<think>`, so reasoning (free text up to `</think>`) comes first.
    `max_free_tokens`: force a free segment (reasoning / a value) shut after this many tokens (None: unbounded).
    """
    specs = function_specs(tools)
    if tool_choice == "required":
        names = [fn["name"] for fn in specs]
    elif isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
        names = [tool_choice["function"].get("name")]
        if names[0] not in {fn["name"] for fn in specs}:
            raise ValueError(f"tool_choice names function {names[0]!r}, which is not in tools")
    else:
        return None
    if not names:
        raise ValueError('tool_choice "required" needs at least one tool')
    return ToolCallConstraint(
        tokenizer,
        tools or (),
        names,
        parallel_tool_calls=parallel_tool_calls,
        thinking=thinking,
        max_free_tokens=max_free_tokens,
    )
