"""Detokenize stage: one request's output token ids, one at a time, in; new text (whole characters only) out.

The prefix/read-offset scheme of HF TextStreamer and vLLM's detokenize_incrementally: decode a short window
ids[prefix:] and emit what it adds over ids[prefix:read]; while the window's text ends in U+FFFD (a character whose
bytes are split over tokens, e.g. an emoji or a CJK character in byte-level BPE) nothing is emitted and the offsets
stay, so a delta never carries a broken character.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens kept as decode context (vLLM INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class _Tokenizer(Protocol):
    @property
    def all_special_ids(self) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """NOTE: text only ever grows, and text + flush() == tokenizer.decode(ids) for byte-level BPE.

    spaces_between_special_tokens is accepted for vLLM compatibility; with a `tokenizers` (fast) tokenizer whose
    decoder is byte-level, vLLM's fast detokenizer never inserts spaces between special tokens either way.
    """

    def __init__(self, tokenizer: _Tokenizer, prompt_token_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._skipped: frozenset[int] = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        # Skipped ids never enter the window: they decode to nothing and would only grow it.
        prompt = [t for t in prompt_token_ids or () if t not in self._skipped]
        self._ids: list[int] = prompt[-PROMPT_CONTEXT:]
        self._prefix = 0  # ids[prefix:read] is context already emitted (or prompt)
        self._read = len(self._ids)  # ids[read:] is not emitted yet
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token id; return the text it completes ("" while a character is still partial)."""
        if token_id in self._skipped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        # ids before the old read offset are never looked at again
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit what is held back (at the end of generation: an unfinished character decodes to U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(prefix_text):]
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        self.text += delta
        return delta
