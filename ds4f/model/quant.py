"""⑥ checkpoint formats: packed FP8 (e4m3 + 128x128 block scales) / MXFP4 (e2m1 x2 + UE8M0 per 32) in, float out.

Also the inverse (power-of-two scaled quantizers) used to write dummy and test checkpoints.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
MXFP4_BLOCK = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
# e2m1 code -> value; bit 3 is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

E8M0_DTYPE = torch.float8_e8m0fnu
FP8_DTYPE = torch.float8_e4m3fn


class QuantFormatError(ValueError):
    """A packed tensor or scale that cannot be decoded; the message names the tensor."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def e8m0_bytes(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """The raw UE8M0 exponent bytes of `scale` (float8_e8m0fnu, uint8 or int8 storage), reinterpreted, never
    converted numerically."""
    if scale.dtype in (E8M0_DTYPE, torch.int8):
        return scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return scale
    raise QuantFormatError(f"{name}: UE8M0 scale must be float8_e8m0fnu/uint8/int8 bytes, got {scale.dtype}")


def e8m0_to_float(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """UE8M0 bytes -> float32 2^(byte-127), exactly; byte 255 (NaN) raises naming `name`."""
    b = e8m0_bytes(scale, name)
    if bool((b == 255).any()):
        idx = tuple(int(i) for i in (b == 255).nonzero()[0].tolist())
        raise QuantFormatError(f"{name}: UE8M0 scale byte 255 (NaN) at index {idx}; the checkpoint is corrupt")
    e = b.to(torch.int32)
    # float32 bit pattern of 2^(e-127): biased exponent e in bits 23..30; e == 0 is the subnormal 2^-127 = 0x00400000
    bits = torch.where(e == 0, torch.full_like(e, 0x00400000), e << 23)
    return bits.view(torch.float32)


def scale_to_float(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """A stored dequant multiplier (UE8M0 bytes or float32) as float32."""
    if scale.dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = scale.to(torch.float32)
        if not bool(torch.isfinite(s).all()):
            raise QuantFormatError(f"{name}: float scale holds non-finite values")
        return s
    return e8m0_to_float(scale, name)


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                      name: str = "weight", block: int = FP8_BLOCK) -> torch.Tensor:
    """FP8 e4m3fn [out, in] with scale [ceil(out/block), ceil(in/block)] -> W[o, i] = q[o, i] * scale[o//b, i//b]."""
    if weight.dtype != FP8_DTYPE:
        raise QuantFormatError(f"{name}: FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    if weight.dim() != 2:
        raise QuantFormatError(f"{name}: FP8 weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    want = (_cdiv(out_f, block), _cdiv(in_f, block))
    if tuple(scale.shape) != want:
        raise QuantFormatError(f"{name}: FP8 block scale shape {tuple(scale.shape)}, expected {want} for weight "
                               f"[{out_f}, {in_f}] with {block}x{block} blocks")
    s = scale_to_float(scale, name.removesuffix(".weight") + ".scale")
    s = s.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (weight.to(torch.float32) * s).to(dtype)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n/2] bytes (int8/uint8/float4_e2m1fn_x2) -> [..., n] float32; low nibble = even column."""
    b = packed.contiguous().view(torch.uint8)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=b.device)
    vals = torch.stack([lut[(b & 0xF).long()], lut[(b >> 4).long()]], dim=-1)
    return vals.reshape(*b.shape[:-1], 2 * b.shape[-1])


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                  name: str = "weight", block: int = MXFP4_BLOCK) -> torch.Tensor:
    """MXFP4 [out, in/2] packed + UE8M0 scale [out, in/32] -> [out, in]: W[o, k] = LUT[nibble] * 2^(s[o, k//32]-127)."""
    if packed.dtype not in (torch.int8, torch.uint8) and packed.dtype != getattr(torch, "float4_e2m1fn_x2", None):
        raise QuantFormatError(f"{name}: MXFP4 weight must be int8/uint8 packed bytes, got {packed.dtype}")
    if packed.dim() != 2:
        raise QuantFormatError(f"{name}: MXFP4 weight must be 2-D [out, in/2], got shape {tuple(packed.shape)}")
    out_f, in_f = packed.shape[0], 2 * packed.shape[1]
    want = (out_f, _cdiv(in_f, block))
    if tuple(scale.shape) != want:
        raise QuantFormatError(f"{name}: MXFP4 scale shape {tuple(scale.shape)}, expected {want} for {in_f} inputs "
                               f"in blocks of {block}")
    s = e8m0_to_float(scale, name.removesuffix(".weight") + ".scale")
    w = unpack_fp4(packed) * s.repeat_interleave(block, 1)[:, :in_f]
    return w.to(dtype)


def dequantize(fmt: str, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               name: str = "weight") -> torch.Tensor:
    """Dispatch on the storage format: "fp8" (block 128) or "fp4" (MXFP4)."""
    if fmt == "fp8":
        return dequant_fp8_block(weight, scale, dtype, name)
    if fmt == "fp4":
        return dequant_mxfp4(weight, scale, dtype, name)
    raise QuantFormatError(f"{name}: unknown quantized format {fmt!r}")


# ---------------------------------------------------------------- inverse: quantizers with power-of-two scales

def _pow2_exponent(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest e with amax / 2^e <= qmax (int32); all-zero blocks get e = 0."""
    ratio = (amax.to(torch.float32) / qmax).clamp_min(2.0 ** -126)
    e = torch.ceil(torch.log2(ratio)).to(torch.int32)
    e = torch.where(amax > 0, e, torch.zeros_like(e))
    return e.clamp(-127, 127)


def exponent_to_e8m0(e: torch.Tensor) -> torch.Tensor:
    """Integer exponents in [-127, 127] -> float8_e8m0fnu bytes (byte = e + 127)."""
    return (e + 127).to(torch.uint8).view(E8M0_DTYPE)


def _exp2_int(e: torch.Tensor) -> torch.Tensor:
    return e8m0_to_float((e + 127).to(torch.uint8))


def quant_fp8_block(w: torch.Tensor, scale_format: str = "ue8m0",
                    block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn [out, in], scale [ceil(out/b), ceil(in/b)]) with power-of-two scales,
    stored as float8_e8m0fnu ("ue8m0") or float32 ("float32")."""
    out_f, in_f = w.shape
    ro, ri = _cdiv(out_f, block), _cdiv(in_f, block)
    padded = torch.zeros(ro * block, ri * block, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w.to(torch.float32)
    amax = padded.view(ro, block, ri, block).abs().amax(dim=(1, 3))
    e = _pow2_exponent(amax, FP8_MAX)
    s = _exp2_int(e)
    full = s.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    q = (w.to(torch.float32) / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if scale_format == "ue8m0":
        return q, exponent_to_e8m0(e)
    if scale_format == "float32":
        return q, s
    raise QuantFormatError(f"unknown FP8 scale format {scale_format!r} (expected 'ue8m0' or 'float32')")


def quant_mxfp4(w: torch.Tensor, block: int = MXFP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float (in % 32 == 0) -> (int8 [out, in/2] packed e2m1, low nibble = even column;
    float8_e8m0fnu scale [out, in/32]). Values round to the nearest e2m1 level."""
    out_f, in_f = w.shape
    if in_f % block:
        raise QuantFormatError(f"MXFP4 needs the input dim to be a multiple of {block}, got {in_f}")
    wf = w.to(torch.float32).view(out_f, in_f // block, block)
    e = _pow2_exponent(wf.abs().amax(dim=-1), FP4_MAX)
    x = (wf / _exp2_int(e).unsqueeze(-1)).reshape(out_f, in_f)
    # midpoints between the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: an exact tie goes to the lower level
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32, device=w.device)
    code = torch.bucketize(x.abs(), mids).to(torch.uint8)
    code = code | ((x < 0) & (code > 0)).to(torch.uint8) << 3
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.view(torch.int8), exponent_to_e8m0(e)
