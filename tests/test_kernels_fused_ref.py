"""Fused fast-path kernels (RoPE, mHC step, router) on CPU: torch references vs the reference model's code, and the
Triton kernels under TRITON_INTERPRET=1 (tiny shapes, in a subprocess so the interpreter setting cannot leak) vs the
references."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds4f.kernels import mhc
from ds4f.kernels.mhc import hc_step, hc_step_ref
from ds4f.kernels.rope import norm_rope, norm_rope_ref, rope_, rope_ref
from ds4f.kernels.router import route, route_ref
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.deepseek_v4 import Block
from ds4f.model.layers import RMSNorm, Rope, rms_normalize
from ds4f.model.mhc import hc_mix, hc_post
from ds4f.model.moe import Gate

ROOT = Path(__file__).resolve().parents[1]


def _rope_case(t: int = 5, h: int = 3, hd: int = 24, rd: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rope = Rope(rd, 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)))
    pos = torch.randint(0, 5000, (t,), generator=g)
    cos, sin = rope.cos_sin(pos)
    x = torch.randn(t, h, hd, generator=g).bfloat16()
    return rope, (cos, sin), x


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_ref_and_inplace_match_model_rope(inverse: bool) -> None:
    rope, cs, x = _rope_case()
    want = rope(x, cs, inverse=inverse)
    assert torch.equal(rope_ref(x, *cs, inverse), want)
    y = x.clone()
    assert rope_(y, *cs, inverse=inverse) is y and torch.equal(y, want)
    assert torch.equal(rope(rope_ref(want, *cs, not inverse).float(), cs, inverse=inverse).bfloat16().float()[..., :16],
                       x.float()[..., :16])  # the nope channels pass through untouched


def test_norm_rope_ref_matches_attention_q_and_kv() -> None:
    rope, cs, x = _rope_case()
    q_want = rope(rms_normalize(x.float(), 1e-6).to(x.dtype), cs)  # = model.attention q path
    assert torch.equal(norm_rope_ref(x, None, *cs, 1e-6), q_want)
    assert torch.equal(norm_rope(x, None, *cs, 1e-6), q_want)
    norm = RMSNorm(24, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    stacked = torch.randn(5, 40).bfloat16()
    kvr = stacked[:, 8:32]  # a column slice of a stacked projection, as FastModel passes it
    kv_want = rope(norm(kvr), cs)  # = model.attention kv path
    assert torch.equal(norm_rope_ref(kvr, norm.weight, *cs, 1e-6), kv_want)
    assert torch.equal(norm_rope(kvr, norm.weight, *cs, 1e-6), kv_want)


def _hc_case(t: int, d: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hc = 4
    nm = (2 + hc) * hc
    return dict(
        y=torch.randn(t, d, generator=g).to(dtype), x=torch.randn(t, hc, d, generator=g).to(dtype),
        post=2 * torch.rand(t, hc, generator=g), comb=torch.softmax(torch.randn(t, hc, hc, generator=g), -1),
        fn=torch.randn(nm, hc * d, generator=g) / (hc * d) ** 0.5, scale=torch.rand(3, generator=g) + 0.5,
        base=torch.randn(nm, generator=g) * 0.5, norm_w=torch.rand(d, generator=g) + 0.5)


def test_hc_step_ref_matches_block_mhc() -> None:
    """hc_step = the model Block's hc_post of one sublayer, then hc_mix + RMSNorm before the next."""
    args = ModelArgs.from_hf(tiny_config())
    blk = Block(args, 1, dtype=torch.float32)
    c = _hc_case(6, args.hidden_size, torch.bfloat16)
    for p in (blk.hc_ffn_fn, blk.hc_ffn_base, blk.hc_ffn_scale, blk.ffn_norm.weight):
        p.data.normal_(1.0, 0.3)
    x_want = hc_post(c["y"], c["x"], c["post"], c["comb"])
    col, p_want, cb_want = blk._mix(x_want, blk.hc_ffn_fn, blk.hc_ffn_scale, blk.hc_ffn_base)
    xn_want = blk.ffn_norm(col)
    for fn in (hc_step, hc_step_ref):  # hc_step on CPU dispatches to the reference
        x, xn, post, comb = fn(c["y"], c["x"], c["post"], c["comb"], blk.hc_ffn_fn, blk.hc_ffn_scale,
                               blk.hc_ffn_base, blk.ffn_norm.weight, args.hc_sinkhorn_iters, args.hc_eps,
                               args.rms_norm_eps, args.rms_norm_eps)
        assert torch.equal(x, x_want) and torch.equal(xn, xn_want)
        assert torch.equal(post, p_want) and torch.equal(comb, cb_want)
    x, *rest = hc_step(c["y"], c["x"], c["post"], c["comb"], None, None, None, None, 3, 1e-6, 1e-6, 1e-6)
    assert torch.equal(x, x_want) and rest == [None, None, None]
    x, xn, post, comb = hc_step(None, c["x"], None, None, c["fn"], c["scale"], c["base"], c["norm_w"], 3, 1e-6,
                                1e-6, 1e-6)
    col, p_want, cb_want = hc_mix(c["x"], c["fn"], c["scale"], c["base"], 4, 3, 1e-6, 1e-6)
    assert x is c["x"] and torch.equal(post, p_want) and torch.equal(comb, cb_want)


