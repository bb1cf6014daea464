"""ds4f: DeepSeek-V4-Flash served yourself. `from ds4f import LLM, SamplingParams`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ds4f.engine.llm import LLM
    from ds4f.sample.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so `import ds4f` (CLI, server) stays cheap and never pulls torch before it is needed.
    if name == "LLM":
        from ds4f.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from ds4f.sample.params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
