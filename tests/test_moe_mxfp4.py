"""⑥ kernels, MXFP4 MoE on CPU: the reference against quant.py dequant + the bf16 MoE reference, the wrapper's input
checks, and (TRITON_INTERPRET=1, tiny shapes, skipped without triton) the Triton kernels and their nibble decode."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4, fused_moe_mxfp4_ref
from ds4f.kernels.ref import fused_moe_ref
from ds4f.model.quant import E8M0_DTYPE, dequant_mxfp4, quant_mxfp4

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] float -> ([E, N, K/2] uint8, [E, N, K/32] float8_e8m0fnu) through quant.quant_mxfp4."""
    qs = [quant_mxfp4(w[e]) for e in range(w.shape[0])]
    return torch.stack([q for q, _ in qs]).view(torch.uint8), torch.stack([s for _, s in qs])


def _case(E=6, D=64, I=96, T=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13q, w13s = _pack(torch.randn(E, 2 * I, D, generator=g) * 0.3)
    w2q, w2s = _pack(torch.randn(E, D, I, generator=g) * 0.3)
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    wts = torch.rand(T, k, generator=g)
    return x, w13q, w13s, w2q, w2s, ids, wts


def _dequant_all(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.stack([dequant_mxfp4(q[e], s[e]) for e in range(q.shape[0])])


@pytest.mark.parametrize("limit", [10.0, 0.5, float("inf")])
def test_ref_matches_dequant_then_bf16_moe_ref(limit):
    x, w13q, w13s, w2q, w2s, ids, wts = _case()
    got = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, limit)
    want = fused_moe_ref(x, _dequant_all(w13q, w13s), _dequant_all(w2q, w2s), ids, wts, limit)
    assert got.dtype == torch.bfloat16
    assert _rel(got, want) < 1e-5


def test_ref_with_shared_expert_equals_shared_as_expert_E():
    x, w13q, w13s, w2q, w2s, ids, wts = _case(seed=1)
    T, D, I = x.shape[0], x.shape[1], 64
    g = torch.Generator().manual_seed(7)
    sh13 = (torch.randn(2 * I, D, generator=g) * 0.1).bfloat16()
    sh2 = (torch.randn(D, I, generator=g) * 0.1).bfloat16()
    got = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, shared=(sh13, sh2))
    routed = fused_moe_ref(x, _dequant_all(w13q, w13s), _dequant_all(w2q, w2s), ids, wts, 10.0)
    shared = fused_moe_ref(x, sh13[None], sh2[None], torch.zeros(T, 1, dtype=torch.int32), torch.ones(T, 1), 10.0)
    assert _rel(got, routed.float() + shared.float()) < 1e-2  # two bf16 roundings vs one
    assert _rel(got, routed) > 1e-2  # the shared expert was added


def test_wrapper_on_cpu_is_the_reference_and_accepts_int8_and_uint8_scales():
    x, w13q, w13s, w2q, w2s, ids, wts = _case(seed=2)
    ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    a = fused_moe_mxfp4(x, w13q.view(torch.int8), w13s, w2q, w2s.view(torch.uint8), ids, wts, 10.0)
    assert torch.equal(a, ref)
    assert w13s.dtype == E8M0_DTYPE


def test_wrapper_rejects_unpacked_or_misshaped_experts():
    x, w13q, w13s, w2q, w2s, ids, wts = _case(seed=3)
    bf = _dequant_all(w13q, w13s).bfloat16()
    with pytest.raises(AssertionError, match="w13_q"):
        fused_moe_mxfp4(x, bf, w13s, w2q, w2s, ids, wts, 10.0)
    with pytest.raises(AssertionError, match="w2_scale"):
        fused_moe_mxfp4(x, w13q, w13s, w2q, w2s[:, :, :1].contiguous(), ids, wts, 10.0)


