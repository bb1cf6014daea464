"""FP8 block / MXFP4 / UE8M0 decoding against independent bit-level decoders, and quantize round trips."""

from __future__ import annotations

import math

import pytest
import torch

from ds4f.model.quant import (
    FP8_MAX,
    QuantFormatError,
    dequant_fp8_block,
    dequant_mxfp4,
    e8m0_to_float,
    quant_fp8_block,
    quant_mxfp4,
    scale_to_float,
    unpack_fp4,
)

# hand-written e2m1 table: code -> value (bit 3 = sign, bits 1-2 exponent, bit 0 mantissa)
NIBBLE = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.5, 4: 2.0, 5: 3.0, 6: 4.0, 7: 6.0}
NIBBLE.update({c + 8: -v for c, v in NIBBLE.items()})


def e4m3_from_bits(b: int) -> float:
    """OCP e4m3fn: bias 7, no infinities, S.1111.111 = NaN, exponent 0 = subnormal."""
    sign = -1.0 if b & 0x80 else 1.0
    exp, man = (b >> 3) & 0xF, b & 0x7
    if exp == 0xF and man == 0x7:
        return math.nan
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def e8m0_from_bits(b: int) -> float:
    return math.ldexp(1.0, b - 127)


def test_e4m3_bits_match_torch_view():
    raw = torch.arange(256, dtype=torch.uint8)
    got = raw.view(torch.float8_e4m3fn).float().tolist()
    for b, g in enumerate(got):
        ref = e4m3_from_bits(b)
        assert (math.isnan(ref) and math.isnan(g)) or ref == g, b


def test_e8m0_edges_and_all_bytes():
    got = e8m0_to_float(torch.tensor([0, 127, 254], dtype=torch.uint8).view(torch.float8_e8m0fnu))
    assert got.dtype == torch.float32
    assert got.tolist() == [2.0 ** -127, 1.0, 2.0 ** 127]
    assert got[0].item() > 0  # 2^-127 is a float32 subnormal, not flushed to zero
    every = e8m0_to_float(torch.arange(255, dtype=torch.uint8))
    assert every.tolist() == [e8m0_from_bits(b) for b in range(255)]
    # the same bytes through float8_e8m0fnu and int8 storage decode identically
    as_e8m0 = torch.arange(255, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert torch.equal(e8m0_to_float(as_e8m0), every)
    assert torch.equal(e8m0_to_float(torch.arange(255, dtype=torch.uint8).view(torch.int8)), every)


def test_e8m0_nan_byte_names_tensor():
    s = torch.tensor([[127, 255]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    with pytest.raises(QuantFormatError, match=r"layers\.7\.attn\.wq_a\.scale.*255.*\(0, 1\)"):
        e8m0_to_float(s, "layers.7.attn.wq_a.scale")
    w = torch.zeros(4, 4, dtype=torch.float8_e4m3fn)
    with pytest.raises(QuantFormatError, match=r"mtp\.0\.e_proj\.scale"):
        dequant_fp8_block(w, torch.full((1, 1), 255, dtype=torch.uint8).view(torch.float8_e8m0fnu),
                          name="mtp.0.e_proj.weight")


@pytest.mark.parametrize("scale_kind", ["ue8m0", "float32"])
def test_fp8_block_decode_against_bits(scale_kind: str):
    g = torch.Generator().manual_seed(1)
    out_f, in_f = 200, 300  # partial edge blocks on both axes: scale grid [2, 3]
    raw = torch.randint(0, 256, (out_f, in_f), generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x11  # no NaN codes in weights
    sbytes = torch.randint(110, 140, (2, 3), generator=g, dtype=torch.uint8)
    scale = sbytes.view(torch.float8_e8m0fnu) if scale_kind == "ue8m0" else \
        torch.tensor([[e8m0_from_bits(int(b)) for b in row] for row in sbytes.tolist()], dtype=torch.float32)
    got = dequant_fp8_block(raw.view(torch.float8_e4m3fn), scale, torch.float32)
    lut = torch.tensor([e4m3_from_bits(b) if (b & 0x7F) != 0x7F else 0.0 for b in range(256)], dtype=torch.float64)
    ref = lut[raw.long()]
    for bo in range(2):
        for bi in range(3):
            ref[bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128] *= e8m0_from_bits(int(sbytes[bo, bi]))
    assert torch.equal(got.double(), ref)
    assert dequant_fp8_block(raw.view(torch.float8_e4m3fn), scale, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_scale_shape_checked():
    w = torch.zeros(200, 300, dtype=torch.float8_e4m3fn)
    with pytest.raises(QuantFormatError, match=r"layers\.1\.attn\.wkv\.weight.*\(2, 2\).*\(2, 3\)"):
        dequant_fp8_block(w, torch.ones(2, 2), name="layers.1.attn.wkv.weight")


def test_mxfp4_decode_against_nibble_table():
    g = torch.Generator().manual_seed(2)
    out_f, in_f = 6, 96
    raw = torch.randint(0, 256, (out_f, in_f // 2), generator=g, dtype=torch.uint8)
    sbytes = torch.randint(100, 150, (out_f, in_f // 32), generator=g, dtype=torch.uint8)
    got = dequant_mxfp4(raw.view(torch.int8), sbytes.view(torch.float8_e8m0fnu), torch.float32)
    for o in range(out_f):
        for k in range(in_f):
            byte = int(raw[o, k // 2])
            code = byte & 0xF if k % 2 == 0 else byte >> 4
            assert got[o, k].item() == NIBBLE[code] * e8m0_from_bits(int(sbytes[o, k // 32])), (o, k)
    # uint8 storage of the same bytes decodes the same
    assert torch.equal(dequant_mxfp4(raw, sbytes.view(torch.float8_e8m0fnu)), got)


def test_fp4_nibble_order_example():
    # 0x71: low nibble 1 (0.5) is column 0, high nibble 7 (6.0) is column 1; 0x9A: -1.0 then -0.5
    packed = torch.tensor([[0x71, 0x9A]], dtype=torch.uint8).view(torch.int8)
    assert unpack_fp4(packed).tolist() == [[0.5, 6.0, -1.0, -0.5]]


def test_fp8_quant_round_trip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(260, 130, generator=g) * torch.logspace(-3, 1, 130)
    w[:128, :128] = 0.0  # an all-zero block
    for fmt in ("ue8m0", "float32"):
        q, s = quant_fp8_block(w, fmt)
        assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (3, 2)
        sf = scale_to_float(s)
        assert torch.equal(torch.log2(sf), torch.log2(sf).round())  # powers of two
        assert sf[0, 0].item() == 1.0
        back = dequant_fp8_block(q, s)
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormal step is 2^-9 * scale
        full_s = sf.repeat_interleave(128, 0)[:260].repeat_interleave(128, 1)[:, :130]
        assert bool(((back - w).abs() <= w.abs() * 2.0 ** -4 + full_s * 2.0 ** -10).all())
        assert bool((q.float().abs() <= FP8_MAX).all())
        q2, s2 = quant_fp8_block(back, fmt)  # decoded values are representable: exact second round trip
        assert torch.equal(dequant_fp8_block(q2, s2), back)


def test_mxfp4_quant_round_trip():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 128, generator=g) * 0.05
    packed, s = quant_mxfp4(w)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (16, 64)
    assert s.dtype == torch.float8_e8m0fnu and tuple(s.shape) == (16, 4)
    back = dequant_mxfp4(packed, s)
    step = e8m0_to_float(s).repeat_interleave(32, 1)
    # nearest e2m1 level: gaps are 0.5 below 2, 1 in [2, 4], 2 in [4, 6] (in units of the block scale); half a gap
    mag = w.abs() / step
    half_gap = torch.where(mag < 2, 0.25, torch.where(mag < 4, 0.5, 1.0))
    assert bool(((back - w).abs() <= step * half_gap).all())
    mags = torch.tensor([NIBBLE[c] for c in range(8)])
    nearest = mags[(mag.unsqueeze(-1) - mags).abs().argmin(-1)] * step * w.sign()
    assert torch.equal(back, nearest)
    assert bool((back.abs() / step <= 6).all())
    p2, s2 = quant_mxfp4(back)
    assert torch.equal(dequant_mxfp4(p2, s2), back)
    # grid values survive exactly, including signs and zero
    grid = torch.tensor([list(NIBBLE.values()) * 2], dtype=torch.float32) * 0.25
    assert torch.equal(dequant_mxfp4(*quant_mxfp4(grid)), grid)
