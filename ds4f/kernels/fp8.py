"""⑥ kernels, KV row quantization: rows [N, D] in, fp8 e4m3 rows + power-of-two group scales out (and back).

Two encodings:
- `quantize_rows`: every column e4m3, one fp32 power-of-two scale per `group` columns (index keys: group = D).
- `quantize_kv_rows`: the V4 "fp8_ds_mla" row of ds4f/runner/kv_cache.py RowStore (584 B at V4-Flash width):
  the first D - rope_dim ("nope") columns e4m3 with one UE8M0 exponent byte per 64 of them (the last group padded
  with zeros), the last rope_dim columns kept bf16. Dequantization to bf16 is exact in both.
`store_kv_rows` / `store_key_rows` quantize rows straight into pool rows, the same bits as the functions above: on
CUDA one Triton launch (integer exponent and e4m3 rounding, so any sm_80+ GPU), elsewhere the torch ops.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_GROUP = 64  # nope columns per UE8M0 exponent (= ds4f.cache.manager.FP8_GROUP)
EXP_BIAS = 127  # UE8M0: scale = 2^(byte - 127)


def quantize_rows(x: torch.Tensor, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (q [N, D] e4m3, scale [N, D // group] fp32) with x ≈ q * scale per group of `group` columns.

    scale = 2^ceil(log2(amax / 448)), amax floored at 1e-4 (vLLM fp8_ds_mla's rule); values are rounded to bf16
    first, so a power-of-two scale makes dequantization to bf16 exact."""
    n, d = x.shape
    assert d % group == 0, f"D={d} must be a multiple of group={group}"
    xg = x.to(torch.bfloat16).float().view(n, d // group, group)
    amax = xg.abs().amax(dim=-1).clamp(min=1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (xg / scale[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n, d)
    return q, scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q [N, D] e4m3, scale [N, D // G]) -> [N, D] in `dtype`."""
    n, d = q.shape
    return (q.float().view(n, scale.shape[1], -1) * scale[:, :, None]).view(n, d).to(dtype)


def kv_exp_bytes(nope: int) -> int:
    """UE8M0 exponent bytes per KV row: one per KV_GROUP nope columns, padded to 8 (the layout's accounting)."""
    ng = -(-nope // KV_GROUP)
    return -(-ng // 8) * 8


def quantize_kv_rows(x: torch.Tensor, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D] -> (nope [N, D - rope_dim] e4m3, exp [N, kv_exp_bytes] uint8, rope [N, rope_dim] bf16).

    Bit-identical to RowStore.write's fp8 rows: x rounded to bf16, each group of 64 nope columns scaled by
    2^ceil(log2(amax / 448)) (amax floored at 1e-4); exp holds log2(scale) + 127, pad bytes 127 (scale 1)."""
    n, d = x.shape
    nope = d - rope_dim
    ng = -(-nope // KV_GROUP)
    xb = x.to(torch.bfloat16)
    q, scale = quantize_rows(F.pad(xb[:, :nope].float(), (0, ng * KV_GROUP - nope)), KV_GROUP)
    e = (torch.log2(scale) + EXP_BIAS).round().to(torch.uint8)
    e = F.pad(e, (0, kv_exp_bytes(nope) - ng), value=EXP_BIAS)
    return q[:, :nope].contiguous(), e, xb[:, nope:].contiguous()


def kv_scales(exp: torch.Tensor, nope: int) -> torch.Tensor:
    """exp [N, E] uint8 -> fp32 scales [N, ceil(nope / 64)]."""
    return torch.exp2(exp[:, : -(-nope // KV_GROUP)].float() - EXP_BIAS)


def dequantize_kv_rows(nope: torch.Tensor, exp: torch.Tensor, rope: torch.Tensor,
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(nope [N, dn] e4m3 (or its uint8 bits), exp [N, E] uint8, rope [N, dr] bf16) -> [N, dn + dr] in `dtype`."""
    n, dn = nope.shape
    s = kv_scales(exp, dn)
    q = F.pad(nope.view(FP8).float(), (0, s.shape[1] * KV_GROUP - dn)).view(n, -1, KV_GROUP)
    return torch.cat([(q * s[:, :, None]).view(n, -1)[:, :dn], rope.float()], dim=1).to(dtype)


# ---- fused quantize-and-store (CUDA): one launch per write instead of ~20 torch ops ----
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: store_kv_rows / store_key_rows run the torch ops above
    triton = None

if triton is not None:

    @triton.jit
    def _pow2_exp(amax):
        # c = ceil(log2(max(amax, 1e-4) / 448)) without a division or a log: amax = M * 2^E (M in [1, 2)) and
        # 448 = 1.75 * 2^8, so c = E - 8 + (M > 1.75); equal to the torch rule for every bf16 amax and the floor
        bits = tl.maximum(amax, 1e-4).to(tl.int32, bitcast=True)
        return ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)

    @triton.jit
    def _to_e4m3(v):
        # v fp32 in [-448, 448] -> e4m3 bits (uint8), round to nearest even (as torch's .to(float8_e4m3fn)); integer
        # ops, so it builds on any arch (and tests bit for bit under the interpreter)
        bits = v.to(tl.int32, bitcast=True)
        sign = ((bits >> 24) & 0x80).to(tl.int32)
        a = tl.abs(v)
        ab = a.to(tl.int32, bitcast=True)
        r = ab + 0x7FFFF + ((ab >> 20) & 1)  # round the fp32 mantissa to 3 bits, ties to even
        normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # multiples of 2^-9, ties to even (8 -> 2^-6)
        return (sign | tl.where(a >= 0.015625, normal, sub)).to(tl.uint8)

    @triton.jit
    def _store_kv_rows(x_ptr, rows_ptr, nope_ptr, exp_ptr, rope_ptr, n, s_x, s_nope, s_exp, s_rope,
                       D: tl.constexpr, NOPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < n
        dst = tl.load(rows_ptr + r, mask=rm, other=0).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * s_x + offs_d[None, :], mask=rm[:, None] & (offs_d < D)[None, :],
                    other=0.0).to(tl.bfloat16).to(tl.float32)
        _kv_tile_store(x, rm, dst, nope_ptr, exp_ptr, rope_ptr, s_nope, s_exp, s_rope, D, NOPE, BLOCK_D, BLOCK_R)

    @triton.jit
    def _kv_tile_store(x, rm, dst, nope_ptr, exp_ptr, rope_ptr, s_nope, s_exp, s_rope, D: tl.constexpr,
                       NOPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        # x [BLOCK_R, BLOCK_D] fp32 holding bf16 values (0 past D) -> pool rows dst [BLOCK_R] (rows rm), quantized
        offs_d = tl.arange(0, BLOCK_D)
        nm = offs_d < NOPE
        NGB: tl.constexpr = BLOCK_D // 64
        amax = tl.max(tl.reshape(tl.where(nm[None, :], tl.abs(x), 0.0), [BLOCK_R, NGB, 64]), axis=2)
        c = _pow2_exp(amax)  # [BLOCK_R, NGB]
        inv = ((127 - c) << 23).to(tl.float32, bitcast=True)  # 2^-c
        inv = tl.reshape(tl.broadcast_to(inv[:, :, None], [BLOCK_R, NGB, 64]), [BLOCK_R, BLOCK_D])
        q = _to_e4m3(tl.minimum(tl.maximum(x * inv, -448.0), 448.0))
        tl.store(nope_ptr + dst[:, None] * s_nope + offs_d[None, :], q, mask=rm[:, None] & nm[None, :])
        offs_g = tl.arange(0, NGB)
        tl.store(exp_ptr + dst[:, None] * s_exp + offs_g[None, :], (c + 127).to(tl.uint8),
                 mask=rm[:, None] & (offs_g * 64 < NOPE)[None, :])
        tl.store(rope_ptr + dst[:, None] * s_rope + (offs_d - NOPE)[None, :], x.to(tl.bfloat16),
                 mask=rm[:, None] & (~nm & (offs_d < D))[None, :])

    @triton.jit
    def _store_key_rows(x_ptr, rows_ptr, key_ptr, scale_ptr, n, s_x, s_key,
                        D: tl.constexpr, BLOCK_R: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < n
        dst = tl.load(rows_ptr + r, mask=rm, other=0).to(tl.int64)
        offs_d = tl.arange(0, D)
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * s_x + offs_d[None, :], mask=rm[:, None],
                    other=0.0).to(tl.bfloat16).to(tl.float32)
        c = _pow2_exp(tl.max(tl.abs(x), axis=1))  # [BLOCK_R]
        inv = ((127 - c) << 23).to(tl.float32, bitcast=True)
        q = _to_e4m3(tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0))
        tl.store(key_ptr + dst[:, None] * s_key + offs_d[None, :], q, mask=rm[:, None])
        tl.store(scale_ptr + dst, ((c + 127) << 23).to(tl.float32, bitcast=True), mask=rm)


def _fused(x: torch.Tensor, fused: bool | None) -> bool:
    if fused is None:
        fused = x.is_cuda
    return fused and triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def store_kv_rows(nope: torch.Tensor, exp: torch.Tensor, rope: torch.Tensor, rows: torch.Tensor, x: torch.Tensor,
                  *, fused: bool | None = False) -> None:
    """(nope, exp, rope)[rows] = quantize_kv_rows(x) (same bits): x [n, D], rows [n] int64 (repeats race).

    fused: one Triton launch (None = on CUDA); False: torch ops. The fused path writes only exp's group bytes
    (the pad bytes keep the 127 they were allocated with)."""
    n, d = x.shape
    dn = nope.shape[1]
    if not _fused(x, fused):
        for t, v in zip((nope, exp, rope), quantize_kv_rows(x, d - dn)):
            if t.dtype == FP8:  # index_copy_ has no e4m3 kernels: copy the bits
                t, v = t.view(torch.uint8), v.view(torch.uint8)
            t.index_copy_(0, rows, v)
        return
    assert x.stride(-1) == 1 and nope.stride(-1) == exp.stride(-1) == rope.stride(-1) == 1
    if n == 0:
        return
    block_r = 16
    _store_kv_rows[(triton.cdiv(n, block_r),)](
        x, rows, nope.view(torch.uint8), exp, rope, n, x.stride(0), nope.stride(0), exp.stride(0), rope.stride(0),
        D=d, NOPE=dn, BLOCK_D=max(128, triton.next_power_of_2(d)), BLOCK_R=block_r, num_warps=4,
    )


def store_key_rows(keys: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, x: torch.Tensor,
                   *, fused: bool | None = False) -> None:
    """(keys, scale)[rows] = quantize_rows(x, D) (same bits): x [n, D], scale [N] fp32, rows [n] int64."""
    n, d = x.shape
    if not (_fused(x, fused) and d & (d - 1) == 0):
        q, s = quantize_rows(x, d)
        keys.view(torch.uint8).index_copy_(0, rows, q.view(torch.uint8))
        scale.index_copy_(0, rows, s.view(-1))
        return
    assert x.stride(-1) == 1 and keys.stride(-1) == 1 and scale.is_contiguous()
    if n == 0:
        return
    block_r = 16
    _store_key_rows[(triton.cdiv(n, block_r),)](
        x, rows, keys.view(torch.uint8), scale, n, x.stride(0), keys.stride(0),
        D=d, BLOCK_R=block_r, num_warps=4,
    )