def test_ref_decodes_one_expert_at_a_time(monkeypatch):
    import ds4f.kernels.moe_mxfp4 as mm

    x, w13q, w13s, w2q, w2s, ids, wts = _case(seed=4)
    shapes = []
    real = mm.dequant_mxfp4

    def spy(q, s, *a, **kw):
        shapes.append(tuple(q.shape))
        return real(q, s, *a, **kw)

    monkeypatch.setattr(mm, "dequant_mxfp4", spy)
    fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert shapes and all(len(s) == 2 for s in shapes)  # per expert, never the [E, ...] stack
    assert len(shapes) == 2 * ids.unique().numel()


# ---------------------------------------------------------------- Triton interpreter (tiny shapes)

_INTERP_SCRIPT = r"""
import json, sys, torch, triton, triton.language as tl
import ds4f.kernels.moe_mxfp4 as mm
import ds4f.kernels.moe_mxfp4_kernels as mk
import ds4f.model.quant as quant
sys.path.insert(0, sys.argv[1])
from test_moe_mxfp4 import _case, _rel
res = {}

@triton.jit
def dec(q_ptr, s_ptr, o_ptr, N: tl.constexpr):
    n = tl.arange(0, N); g = tl.arange(0, 2); j = tl.arange(0, 16)
    q = tl.load(q_ptr + n[:, None, None] * 32 + g[None, :, None] * 16 + j[None, None, :])
    s = tl.load(s_ptr + n[:, None, None] * 2 + g[None, :, None])
    lo, hi = mk._decode(q, s, False)
    tl.store(o_ptr + n[:, None] * 64 + tl.arange(0, 64)[None, :], tl.reshape(tl.join(lo, hi), [N, 64]))

# every byte value under scales 2..252 (the supported range)
q = torch.arange(256, dtype=torch.uint8).repeat(64).view(512, 32)
s = torch.arange(2, 253, dtype=torch.uint8).repeat(6)[:1024].view(512, 2)
o = torch.empty(512, 64, dtype=torch.bfloat16)
dec[(1,)](q, s, o, N=512)
res["decode_exact"] = bool(torch.equal(o.float(), quant.dequant_mxfp4(q, s)))

x, w13q, w13s, w2q, w2s, ids, wts = _case(E=5, D=64, I=96, T=6, k=2, seed=11)
ref = mm.fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
def boom(*a, **k):
    raise RuntimeError("the kernel path must not dequantize an expert")
real = (quant.dequant_mxfp4, quant.unpack_fp4)
mm.dequant_mxfp4 = quant.unpack_fp4 = quant.dequant_mxfp4 = boom
for split, pp, bn, gemv in [(0, 0, 32, 0), (1, 1, 16, 0), (0, 1, 64, 0), (0, 1, 32, 1)]:
    cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=64, num_warps=4, num_stages=1, SPLIT=split, PER_PICK=pp, GEMV=gemv)
    out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=cfg)
    res[f"split{split}_pp{pp}_bn{bn}_gemv{gemv}"] = _rel(out, ref)
# moe_mxfp4_decode (swap-AB, group-column B, fused pick sum): K splits with arrival sums, and one step per program
from ds4f.kernels import arrival
mm.dequant_mxfp4 = quant.dequant_mxfp4 = real[0]
quant.unpack_fp4 = real[1]
x, w13q, w13s, w2q, w2s, ids, wts = _case(E=5, D=128, I=192, T=3, k=2, seed=12)
ref = mm.fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
mm.dequant_mxfp4 = quant.unpack_fp4 = quant.dequant_mxfp4 = boom
for dec in [(32, 64, 2, 4, 1, 16, 64, 3, 4, 1), (64, 128, 1, 4, 1, 64, 64, 1, 4, 1)]:
    out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=dec))
    res["dec_" + "_".join(map(str, dec))] = _rel(out, ref)
out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=(32, 64, 2, 4, 1, 16, 64, 3, 4, 1),
                                                                                SUB=1))
res["dec_sub"] = _rel(out, ref)  # weights times 2^-126 (subnormal MMA inputs), x times 2^100, sums times 2^26
sh = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
out = mm.fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=(32, 64, 2, 4, 1, 16, 64, 3, 4, 1)),
                         shared_out=sh)
res["dec_shared_out"] = _rel(out, ref.float() + sh.float()) / 5  # two bf16 roundings in the oracle, one here
res["dec_locks_zero"] = all(int(b.abs().sum()) == 0 for k in ("mxfp4_dec_up", "mxfp4_dec_down")
                            for b in arrival.buffers(k))
print("RESULT", json.dumps(res))
"""


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, str(ROOT / "tests")], env=env, capture_output=True,
                       text=True, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-3000:]
    res = json.loads(line[0][7:])
    assert res.pop("decode_exact") is True
    assert res.pop("dec_locks_zero") is True  # the decode kernels' arrival counters are re-armed
    assert {n for n in res if n.startswith("dec_")} >= {"dec_shared_out", "dec_sub", "dec_32_64_2_4_1_16_64_3_4_1"}
    for name, rel in res.items():
        assert rel < 1e-3, (name, rel)  # same fp32 products; only the summation order differs


