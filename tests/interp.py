"""Run a test module's check function in a fresh process under TRITON_INTERPRET=1 (triton.jit picks the
interpreter when a kernel is defined), with the two fixes Triton 3.6's interpreter needs under numpy 2: a runtime
loop bound (a 1-element array) as a Python int, and tl.dot of bf16 operands (held as uint16 bits) through fp32."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PRELUDE = """
import numpy as np, torch, triton.language as tl, triton.runtime.interpreter as ti
orig_patch, orig_dot = ti._patch_lang_tensor, ti.InterpreterBuilder.create_dot
def patch(tensor, scope):
    orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
def f32(x):
    if x.dtype.scalar != tl.bfloat16:
        return x
    return ti.TensorHandle(ti._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
ti._patch_lang_tensor = patch
ti.InterpreterBuilder.create_dot = lambda self, a, b, d, *rest: orig_dot(self, f32(a), f32(b), d, *rest)
import sys
sys.path.insert(0, sys.argv[1])
"""


def run_interpreted(module: str, func: str, timeout: float = 600) -> str:
    """tests/<module>.py's `func()` under the interpreter -> its stdout (fails the caller on a non-zero exit)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    code = PRELUDE + f"from {module} import {func}\n{func}()\n"
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout
