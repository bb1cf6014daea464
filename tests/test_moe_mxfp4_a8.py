"""⑥ kernels, the FP8-activation MXFP4 decode (moe_mxfp4_a8) on CPU: its oracle against the checkpoint's scheme
written out, the Triton kernels under TRITON_INTERPRET=1 against that oracle, the dispatch and its env switch, and
offline builds for sm_90 / sm_121 (shared memory, e4m3 MMAs, the PTX placement). The PTX placement itself is
checked for every byte on the GPU (tests/gpu/test_moe_mxfp4_a8_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.fp8_gemm import quant_act_ref
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4_ref
from ds4f.kernels.moe_mxfp4_a8 import fused_moe_mxfp4_a8_ref
from ds4f.model.quant import dequant_mxfp4, quant_mxfp4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(E: int, D: int, I: int, T: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)

    def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qs = [quant_mxfp4(w[e]) for e in range(w.shape[0])]
        return torch.stack([q for q, _ in qs]).view(torch.uint8), torch.stack([s for _, s in qs]).view(torch.uint8)

    w13q, w13s = pack(torch.randn(E, 2 * I, D, generator=g) * 0.3)
    w2q, w2s = pack(torch.randn(E, D, I, generator=g) * 0.3)
    x = (torch.randn(T, D, generator=g) * torch.rand(T, D // 128, 1, generator=g).repeat(1, 1, 128).view(T, D)
         * 8).bfloat16()  # per-128-column blocks of different magnitude
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    wts = torch.rand(T, k, generator=g)
    return x, w13q, w13s, w2q, w2s, ids, wts


def test_oracle_is_the_checkpoint_scheme_written_out():
    """x and the activation quantized to e4m3 per token per 128 columns (pow2 scales), dequantized experts, fp32."""
    x, w13q, w13s, w2q, w2s, ids, wts = _case(5, 256, 128, 3, 2, seed=1)
    got = fused_moe_mxfp4_a8_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    want = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        q, s = quant_act_ref(x[t:t + 1])
        xq = q.float() * s.repeat_interleave(128, 1)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = xq @ dequant_mxfp4(w13q[e], w13s[e], torch.float32).t()
            g, u = h[:, :128], h[:, 128:]
            a = (torch.nn.functional.silu(g.clamp(max=10.0)) * u.clamp(-10.0, 10.0)).bfloat16()
            qa, sa = quant_act_ref(a)
            aq = qa.float() * sa.repeat_interleave(128, 1)
            want[t] += float(wts[t, j]) * (aq @ dequant_mxfp4(w2q[e], w2s[e], torch.float32).t())[0]
    assert _rel(got, want.bfloat16()) < 1e-2 * 2**-7  # bf16 rounding of the sum only
    # the quantization is there: the bf16-activation oracle differs by e4m3 rounding (a few percent)
    assert 5e-3 < _rel(got, fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)) < 0.1


def check_interpreted() -> None:
    """The two launches (K splits with arrival sums, 128 / 256 / 512-column steps, 16-64-row tiles) against the
    oracle; the shared expert's output; counters re-armed; the dispatch: A8 with no DEC takes the kernels too."""
    from ds4f.kernels import arrival
    from ds4f.kernels import moe_mxfp4 as mm
    from ds4f.kernels import moe_mxfp4_a8 as a8

    for D, I, tiles in [(256, 256, (32, 128, 2, 4, 1, 16, 128, 2, 4, 1)),
                        (256, 256, (64, 256, 1, 4, 1, 64, 256, 1, 4, 1)),
                        (512, 128, (16, 512, 1, 4, 1, 32, 128, 1, 4, 1))]:
        x, w13q, w13s, w2q, w2s, ids, wts = _case(5, D, I, 3, 2, seed=D + I)
        ids[-1, 1] = ids[-1, 0]  # a repeated expert inside one token's picks
        ref = fused_moe_mxfp4_a8_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
        out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=1))
        assert _rel(out, ref) < 1e-3, (tiles, _rel(out, ref))
        sh = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
        out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=1),
                                 shared_out=sh)
        assert _rel(out, ref.float() + sh.float()) < 5e-3, tiles  # two bf16 roundings in the oracle, one here
    assert all(int(b.abs().sum()) == 0 for n in ("mxfp4_a8_up", "mxfp4_a8_down") for b in arrival.buffers(n))
    calls: list[int] = []
    real = a8.moe_decode_a8
    a8.moe_decode_a8 = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=0))
    assert calls == []
    mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=1))
    assert calls == [1]
    print("ok")


def check_xb_interpreted() -> None:
    """XB (x's B operands built once per token by _a8_expand, read by every up program) and XB_DOWN (the same for
    the activation rows the down kernel reads): bit for bit the per-program build, at 128 / 256 / 512-column steps
    with K splits, T = 1 and 3 (repeated experts)."""
    from ds4f.kernels import moe_mxfp4 as mm
    from ds4f.kernels import moe_mxfp4_a8 as a8

    keep = a8.XB, a8.XB_DOWN, a8.HALF
    a8.HALF = ()  # HALF builds x's operands whatever XB says
    for D, I, T, tiles in [(256, 256, 3, (32, 128, 2, 4, 1, 16, 128, 2, 4, 1)),
                           (1024, 128, 1, (16, 512, 2, 4, 1, 32, 128, 1, 4, 1)),
                           (512, 256, 3, (64, 256, 1, 4, 1, 64, 256, 1, 4, 1))]:
        x, w13q, w13s, w2q, w2s, ids, wts = _case(5, D, I, T, 2, seed=D + I + T)
        ids[-1, 1] = ids[-1, 0]
        outs = []
        for xb in (False, True):
            a8.XB = xb
            a8.XB_DOWN = (1, 4) if xb else ()
            act: list[torch.Tensor] = []
            out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=1))
            x2 = x.clone()
            a8.moe_decode_a8(x2, (w13q, w13s), (w2q, w2s), ids, wts, 10.0, None,
                             (tuple(tiles[:5]), tuple(tiles[5:])), act_out=act)
            outs.append((out, act[0]))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), tiles
    a8.XB, a8.XB_DOWN, a8.HALF = keep
    print("ok")


def check_half_interpreted() -> None:
    """HALF (the up kernel's gate and up rows in separate programs, met by arrival): the activation rows and the
    output bit for bit the two-half program's with XB (same operands, same dots, the partials summed in slice
    order), at 1 / 2-way K splits, T = 1 and 3 with a repeated expert; the counters re-armed."""
    from ds4f.kernels import arrival
    from ds4f.kernels import moe_mxfp4_a8 as a8

    keep = a8.XB, a8.HALF
    a8.XB = True
    for D, I, T, tiles in [(256, 256, 3, (32, 128, 2, 4, 1, 16, 128, 2, 4, 1)),
                           (512, 128, 1, (16, 256, 1, 4, 1, 32, 128, 1, 4, 1)),
                           (512, 256, 3, (64, 256, 1, 4, 1, 64, 256, 1, 4, 1))]:
        x, w13q, w13s, w2q, w2s, ids, wts = _case(5, D, I, T, 2, seed=D + I + T + 7)
        ids[-1, 1] = ids[-1, 0]
        outs = []
        for half in ((), (1, 4)):
            a8.HALF = half
            act: list[torch.Tensor] = []
            out = a8.moe_decode_a8(x, (w13q, w13s), (w2q, w2s), ids, wts, 10.0, None,
                                   (tuple(tiles[:5]), tuple(tiles[5:])), act_out=act)
            outs.append((out, act[0]))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), tiles
        ref = fused_moe_mxfp4_a8_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
        assert _rel(outs[1][0], ref) < 1e-3, tiles
    a8.XB, a8.HALF = keep
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("mxfp4_a8_up"))
    print("ok")


def check_out_f32_interpreted() -> None:
    """out_f32 / defer_shared: the down kernel's fp32 pick sum plus the shared expert's output, rounded once to bf16
    (what Comm.all_reduce_add computes), gives the bits of the down kernel that adds it itself, at one pick per program
    (arrival sums) and at k picks per program (no arrival); fused_moe_mxfp4 returns fp32 only on the FP8-activation
    decode path and bf16 with the term added elsewhere."""
    from ds4f.kernels import moe_mxfp4 as mm
    from ds4f.kernels import moe_mxfp4_a8 as a8

    keep = a8.DOWN_PICKS
    D, I, T, k = 256, 256, 3, 2
    tiles = (32, 128, 2, 4, 1, 16, 128, 2, 4, 1)
    x, w13q, w13s, w2q, w2s, ids, wts = _case(5, D, I, T, k, seed=91)
    ids[-1, 1] = ids[-1, 0]
    sh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    cfgs = (tuple(tiles[:5]), tuple(tiles[5:]))
    for ppp in (1, k):
        a8.DOWN_PICKS = {1: ppp, 4: ppp}
        fused = a8.moe_decode_a8(x, (w13q, w13s), (w2q, w2s), ids, wts, 10.0, sh, cfgs)
        y32 = a8.moe_decode_a8(x, (w13q, w13s), (w2q, w2s), ids, wts, 10.0, None, cfgs, out_f32=True)
        assert y32.dtype == torch.float32 and torch.equal((y32 + sh.float()).bfloat16(), fused), ppp
    a8.DOWN_PICKS = keep
    y = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=1), shared_out=sh,
                           defer_shared=True)
    assert y.dtype == torch.float32
    y16 = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=0), shared_out=sh,
                             defer_shared=True)  # the bf16-activation kernels: the term added there
    ref = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, A8=0), shared_out=sh)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, ref)
    print("ok")


def check_down_picks_interpreted() -> None:
    """DOWN_PICKS: PPP picks per down program (one loop over (pick, K block) steps) against one pick per program:
    bit for bit at PPP = k (the picks summed in the same order, no arrival sums), within the bf16 rounding of the
    pick sum's grouping below it; with and without XB_DOWN and the shared expert, repeated experts, K splits;
    the arrival counters re-armed."""
    from ds4f.kernels import arrival
    from ds4f.kernels import moe_mxfp4 as mm
    from ds4f.kernels import moe_mxfp4_a8 as a8

    keep = a8.DOWN_PICKS, a8.XB_DOWN
    for D, I, T, k, tiles in [(256, 256, 3, 6, (32, 128, 2, 4, 1, 16, 128, 2, 4, 1)),
                              (512, 256, 2, 6, (64, 256, 1, 4, 1, 64, 128, 1, 4, 1)),
                              (256, 512, 1, 2, (64, 256, 1, 4, 1, 32, 512, 1, 4, 1))]:
        x, w13q, w13s, w2q, w2s, ids, wts = _case(8, D, I, T, k, seed=D + I + T + k)
        ids[-1, 1] = ids[-1, 0]
        sh = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
        ref = fused_moe_mxfp4_a8_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
        for xbd in ((), (1, 4)) if k == 2 else ((1, 4),):
            a8.XB_DOWN = xbd
            outs = {}
            for ppp in sorted({1, 3, k} & {p for p in range(1, k + 1) if k % p == 0}):
                a8.DOWN_PICKS = {1: ppp, 4: ppp}
                assert a8.down_picks(T, k) == ppp
                cfg = dict(DEC=tiles, A8=1)
                outs[ppp] = (mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=cfg),
                             mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=cfg, shared_out=sh))
            for ppp, (o, o_sh) in outs.items():
                if ppp in (1, k):
                    assert torch.equal(o, outs[1][0]) and torch.equal(o_sh, outs[1][1]), (tiles, ppp)
                assert _rel(o, outs[1][0]) < 1e-2 * 2**-7 and _rel(o, ref) < 1e-3, (tiles, ppp)
    a8.DOWN_PICKS, a8.XB_DOWN = keep
    assert a8.down_picks(1, 5) == 1  # a bucket's PPP that does not divide k: one pick per program
    assert all(int(b.abs().sum()) == 0 for n in ("mxfp4_a8_up", "mxfp4_a8_down") for b in arrival.buffers(n))
    print("ok")