# ------------------------------------------------ offline build for sm_80 / sm_90 (MLIR passes + ptxas, no GPU)

_PTRS = dict(x_ptr="*bf16", a_ptr="*bf16", q_ptr="*u8", s_ptr="*u8", sid_ptr="*i32", be_ptr="*i32", ids_ptr="*i32",
             tw_ptr="*fp32", out_ptr="*fp32", limit="fp32")


def _build(fn, consts: dict, arch: int, nw: int, ns: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    if "PDL" in fn.arg_names:  # as pdl.launch picks it: sm_90+ only
        consts = dict(consts, PDL=arch >= 90)
    sig = {n: "constexpr" if n in consts else _PTRS.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts and n != "limit"
             and n != "M"}
    k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                options=dict(num_warps=nw, num_stages=ns))
    from test_kernels_build import SMEM

    assert k.metadata.shared <= SMEM[arch], (consts, k.metadata.shared, arch)
    return dict(shared=k.metadata.shared, ptx=k.asm["ptx"])


@pytest.mark.parametrize("arch", [80, 90, 121])
@pytest.mark.parametrize("m_per_expert", [0.5, 30.0, 200.0])
def test_default_tiles_build_offline_for_sm80_and_sm90(arch, m_per_expert):
    pytest.importorskip("triton")
    import ds4f.kernels.moe_mxfp4_kernels as mm
    from ds4f.kernels.moe_mxfp4 import default_config

    cfg = default_config(m_per_expert)
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    shape = dict(I=2048, DM=4096)
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PER_PICK=0, ASM=1, SPLIT=0,
                  F32=0)
    try:
        up = _build(mm._up_mx, dict(**shape, TOPK=6, **common), arch, nw, ns)
        down = _build(mm._down_mx, dict(**shape, **common), arch, nw, ns)
    except RuntimeError as ex:  # no ptxas / backend on this machine
        if "ptxas" in str(ex).lower() and "not found" in str(ex).lower():
            pytest.skip(str(ex))
        raise
    for k in (up, down):
        assert "prmt.b32" in k["ptx"] and "fma.rn.bf16x2" in k["ptx"]  # the nibble decode is in the GEMM
        assert k["shared"] <= 160 * 1024
    if m_per_expert < 1:  # decode tiles also build as the CUDA-core GEMV
        _build(mm._up_gemv, dict(**shape, TOPK=6, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], ASM=1, F32=0), arch,
               nw, ns)