def _by_id(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Picks in id order (the top-k's order is unspecified)."""
    o = ids.long().sort(dim=1)
    return o.values, w.gather(1, o.indices)


def _route_case(t: int = 3, d: int = 40, e: int = 12, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, d, generator=g).bfloat16(), (torch.randn(e, d, generator=g) / d**0.5).bfloat16(),
            torch.randn(e, generator=g) * 0.1, torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(50)]),
            torch.randint(0, 50, (t,), generator=g))


def test_route_ref_matches_gate() -> None:
    args = ModelArgs.from_hf(tiny_config())
    hashed = [i for i in range(args.num_hidden_layers) if args.is_hash_layer(i)]
    learned = [i for i in range(args.num_hidden_layers) if not args.is_hash_layer(i)]
    assert hashed and learned
    for layer in (hashed[0], learned[0]):
        gate = Gate(args, layer, torch.bfloat16)
        x, w, bias, tid, ids = _route_case(d=args.hidden_size, e=args.n_routed_experts, k=gate.topk)
        gate.weight.data.copy_(w)
        if gate.hash:
            gate.tid2eid[: tid.shape[0]] = tid  # ids < 50
        else:
            gate.bias.data.copy_(bias)
        w_want, id_want = gate(x, ids)
        for sh in (-1, args.n_routed_experts):
            for fn in (route, route_ref):  # route on CPU dispatches to the reference
                got_ids, got_w = fn(x, gate.weight, gate.bias, gate.tid2eid if gate.hash else None, ids, gate.topk,
                                    gate.norm_topk, gate.scaling, sh)
                assert got_ids.dtype == torch.int32 and got_w.dtype == torch.float32
                if sh >= 0:
                    assert (got_ids[:, -1] == sh).all() and (got_w[:, -1] == 1).all()
                    got_ids, got_w = got_ids[:, :-1], got_w[:, :-1]
                gi, gw = _by_id(got_ids, got_w)
                wi, ww = _by_id(id_want, w_want)
                assert torch.equal(gi, wi) and torch.equal(gw, ww)


