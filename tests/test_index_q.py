"""The indexer query kernel (ds4f/kernels/index_q.py) under TRITON_INTERPRET=1 against the composition it replaces
(rope_, the head weights' scale, quant_heads_fp8) bit for bit, bf16 and e4m3; quant_heads_fp8's scale checked
against its definition (the smallest power of two putting each head's amax at or below 448), edge cases included."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted

from ds4f.kernels.index_q import index_q, index_q_ref, quant_heads_fp8
from ds4f.kernels.rope import rope_ref


def _inputs(g: torch.Generator, t: int, h: int, hd: int, half: int) -> tuple[torch.Tensor, ...]:
    mags = torch.logspace(-3, 3, h)  # heads over six decades
    q = (torch.randn(t, h, hd, generator=g) * mags[None, :, None]).bfloat16()
    q[0, 1] = 0  # an all-zero head: amax clamped to 1e-30
    q[1, 2] = 0.5
    q[1, 2, 5] = 1.75 * 2**3  # amax with mantissa exactly 1.75 (amax / 448 a power of two) ...
    q[2, 3] = 0.01
    q[2, 3, 7] = 1.7578125 * 2**-2  # ... and the next bf16 above it
    wide = torch.randn(t, 3 * h, generator=g).bfloat16()
    ang = torch.rand(t, half, generator=g) * 6.3
    return q, wide[:, h: 2 * h], ang.cos(), ang.sin()


def check_index_q() -> None:
    g = torch.Generator().manual_seed(0)
    for t, h, hd, half in ((3, 8, 32, 8), (4, 16, 64, 16)):
        q, w, cos, sin = _inputs(g, t, h, hd, half)
        want_rot = rope_ref(q, cos, sin, False)
        for fp8 in (False, True):
            q1, q2 = q.clone(), q.clone()
            zero = torch.full((4 * t * 256 + 2 * t + 5,), 7, dtype=torch.int32)  # the histogram buffer, dirty
            got_q, got_w = index_q(q1, w, cos, sin, 0.125, fp8, zero=zero[: -5])
            assert not zero[: -5].any() and (zero[-5:] == 7).all(), (t, fp8)  # cleared by the launch, not past it
            want_q, want_w = index_q_ref(q2, w, cos, sin, 0.125, fp8)
            assert torch.equal(q1, q2), (t, fp8)  # rotated in place, rope_'s bits
            # the rotation itself (the interpreter rounds fp32 -> bf16 toward zero: one bf16 step apart at most)
            torch.testing.assert_close(q1.float(), want_rot.float(), rtol=2**-7, atol=1e-6)
            assert got_w.dtype == torch.float32 and torch.equal(got_w, want_w), (t, fp8)  # scale and weights exact
            # (fp8: w carries the per-head scale, so the scale's exponent logic is checked bit for bit above; the
            # e4m3 bytes are the GPU test's: Triton 3.6's interpreter converts fp32 -> e4m3 wrongly, 124.5 -> 64)
            assert got_q.dtype == want_q.dtype and got_q.shape == want_q.shape
    print("INDEX_Q_OK")


def test_index_q_interpreted() -> None:
    pytest.importorskip("triton")
    assert "INDEX_Q_OK" in run_interpreted("test_index_q", "check_index_q")


def test_quant_heads_scale_is_the_smallest_power_of_two() -> None:
    g = torch.Generator().manual_seed(1)
    q, _, _, _ = _inputs(g, 3, 8, 32, 8)
    q8, s = quant_heads_fp8(q)
    amax = q.float().abs().amax(-1).clamp(min=1e-30)
    mant, _ = torch.frexp(s)
    assert torch.all(mant == 0.5), "a power of two"
    assert torch.all(amax / s <= 448) and torch.all(amax / (s / 2) > 448)
    assert s[1, 2] == 2**3 * 1.75 / 448 and s[2, 3] == 2 * 2**-2 * 1.75 / 448  # on and just past the edge
    err = (q8.float() * s[..., None] - q.float()).abs()
    assert torch.all(err <= amax[..., None] * 2**-3)  # e4m3 rounding: 3 mantissa bits
    # the composition on CPU (no triton there): index_q is index_q_ref
    qa, qb = q.clone(), q.clone()
    w = torch.randn(3, 8, generator=g)
    cos, sin = torch.ones(3, 8), torch.zeros(3, 8)
    for x, y in zip(index_q(qa, w, cos, sin, 0.5, True), index_q_ref(qb, w, cos, sin, 0.5, True)):
        assert torch.equal(x.float(), y.float())


@torch.no_grad()
def test_fast_model_with_index_q_gives_the_same_logits() -> None:
    """FastModel on CPU (kernels' torch paths) with DS4F_INDEX_Q's path and without: prompt chunks past the indexer's
    top-k (CSA scoring runs), then decode steps: the same logits."""
    from ds4f.model.args import ModelArgs, tiny_config
    from ds4f.model.deepseek_v4 import Transformer, init_random_
    from ds4f.runner.gpu.fast_model import FastModel
    from ds4f.runner.gpu.pools import FastCache

    cfg = tiny_config()
    cfg["index_topk"] = 4
    args = ModelArgs.from_hf(cfg)
    fm = FastModel(init_random_(Transformer(args, dtype=torch.bfloat16), seed=0), max_pos=512 + 32)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, args.vocab_size, (120,), generator=g).tolist()
    out = []
    for flag in (False, True):
        fm.index_q = flag
        cache = FastCache(args, max_seqs=2, num_blocks=32, block_size=32, max_ctx=512, max_tokens=128, device="cpu")
        steps = [[(0, 0, ids[:60])], [(0, 60, ids[60:])], [(0, 120, [5])], [(0, 121, [9])]]
        out.append([fm.logits(fm.forward(m, cache), m) for m in (cache.build_meta(s, fm.ratios) for s in steps)])
    for a, b in zip(*out):
        assert torch.equal(a, b)
