"""⑥ kernels: GPU fast-path Triton kernels (activations + flat slot pools in, activations out), torch refs on CPU."""

from __future__ import annotations

from ds4f.kernels.fp8 import dequantize_rows, quantize_rows
from ds4f.kernels.indexer import indexer_scores, topk_indices
from ds4f.kernels.moe import fused_moe, moe_align
from ds4f.kernels.sparse_attn import HAS_TRITON, sparse_attn

__all__ = [
    "HAS_TRITON",
    "dequantize_rows",
    "fused_moe",
    "indexer_scores",
    "moe_align",
    "quantize_rows",
    "sparse_attn",
    "topk_indices",
]
