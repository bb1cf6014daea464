"""⑤ runner GPU fast path: reference weights + paged flat pools in, batched graph-captured forward out."""

from __future__ import annotations

from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache, StepMeta

__all__ = ["FastCache", "FastModel", "StepMeta"]
