"""⑥ kernels, MXFP4 MoE on CUDA: the in-register nibble decode (PTX and bit-op paths) bit-exact against quant.py, and
fused_moe_mxfp4 against its per-expert dequant reference at V4-Flash widths and odd sizes, graph capture, memory."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import HAS_TRITON
from ds4f.kernels.moe_mxfp4 import default_config, fused_moe_mxfp4, fused_moe_mxfp4_ref
from ds4f.model.quant import dequant_mxfp4

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

TOL = 5e-3  # exact bf16 weights and products, fp32 sums: summation order and the bf16 activation only


@pytest.fixture(autouse=True)
def _bf16_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default decode path at the V4-Flash TP=2 widths is moe_mxfp4_a8 (tests/gpu/test_moe_mxfp4_a8_gpu.py);
    this file checks the bf16-activation kernels against the bf16 oracle, so it turns that form off."""
    from ds4f.kernels import moe_mxfp4_a8

    monkeypatch.setattr(moe_mxfp4_a8, "_A8_ENV", "0")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _case(E, D, I, T, k, seed, s_lo=119, s_hi=122):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13q = torch.randint(0, 256, (E, 2 * I, D // 2), dtype=torch.uint8, device="cuda", generator=g)
    w13s = torch.randint(s_lo, s_hi, (E, 2 * I, D // 32), dtype=torch.uint8, device="cuda", generator=g)
    w2q = torch.randint(0, 256, (E, D, I // 2), dtype=torch.uint8, device="cuda", generator=g)
    w2s = torch.randint(s_lo, s_hi, (E, D, I // 32), dtype=torch.uint8, device="cuda", generator=g)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
    return x, w13q, w13s, w2q, w2s, ids, wts


if HAS_TRITON:
    import triton
    import triton.language as tl

    from ds4f.kernels.moe_mxfp4_kernels import _decode

    @triton.jit
    def _dec_kernel(q_ptr, s_ptr, o_ptr, ASM: tl.constexpr):
        # [512, 32] bytes + [512, 2] scales -> [512, 64] bf16 through the kernels' decode helper
        n = tl.arange(0, 512)
        g = tl.arange(0, 2)
        j = tl.arange(0, 16)
        q = tl.load(q_ptr + n[:, None, None] * 32 + g[None, :, None] * 16 + j[None, None, :])
        s = tl.load(s_ptr + n[:, None, None] * 2 + g[None, :, None])
        lo, hi = _decode(q, s, ASM)
        tl.store(o_ptr + n[:, None] * 64 + tl.arange(0, 64)[None, :], tl.reshape(tl.join(lo, hi), [512, 64]))


@pytest.mark.parametrize("asm", [1, 0])
def test_decode_every_byte_and_scale_exact(asm):
    q = torch.arange(256, dtype=torch.uint8, device="cuda").repeat(64).view(512, 32)
    s = torch.arange(2, 253, dtype=torch.uint8, device="cuda").repeat(6)[:1024].view(512, 2)
    o = torch.empty(512, 64, dtype=torch.bfloat16, device="cuda")
    _dec_kernel[(1,)](q, s, o, ASM=asm)
    assert torch.equal(o.float(), dequant_mxfp4(q, s))


# (E, D, I, T, k): V4-Flash widths (decode per-pick, decode sorted, prefill) and odd sizes
V4 = [(8, 4096, 2048, 1, 6), (8, 4096, 2048, 4, 6), (16, 4096, 2048, 16, 6), (8, 4096, 2048, 300, 6),
      (64, 4096, 2048, 300, 6)]  # the last: ~28 rows per expert (middle tile config)
ODD = [(5, 160, 96, 37, 3), (3, 64, 32, 2, 2)]
VARIANTS = [dict(ASM=1, SPLIT=0), dict(ASM=1, SPLIT=1), dict(ASM=0, SPLIT=0)]


GEMV = dict(ASM=1, GEMV=1, PER_PICK=1)  # CUDA-core path for decode-sized batches


@pytest.mark.parametrize("E,D,I,T,k,variant", [(*s, v) for s in V4 for v in VARIANTS]
                         + [(*s, v) for s in ODD for v in VARIANTS[::2]]
                         + [(*s, GEMV) for s in V4[:3] + ODD])
def test_matches_reference(E, D, I, T, k, variant):
    x, w13q, w13s, w2q, w2s, ids, wts = _case(E, D, I, T, k, seed=T + D)
    cfg = {**default_config(T * k / E), **variant}
    out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=cfg)
    ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out, ref) < TOL


def test_default_config_and_wide_scales_and_shared_expert():
    x, w13q, w13s, w2q, w2s, ids, wts = _case(8, 4096, 2048, 5, 6, seed=3, s_lo=100, s_hi=140)
    g = torch.Generator(device="cuda").manual_seed(9)
    sh13 = (torch.randn(4096, 4096, device="cuda", generator=g) * 0.02).bfloat16()
    sh2 = (torch.randn(4096, 2048, device="cuda", generator=g) * 0.02).bfloat16()
    out = fused_moe_mxfp4(x, w13q, w13s.view(torch.float8_e8m0fnu), w2q.view(torch.int8), w2s, ids, wts, 10.0,
                          shared=(sh13, sh2))
    ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, shared=(sh13, sh2))
    assert _rel(out, ref) < TOL


def test_cuda_graph_replay_matches_eager():
    x, w13q, w13s, w2q, w2s, ids, wts = _case(16, 4096, 2048, 4, 6, seed=5)
    eager = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    x2, ids2 = torch.randn_like(x.float()).bfloat16(), ids.roll(1, 1)
    x.copy_(x2)
    ids.copy_(ids2)
    g.replay()
    assert not torch.equal(out, eager)
    assert torch.equal(out, fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0))


def test_no_dequantized_copy_of_the_experts():
    E, D, I, T, k = 64, 1024, 512, 64, 6
    x, w13q, w13s, w2q, w2s, ids, wts = _case(E, D, I, T, k, seed=7)
    fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # activation [<= (M/bm + E) * bm, I] bf16 + per-pick rows [M, D] fp32 + sort scratch (~3.5 MB here)
    all_bf16 = E * 3 * I * D * 2  # 201 MB
    assert 0 < extra < all_bf16 / 32


# ------------------------------------------------ decode: moe_mxfp4_decode's swap-AB kernels (default, <= 64 picks)

# (E, D, I, T, k): the per-rank V4-Flash shapes at TP=2 (I = 1024) and TP=1 (I = 2048), T = 1 and 4
DEC_SHAPES = [(32, 4096, 1024, 1, 6), (32, 4096, 1024, 4, 6), (32, 4096, 2048, 1, 6), (32, 4096, 2048, 4, 6)]
# None: the shape table; one 512-column step per up program; 8-warp 128-row up tiles with 32-row down tiles
DEC_TILES = [None, (64, 512, 8, 4, 3, 64, 512, 2, 4, 3), (128, 512, 4, 8, 3, 32, 256, 4, 4, 4)]


@pytest.mark.parametrize("E,D,I,T,k", DEC_SHAPES)
@pytest.mark.parametrize("tiles", DEC_TILES)
def test_decode_kernels_match_reference(E, D, I, T, k, tiles):
    from ds4f.kernels import arrival

    x, w13q, w13s, w2q, w2s, ids, wts = _case(E, D, I, T, k, seed=T + I, s_lo=110, s_hi=131)
    ids[-1, 1:] = ids[-1, 0]  # a repeated expert inside one token's picks
    sh = (torch.randn(T, D, device="cuda") * 0.1).bfloat16()
    cfg = None if tiles is None else dict(DEC=tiles)
    out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=cfg)
    ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel(out, ref) < TOL
    out_sh = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=cfg, shared_out=sh)
    assert _rel(out_sh, ref.float() + sh.float()) < TOL
    torch.cuda.synchronize()
    assert all(int(b.abs().sum()) == 0 for n in ("mxfp4_dec_up", "mxfp4_dec_down") for b in arrival.buffers(n))


@pytest.mark.parametrize("E,D,I,T,k", DEC_SHAPES)
def test_decode_sub_variant_matches_reference(E, D, I, T, k):
    """DS4F_MXFP4_DEC_SUB's form (weights times 2^-126 into the MMA, so +-0.5 arrive as bf16 subnormals): exact only
    if the tensor cores keep subnormal inputs. A failure here means the SUB option must stay off."""
    x, w13q, w13s, w2q, w2s, ids, wts = _case(E, D, I, T, k, seed=T + I + 1, s_lo=110, s_hi=131)
    x[0, :8] = torch.tensor([3e4, -2e4, 1e-30, -1e-35, 0.5, 7.0, -9.0, 1e-3], device="cuda")  # x * 2^100 range
    tiles = md_table(D, I, T)
    out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, config=dict(DEC=tiles, SUB=1))
    ref = fused_moe_mxfp4_ref(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert torch.isfinite(out).all() and _rel(out, ref) < TOL
    # the +-0.5 codes alone: a flush to zero would lose the whole output
    w13h, w2h = (w13q & 0x88) | 0x11, (w2q & 0x88) | 0x11  # every nibble s|001: +-0.5, random signs
    out = fused_moe_mxfp4(x, w13h, w13s, w2h, w2s, ids, wts, 10.0, config=dict(DEC=tiles, SUB=1))
    ref = fused_moe_mxfp4_ref(x, w13h, w13s, w2h, w2s, ids, wts, 10.0)
    assert _rel(out, ref) < TOL


def md_table(D: int, I: int, T: int) -> tuple[int, ...]:
    from ds4f.kernels import moe_mxfp4_decode as md

    up, down = md.pick(D, I, T)  # type: ignore[misc]
    return (*up, *down)


def test_decode_is_the_default_and_env_falls_back(monkeypatch):
    from ds4f.kernels import moe_mxfp4_decode as md

    x, w13q, w13s, w2q, w2s, ids, wts = _case(16, 4096, 1024, 1, 6, seed=2)
    assert md.tiles_for(None, True, 1, 6, 4096, 1024) is not None  # the TP=2 shape takes the decode kernels
    calls = []
    real = md.moe_decode
    monkeypatch.setattr(md, "moe_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    new = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)
    assert calls == [1]
    monkeypatch.setenv("DS4F_MXFP4_DEC", "0")
    md._env.cache_clear()
    try:
        old = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0)  # moe_mxfp4's CUDA-core GEMV
    finally:
        monkeypatch.delenv("DS4F_MXFP4_DEC")
        md._env.cache_clear()
    assert calls == [1]
    assert _rel(new, old) < TOL


if HAS_TRITON:
    from ds4f.kernels.moe_mxfp4_decode_kernels import _nibbles

    @triton.jit
    def _nib_kernel(q_ptr, o_ptr, ASM: tl.constexpr, SUB: tl.constexpr):
        # [256, 32] int16 words -> their 4 nibbles [256, 32, 4] bf16 through the decode kernels' one-input routine
        o = tl.arange(0, 256)[:, None] * 32 + tl.arange(0, 32)[None, :]
        q = tl.load(q_ptr + o)
        for r in tl.static_range(4):
            tl.store(o_ptr + o * 4 + r, _nibbles(q, r, ASM, SUB).to(tl.bfloat16))


@pytest.mark.parametrize("asm,sub", [(1, 0), (0, 0), (1, 1)])
def test_decode_nibbles_every_byte_exact(asm, sub):
    q = torch.arange(256, dtype=torch.uint8, device="cuda").repeat(64).view(256, 64)
    q[:, 1::2] = q[:, 1::2].flip(0)  # each word's second byte differs from its first
    o = torch.empty(256, 32, 4, dtype=torch.bfloat16, device="cuda")
    _nib_kernel[(1,)](q.view(torch.int16), o, ASM=asm, SUB=sub)
    want = dequant_mxfp4(q, torch.full((256, 4), 127, dtype=torch.uint8, device="cuda"))
    assert torch.equal(o.view(256, 128).float() * 2.0 ** (126 * sub), want)  # SUB: value * 2^-126 (subnormal 0.5)


def test_decode_graph_replay_matches_eager():
    x, w13q, w13s, w2q, w2s, ids, wts = _case(32, 4096, 1024, 1, 6, seed=6)
    sh = (torch.randn(1, 4096, device="cuda") * 0.1).bfloat16()
    eager = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, shared_out=sh)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, shared_out=sh)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, shared_out=sh)
    for _ in range(3):  # the arrival counters re-arm between replays
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    ids.copy_(ids.roll(1, 1).flip(0))
    wts.copy_(wts.flip(1))
    g.replay()
    assert not torch.equal(out, eager)
    assert torch.equal(out, fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, ids, wts, 10.0, shared_out=sh))
