"""⑥ model resolution: a model name (None / "ds4f-tiny" / directory / HF repo id) in, ResolvedModel(path, args) out.

Repo ids resolve offline, from the local Hugging Face cache only; nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ds4f.model.args import ModelArgs, tiny_config

TINY_NAME = "ds4f-tiny"


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally; the message lists where ds4f looked and how to fix it."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path | None  # checkpoint directory (config.json + *.safetensors); None = built-in tiny model
    args: ModelArgs
    tokenizer_path: Path | None  # directory holding tokenizer.json, if the checkpoint ships one

    @property
    def is_builtin(self) -> bool:
        return self.path is None


def hf_hub_cache() -> Path:
    """The HF hub cache directory, read from the environment now (not at import), as huggingface_hub defines it."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _from_dir(path: Path) -> ResolvedModel:
    args = ModelArgs.from_file(path / "config.json")
    tok = path if (path / "tokenizer.json").is_file() else None
    return ResolvedModel(path=path, args=args, tokenizer_path=tok)


def _looks_like_repo_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def _snapshot_dir(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if revision is not None:
        return None
    # no refs/main (e.g. fetched at a pinned commit): take the newest snapshot that holds a config.json
    snaps = [p for p in (cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*")
             if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve_model(model: str | None) -> ResolvedModel:
    """None / "ds4f-tiny" -> built-in tiny; an existing directory with config.json; else an HF repo id
    ("org/name" or "org/name@revision") looked up in the local HF cache (HF_HUB_CACHE / HF_HOME honoured)."""
    if model is None or model == TINY_NAME:
        return ResolvedModel(path=None, args=ModelArgs.from_hf(tiny_config()), tokenizer_path=None)
    looked: list[str] = []
    local = Path(model).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return _from_dir(local.resolve())
        raise ModelNotFoundError(
            f"{local.resolve()} is a directory but has no config.json; pass a DeepSeek-V4 checkpoint directory "
            f"(config.json + *.safetensors)")
    looked.append(f"local directory {local.resolve()} (does not exist)")
    if _looks_like_repo_id(model):
        repo_id, _, revision = model.partition("@")
        cache = hf_hub_cache()
        snap = _snapshot_dir(repo_id, revision or None, cache)
        repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
        if snap is not None and (snap / "config.json").is_file():
            return _from_dir(snap)
        why = "snapshot has no config.json" if snap is not None else "not in the cache"
        looked.append(f"Hugging Face cache {repo_dir} ({why}; cache root from HF_HUB_CACHE / HF_HOME: {cache})")
        fix = (f"download it first with `hf download {repo_id}` (or set HF_HUB_CACHE / HF_HOME to the cache that "
               f"holds it), or pass the checkpoint directory itself")
    else:
        fix = "pass an existing checkpoint directory, a Hugging Face repo id (org/name) or 'ds4f-tiny'"
    raise ModelNotFoundError(
        f"model {model!r} not found locally; looked in: " + "; ".join(looked) + f". To fix: {fix}.")
