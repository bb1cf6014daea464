"""CPU-only installs without Triton: the kernel wrappers, the fast path's modules and the engine still import (each
wrapper falls back to its torch reference; Triton-only modules such as moe_kernels are imported behind a guard), in
a fresh process where importing triton raises ImportError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import ds4f.kernels, ds4f.kernels.indexer, ds4f.kernels.moe, ds4f.kernels.moe_mxfp4, ds4f.kernels.fp8_gemm
import ds4f.runner.gpu.fast_model, ds4f.runner.model_runner, ds4f.engine.llm, ds4f.distributed.symm
print("ok")
"""


def test_imports_without_triton() -> None:
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", CODE, root], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
