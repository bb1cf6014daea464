"""⑦ the push all-reduce's ADD form on one GPU (world 1: no peers, so the launch is the term's add, the rounding and
the store): bf16(x + extra) with one rounding, as torch rounds an fp32 sum, for T = 1 / 4 rows of 4096, eagerly
and from a CUDA graph replayed on new data; plain calls interleaved on the same programs. The two-rank exchange is
tests/gpu/test_symm_allreduce.py's (2 GPUs) and the interpreter's (tests/test_push_allreduce_build.py)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")]


def test_push_add_rounds_once() -> None:
    from ds4f.kernels import push_allreduce as pa

    dev = torch.device("cuda")
    cap, block = 16384, 1024
    region = torch.zeros(pa.region_numel(1, cap, block), dtype=torch.bfloat16, device=dev)
    ar = pa.PushAllReduce([region.data_ptr()], 0, 1, cap, dev, block=block, warps=4, timeout_s=10)
    for t in (1, 4):
        x = torch.randn(t, 4096, device=dev) * 3 + 2 ** -12
        ex = torch.randn(t, 4096, device=dev).bfloat16()
        got = ar(x, ex)
        assert got.dtype == torch.bfloat16 and torch.equal(got, (x + ex.float()).bfloat16()), t
        plain = x.bfloat16()
        assert torch.equal(ar(plain), plain)
        xs, es = x.clone(), ex.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = ar(xs, es)
        for seed in range(3):
            gen = torch.Generator(device=dev).manual_seed(seed)
            xs.copy_(torch.randn(t, 4096, device=dev, generator=gen))
            es.copy_(torch.randn(t, 4096, device=dev, generator=gen).bfloat16())
            g.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, (xs + es.float()).bfloat16()), (t, seed)
    assert ar.error() == 0
