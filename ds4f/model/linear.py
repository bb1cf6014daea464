"""⑥ model: the one Linear every projection uses; holds the compute-dtype weight and, when the checkpoint
stores it quantized, the packed tensors for the GPU kernels (fp8 e4m3 + 128x128 block scales, or MXFP4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Opt-in: bf16 CUDA inputs of fp8 Linears run the block-FP8 Triton GEMM on the packed tensors (ds4f/kernels/fp8_gemm)
# instead of F.linear on the dequantized weight. Off until the fast path turns it on; CPU behaviour never changes.
USE_FP8_GEMM = False


class Linear(nn.Module):
    """y = x @ weight.T. `fmt` is the checkpoint storage format of this weight: "bf16" | "fp8" | "fp4".

    weight: [out_features, in_features] in the compute dtype (dequantized at load on CPU).
    packed_weight / packed_scale: the tensors as shipped (None for bf16), kept for the quantized GEMM kernels.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16", dtype: torch.dtype | None = None):
        super().__init__()
        assert fmt in ("bf16", "fp8", "fp4"), fmt
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.packed_weight: torch.Tensor | None = None
        self.packed_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (USE_FP8_GEMM and self.fmt == "fp8" and self.packed_weight is not None and x.is_cuda
                and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16):
            from ds4f.kernels.fp8_gemm import fp8_linear

            return fp8_linear(x, self.packed_weight, self.packed_scale, torch.bfloat16)
        return F.linear(x.to(self.weight.dtype), self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}"