def test_kernels_in_the_interpreter_match_the_oracle():
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    assert run_interpreted("test_moe_mxfp4_a8", "check_interpreted").strip().endswith("ok")


def test_xb_operands_match_the_per_program_build():
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    assert run_interpreted("test_moe_mxfp4_a8", "check_xb_interpreted").strip().endswith("ok")


def test_half_programs_match_the_two_half_program():
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    assert run_interpreted("test_moe_mxfp4_a8", "check_half_interpreted").strip().endswith("ok")


@pytest.mark.parametrize("arch", [90, 121])
def test_half_kernel_builds_offline(arch):
    """HALF at the four-token table tile: one weight tile per step through cp.async, the e4m3 MMA, the arrival
    counter; fewer registers than the two-half program (sm_90: the cap that held it to 2 blocks per SM)."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_mxfp4_a8 as a8
    from tests.test_kernels_build import build

    up = a8.CONFIGS[(4096, 1024, 4)][0]
    types = dict(_PTRS, xb_ptr="*fp8e4nv", xs_ptr="*fp32")
    div = tuple(n for n in a8._a8_up.arg_names if n in types and n != "limit" or n.startswith("s_"))
    consts = dict(I=1024, DM=4096, TOPK=6, BLOCK_N=up[0], BLOCK_K=up[1], SPLIT=up[2], F32=0, XB=1)
    two = build(a8._a8_up, types, consts, arch, up[3], up[4], div16=div)
    one = build(a8._a8_up, types, dict(consts, HALF=1), arch, up[3], up[4], div16=div)
    assert "atom" in one["ptx"] and "e4m3" in one["ptx"] and "cp.async" in one["ptx"]
    print("regs", arch, two.get("n_regs"), one.get("n_regs"), "smem", two.get("shared"), one.get("shared"))


def test_out_f32_plus_the_shared_term_matches_the_fused_add():
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    assert run_interpreted("test_moe_mxfp4_a8", "check_out_f32_interpreted").strip().endswith("ok")


def test_down_picks_match_one_pick_per_program():
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    assert run_interpreted("test_moe_mxfp4_a8", "check_down_picks_interpreted").strip().endswith("ok")


def test_bucket_env_parsing(monkeypatch):
    from ds4f.kernels import moe_mxfp4_a8 as a8

    monkeypatch.setenv("DS4F_MXFP4_A8_HALF", "1,4")
    assert a8.env_buckets("DS4F_MXFP4_A8_HALF", "1") == (1, 4)
    monkeypatch.setenv("DS4F_MXFP4_A8_HALF", "")
    assert a8.env_buckets("DS4F_MXFP4_A8_HALF", "1") == ()
    monkeypatch.setenv("DS4F_MXFP4_A8_XB_DOWN", "four")
    with pytest.raises(ValueError, match="DS4F_MXFP4_A8_XB_DOWN='four'"):
        a8.env_buckets("DS4F_MXFP4_A8_XB_DOWN", "4")


def test_down_picks_env_parsing():
    from ds4f.kernels import moe_mxfp4_a8 as a8

    assert a8._down_picks_env("1:1,4:6") == {1: 1, 4: 6} and a8._down_picks_env("") == {}
    with pytest.raises(ValueError, match="DS4F_MXFP4_A8_DOWN_PICKS='4-2'"):
        a8._down_picks_env("4-2")


@pytest.mark.parametrize("arch", [90, 121])
def test_down_picks_kernels_build_offline(arch):
    """The down kernel with 6 picks per program (no arrival sum: no atomic) and with 3 (two groups' arrival sum):
    the weight tiles stream through cp.async across the picks' steps."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_mxfp4_a8 as a8
    from tests.test_kernels_build import build

    types = dict(_PTRS, xb_ptr="*fp8e4nv", xs_ptr="*fp32")
    down = a8.CONFIGS[(4096, 1024, 4)][1]
    div = tuple(n for n in a8._a8_down.arg_names if n in types and n != "limit" or n.startswith("s_"))
    consts = dict(DM=4096, I=1024, TOPK=6, BLOCK_N=down[0], BLOCK_K=down[1], SPLIT=down[2], HAS_SH=1, F32=0, XB=1)
    for ppp in (6, 3):
        k = build(a8._a8_down, types, dict(consts, PPP=ppp), arch, down[3], down[4], div16=div)
        assert ("atom" in k["ptx"]) == (ppp < 6) and "cp.async.cg" in k["ptx"] and "e4m3" in k["ptx"], ppp


@pytest.mark.parametrize("arch", [90, 121])
def test_out_f32_down_kernel_builds_offline(arch):
    """OUT_F32 (the shared expert's output added at the all-reduce): the down kernel compiles at the four-token table
    tile with 2 and 6 picks per program and stores its fp32 sum as is (no bf16 conversion left), the bf16 form still
    rounds."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_mxfp4_a8 as a8
    from tests.test_kernels_build import build

    types = dict(_PTRS, xb_ptr="*fp8e4nv", xs_ptr="*fp32")
    down = a8.CONFIGS[(4096, 1024, 4)][1]
    div = tuple(n for n in a8._a8_down.arg_names if n in types and n != "limit" or n.startswith("s_"))
    consts = dict(DM=4096, I=1024, TOPK=6, BLOCK_N=down[0], BLOCK_K=down[1], SPLIT=down[2], HAS_SH=0, F32=0, XB=1)
    for ppp, f32 in ((2, 1), (6, 1), (2, 0)):
        k = build(a8._a8_down, dict(types, out_ptr="*fp32" if f32 else "*bf16"), dict(consts, PPP=ppp, OUT_F32=f32),
                  arch, down[3], down[4], div16=div)
        assert ("cvt.rn.bf16.f32" in k["ptx"]) == (not f32), (ppp, f32)


def test_default_env_and_tables(monkeypatch):
    from ds4f.kernels import moe_mxfp4_a8 as a8

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(a8, "supported", lambda d: True)  # an sm_89+ device
    for env, table, other in (("", True, False), ("0", False, False), ("1", True, True)):
        monkeypatch.setattr(a8, "_A8_ENV", env)
        assert a8.a8_default(dev, 4096, 1024, 1) is table and a8.a8_default(dev, 4096, 1024, 4) is table, env
        assert a8.a8_default(dev, 4096, 2048, 1) is other, env  # TP=1 widths: not in the table
    monkeypatch.setattr(a8, "supported", lambda d: False)  # sm_80 / sm_86: the bf16 kernels whatever the env says
    assert not a8.a8_default(dev, 4096, 1024, 1)
    dec = ((64, 256, 4, 4, 4), (64, 256, 4, 4, 4))
    assert a8.pick(4096, 1024, 1, dec) == a8.CONFIGS[(4096, 1024, 1)]
    assert a8.pick(4096, 1024, 3, dec) == a8.CONFIGS[(4096, 1024, 4)]  # T >= 2: the four-token row
    assert a8.pick(4096, 4096, 1, dec) == dec  # a shape the table lacks
    assert a8.fits(dec, 4096, 1024) and not a8.fits(((64, 64, 4, 4, 4), dec[1]), 4096, 1024)
    for (D, I, _), cfgs in a8.CONFIGS.items():
        from ds4f.kernels import moe_mxfp4_decode as md

        assert md.fits(cfgs, D, I) and a8.fits(cfgs, D, I)


_PTRS = dict(x_ptr="*bf16", a_ptr="*bf16", q_ptr="*u8", s_ptr="*u8", ids_ptr="*i32", tw_ptr="*fp32",
             sh_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32", limit="fp32")


@pytest.mark.parametrize("arch", [90, 121])
@pytest.mark.parametrize("which", ["table", "wide"])
def test_kernels_build_offline(arch, which):
    """The table's tiles (and 128-row, 8-warp ones) compile for Hopper and the GB10 with e4m3 MMAs (wgmma on sm_90)
    and the placement in PTX, within each arch's shared memory; the arrival sums are there."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_mxfp4_a8 as a8
    from tests.test_kernels_build import build

    up, down = a8.CONFIGS[(4096, 1024, 4)] if which == "table" else ((128, 256, 4, 8, 3), (128, 256, 2, 8, 3))
    div = tuple(n for n in a8._a8_up.arg_names if n in _PTRS and n != "limit" or n.startswith("s_"))
    k = build(a8._a8_up, _PTRS, dict(I=1024, DM=4096, TOPK=6, BLOCK_N=up[0], BLOCK_K=up[1], SPLIT=up[2], F32=0),
              arch, up[3], up[4], div16=div)
    assert "0x1C1C1C1C" in k["ptx"] and "0x80808080" in k["ptx"]  # the placement, both nibbles
    assert ("wgmma.mma_async" in k["ptx"]) == (arch == 90) and "e4m3" in k["ptx"]
    assert up[2] == 1 or "atom" in k["ptx"]
    div = tuple(n for n in a8._a8_down.arg_names if n in _PTRS and n != "limit" or n.startswith("s_"))
    k = build(a8._a8_down, _PTRS, dict(DM=4096, I=1024, TOPK=6, BLOCK_N=down[0], BLOCK_K=down[1], SPLIT=down[2],
                                       HAS_SH=1, F32=0), arch, down[3], down[4], div16=div)
    assert "e4m3" in k["ptx"] and "atom" in k["ptx"]  # the pick sum's arrival counter


@pytest.mark.parametrize("arch", [90, 121])
def test_xb_kernels_build_offline(arch):
    """The up kernel reading _a8_expand's operands: both K-contiguous B tiles stream through cp.async with the
    weights (no per-iteration quantization left: no max reduction over x in the loop), and _a8_expand itself."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_mxfp4_a8 as a8
    from tests.test_kernels_build import build

    up = a8.CONFIGS[(4096, 1024, 1)][0]
    types = dict(_PTRS, xb_ptr="*fp8e4nv", xs_ptr="*fp32")
    div = tuple(n for n in a8._a8_up.arg_names if n in types and n != "limit" or n.startswith("s_"))
    consts = dict(I=1024, DM=4096, TOPK=6, BLOCK_N=up[0], BLOCK_K=up[1], SPLIT=up[2], F32=0)
    base = build(a8._a8_up, _PTRS, consts, arch, up[3], up[4], div16=tuple(d for d in div if d in _PTRS
                                                                            or d.startswith("s_")))
    k = build(a8._a8_up, types, dict(consts, XB=1), arch, up[3], up[4], div16=div)
    assert k["ptx"].count("cp.async.cg") > base["ptx"].count("cp.async.cg")  # the operands join the pipeline
    # no quantization of x in the loop (its max reductions and the operand stores to shared memory): only the
    # finish's SwiGLU clamp is left
    assert base["ptx"].count("max.f32") > 8 and k["ptx"].count("max.f32") <= 2 and "0x1C1C1C1C" in k["ptx"]
    assert k["ptx"].count("st.shared") < base["ptx"].count("st.shared") // 4
    down = a8.CONFIGS[(4096, 1024, 4)][1]
    div = tuple(n for n in a8._a8_down.arg_names if n in types and n != "limit" or n.startswith("s_"))
    consts = dict(DM=4096, I=1024, TOPK=6, BLOCK_N=down[0], BLOCK_K=down[1], SPLIT=down[2], HAS_SH=1, F32=0)
    base = build(a8._a8_down, _PTRS, consts, arch, down[3], down[4], div16=tuple(d for d in div if d in _PTRS
                                                                                or d.startswith("s_")))
    k = build(a8._a8_down, types, dict(consts, XB=1), arch, down[3], down[4], div16=div)
    assert base["ptx"].count("max.f32") > 8 and k["ptx"].count("max.f32") <= 2, "XB_DOWN: no quantization left"
    k = build(a8._a8_expand, dict(x_ptr="*bf16", xb_ptr="*fp8e4nv", xs_ptr="*fp32"), dict(DM=4096, BLOCK_K=up[1],
              F32=0), arch, 4, 1, div16=("x_ptr", "xb_ptr", "xs_ptr", "s_xt"))
    assert "e4m3" in k["ptx"]