# ---- Triton kernels under the interpreter (a subprocess: TRITON_INTERPRET is read when the kernels are defined) ----
def _interpret_checks() -> None:
    sa = importlib.import_module("ds4f.kernels.sparse_attn")  # the module (the package re-exports a function)
    assert sa._INTERPRET and sa.HAS_TRITON, "run with TRITON_INTERPRET=1 and triton installed"
    # fp32 rows: the kernels' rounding is fp32's; bf16 rows: the interpreter rounds fp32 -> bf16 by truncation
    # (hardware rounds to nearest), so those may differ by a few bf16 ulps
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 3 * 2 ** -7)):
        for inverse in (False, True):
            _, cs, x = _rope_case()
            x = x.to(dtype)
            y = x.clone()
            rope_(y, *cs, inverse=inverse)
            _close(y, rope_ref(x, *cs, inverse), tol)
        _, cs, x = _rope_case(h=2)
        x = x.to(dtype)
        w = torch.rand(24) + 0.5
        _close(norm_rope(x, None, *cs, 1e-6), norm_rope_ref(x, None, *cs, 1e-6), tol)
        kvr = torch.randn(5, 40).to(dtype)[:, 8:32]
        _close(norm_rope(kvr, w, *cs, 1e-6), norm_rope_ref(kvr, w, *cs, 1e-6), tol)
    # mHC step: fp32 streams (exact up to fp32 sums); T = 3 (per-token programs), 17 (tl.dot tiles) and 17 again
    # with the many-token path (post kernel + GEMM mix) switched on from 16 tokens, D = 40
    for t, gemm_from in ((3, 256), (17, 256), (17, 16)):
        mhc.GEMM_MIX_MIN_T = gemm_from
        c = _hc_case(t, 40, torch.float32)
        full = (c["y"], c["x"], c["post"], c["comb"], c["fn"], c["scale"], c["base"], c["norm_w"])
        cases = [full, (None, c["x"], None, None, *full[4:]), (*full[:4], None, None, None, None)]
        for args in cases:
            got = hc_step(*args, 20, 1e-6, 1e-6, 1e-6)
            want = hc_step_ref(*args, 20, 1e-6, 1e-6, 1e-6)
            for g_, w_ in zip(got, want):
                assert (g_ is None) == (w_ is None)
                if g_ is not None:
                    _close(g_, w_, 2e-5)
    # bf16 streams: weights from the kernel's own X' must match the reference's on that X' (the bf16 x 3-way split
    # of fn in the tl.dot path is exact to fp32 rounding)
    for t, gemm_from in ((3, 256), (17, 256), (17, 16)):
        mhc.GEMM_MIX_MIN_T = gemm_from
        c = _hc_case(t, 40, torch.bfloat16)
        full = (c["y"], c["x"], c["post"], c["comb"], c["fn"], c["scale"], c["base"], c["norm_w"])
        xk, xn, post, comb = hc_step(*full, 20, 1e-6, 1e-6, 1e-6)
        _close(xk, hc_step_ref(*full[:4], None, None, None, None, 20, 1e-6, 1e-6, 1e-6)[0], 3 * 2**-7)
        _, xn_w, post_w, comb_w = hc_step_ref(None, xk, None, None, *full[4:], 20, 1e-6, 1e-6, 1e-6)
        _close(post, post_w, 2e-5)
        _close(comb, comb_w, 2e-5)
        _close(xn, xn_w, 3 * 2**-7)
    mhc.GEMM_MIX_MIN_T = 256
    # router: learned top-k and hashed, with and without the shared pick
    x, w, bias, tid, ids = _route_case(d=300)  # 2 partial-logit chunks, the second masked
    for b, h in ((bias, None), (None, tid)):
        for sh in (-1, 12):
            gi, gw = _by_id(*route(x, w, b, h, ids, 3, True, 1.5, sh))
            wi, ww = _by_id(*route_ref(x, w, b, h, ids, 3, True, 1.5, sh))
            assert torch.equal(gi, wi)
            _close(gw, ww, 1e-6)
    print("interpret ok")


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = ((a.float() - b.float()).abs() / (b.float().abs() + 1)).max().item()
    assert err <= tol, err


def test_triton_kernels_interpreted() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and "interpret ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


if __name__ == "__main__":
    _interpret_checks()