def test_decode_tile_choice_table_env_and_fit(monkeypatch):
    from ds4f.kernels import moe_mxfp4_decode as md

    monkeypatch.delenv("DS4F_MXFP4_DEC", raising=False)
    md._env.cache_clear()
    for (d, i, b), cfgs in md.CONFIGS.items():
        assert cfgs is None or md.fits(cfgs, d, i)
        assert md.tiles_for(None, True, b, 6, d, i) == cfgs
    for d, i, t in [(4096, 256, 1), (7168, 512, 4), (2048, 1536, 2), (128, 192, 1)]:
        assert md.fits(md.generic_config(d, i, t), d, i), (d, i, t)
    for d, i in [(64, 32), (32, 32), (96, 48)]:  # tiny test configs off the 64-column grid: other paths run
        assert md.tiles_for(None, True, 1, 6, d, i) is None, (d, i)
    assert md.tiles_for(None, False, 1, 6, 4096, 1024) is None  # CPU / interpreter: only when forced
    assert md.tiles_for(None, True, 11, 6, 4096, 1024) is None  # 66 picks: the GEMM path
    assert md.tiles_for(dict(BLOCK_M=16, BLOCK_N=8), True, 1, 6, 4096, 1024) is None  # an explicit old config
    with pytest.raises(AssertionError, match="does not tile"):
        md.tiles_for(dict(DEC=(64, 256, 3, 4, 4, 64, 256, 1, 4, 4)), True, 1, 6, 4096, 1024)
    try:
        monkeypatch.setenv("DS4F_MXFP4_DEC", "0")
        md._env.cache_clear()
        assert md.tiles_for(None, True, 1, 6, 4096, 1024) is None
        monkeypatch.setenv("DS4F_MXFP4_DEC", "128,256,4,8,4,32,256,2,4,4")
        md._env.cache_clear()
        assert md.tiles_for(None, True, 1, 6, 4096, 1024) == ((128, 256, 4, 8, 4), (32, 256, 2, 4, 4))
        monkeypatch.setenv("DS4F_MXFP4_DEC", "64,256")
        md._env.cache_clear()
        with pytest.raises(ValueError, match="DS4F_MXFP4_DEC"):
            md.pick(4096, 1024, 1)
    finally:
        monkeypatch.delenv("DS4F_MXFP4_DEC")
        md._env.cache_clear()


_DEC_PTRS = dict(x_ptr="*bf16", a_ptr="*bf16", q_ptr="*i16", s_ptr="*u8", ids_ptr="*i32", tw_ptr="*fp32",
                 sh_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32", limit="fp32")


@pytest.mark.parametrize("arch", [80, 90, 121])
@pytest.mark.parametrize("tp", [2, 1])
def test_decode_kernels_build_offline_and_load_bytes_into_the_mma_operand(arch, tp):
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from ds4f.kernels import moe_mxfp4_decode as md

    inter = 2048 // tp
    up, down = md.CONFIGS[(4096, inter, 1)]
    for (fn, cfg, consts), sub in itertools.product([(md._dec_up, up, dict(I=inter, DM=4096, TOPK=6)),
                                                     (md._dec_down, down, dict(DM=4096, I=inter, TOPK=6, HAS_SH=1))],
                                                    (0, 1)):
        consts = dict(consts, BLOCK_N=cfg[0], BLOCK_K=cfg[1], SPLIT=cfg[2], ASM=1, SUB=sub, F32=0, PDL=arch >= 90)
        sig = {n: "constexpr" if n in consts else _DEC_PTRS.get(n, "i32") for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in _DEC_PTRS
                 and n != "limit"}
        try:
            k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=cfg[3], num_stages=cfg[4]))
        except RuntimeError as ex:  # no ptxas / backend on this machine
            if "ptxas" in str(ex).lower() and "not found" in str(ex).lower():
                pytest.skip(str(ex))
            raise
        from test_kernels_build import SMEM

        assert ("fma.rn.bf16x2" in k.asm["ptx"]) != bool(sub) and k.metadata.shared <= SMEM[arch]
        assert ("griddepcontrol.wait" in k.asm["ptx"]) == (arch >= 90)  # ds4f.kernels.pdl
        # the packed words reach the MMA operand layout undecoded: no decoded tile through shared memory
        assert "xi16, #ttg.dot_op<{opIdx = 0" in k.asm["ttgir"]


def test_sub_decode_default_follows_env_then_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    # DS4F_MXFP4_DEC_SUB wins when set; unset: on only for sm_90 CUDA devices (a CPU device: off)
    from ds4f.kernels import moe_mxfp4_decode as md

    for env, want in (("", False), ("1", True), ("0", False)):
        monkeypatch.setattr(md, "_SUB_ENV", env)
        md.sub_default.cache_clear()
        assert md.sub_default(torch.device("cpu")) is want, env
    md.sub_default.cache_clear()
