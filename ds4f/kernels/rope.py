"""⑥ kernels, RoPE: rows [T, H, hd] (or [T, hd]) + per-token cos / sin [T, rd/2] in, rotated rows out.

Only the last rd = 2 * cos.shape[1] channels rotate (interleaved pairs, fp32 math, x's dtype out), so
`rope_(x, ...)` rewrites just those channels in place, and `norm_rope(x, w, ...)` writes a new tensor =
(optionally weighted) RMSNorm of each row, rounded to x's dtype, then rotated: the per-head q norm + RoPE and the
kv_norm + RoPE of ds4f.model.attention in one kernel each; `norm_rope2(q, kv, w_kv, ...)` does both of those in
one launch (same per-row code, same results). Triton on CUDA, the torch reference elsewhere.
"""

from __future__ import annotations

import torch

from ds4f.kernels import pdl
from ds4f.kernels.sparse_attn import use_triton
from ds4f.model.layers import rms_normalize

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.rope_tile import norm_rope_tile as _norm_rope_tile
except ImportError:  # CPU-only installs: the torch references below
    triton = None


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """= model.layers.Rope.forward: interleaved rotation of the last 2 * cos.shape[1] channels (new tensor)."""
    rd = 2 * cos.shape[1]
    if inverse:
        sin = -sin
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    nope, rope = x[..., :-rd], x[..., -rd:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)


def norm_rope_ref(x: torch.Tensor, w: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (weighted by w [hd] fp32 if given; = model.layers.RMSNorm) in x's dtype, then RoPE."""
    n = rms_normalize(x.float(), eps)
    return rope_ref((n if w is None else w * n).to(x.dtype), cos, sin, False)


if triton is not None:

    @triton.jit
    def _norm_rope_rows(x_ptr, o_ptr, w_ptr, cos_ptr, sin_ptr, pid, N, H, s_xt, s_xh, s_ot, s_oh, s_cs, eps, sign,
                        HD: tl.constexpr, HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                        NORM: tl.constexpr, HAS_W: tl.constexpr):
        # block pid = BLOCK_R rows (token, head) of HD channels as (even, odd) pairs; pairs >= HD/2 - HALF rotate
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < N
        tok = (rows // H).to(tl.int64)
        head = (rows % H).to(tl.int64)
        orow = tok * s_ot + head * s_oh
        y, ch, m2 = _norm_rope_tile(x_ptr, w_ptr, cos_ptr, sin_ptr, rm, tok, tok * s_xt + head * s_xh, s_cs, eps, sign,
                                    HD, HALF, BLOCK_P, BLOCK_R, NORM, HAS_W)
        tl.store(o_ptr + orow[:, None] + ch[None, :], y, mask=m2)

    @triton.jit
    def _rope_kernel(x_ptr, o_ptr, w_ptr, cos_ptr, sin_ptr, N, H, s_xt, s_xh, s_ot, s_oh, s_cs, eps, sign,
                     HD: tl.constexpr, HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                     NORM: tl.constexpr, HAS_W: tl.constexpr, PDL: tl.constexpr = False):
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        _norm_rope_rows(x_ptr, o_ptr, w_ptr, cos_ptr, sin_ptr, tl.program_id(0), N, H, s_xt, s_xh, s_ot, s_oh, s_cs,
                        eps, sign, HD, HALF, BLOCK_P, BLOCK_R, NORM, HAS_W)

    @triton.jit
    def _norm_rope2_kernel(q_ptr, qo_ptr, kv_ptr, kvo_ptr, w_ptr, cos_ptr, sin_ptr, NQP, NQ, HQ, NKV,
                           s_qt, s_qh, s_qot, s_qoh, s_kvt, s_kvot, s_cs, eps,
                           HDQ: tl.constexpr, HDK: tl.constexpr, HALF: tl.constexpr, BPQ: tl.constexpr,
                           BPK: tl.constexpr, BRQ: tl.constexpr, BRK: tl.constexpr, HAS_W: tl.constexpr,
                           PDL: tl.constexpr = False):
        # programs [0, NQP): q rows (token, head), unweighted; the rest: kv rows (one per token), weighted by w
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        pid = tl.program_id(0)
        if pid < NQP:
            _norm_rope_rows(q_ptr, qo_ptr, w_ptr, cos_ptr, sin_ptr, pid, NQ, HQ, s_qt, s_qh, s_qot, s_qoh, s_cs,
                            eps, 1.0, HDQ, HALF, BPQ, BRQ, True, False)
        else:
            _norm_rope_rows(kv_ptr, kvo_ptr, w_ptr, cos_ptr, sin_ptr, pid - NQP, NKV, 1, s_kvt, 0, s_kvot, 0,
                            s_cs, eps, 1.0, HDK, HALF, BPK, BRK, True, HAS_W)


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """[T, hd] or [T, H, hd] (or more head dims, packed) -> a [T, H, hd] view with unit channel stride."""
    t, hd = x.shape[0], x.shape[-1]
    v = x.unsqueeze(1) if x.dim() == 2 else x.view(t, -1, hd) if x.dim() > 3 else x
    assert v.stride(2) == 1, "channels must be contiguous"
    return v


def _blocks(hd: int, half: int, norm: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_R): pairs per row tile (all of a row when normalizing) and rows per program."""
    block_p = triton.next_power_of_2(hd // 2 if norm else half)
    return block_p, max(1, min(64, 4096 // (2 * block_p)))


def _launch(x: torch.Tensor, out: torch.Tensor, w: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
            eps: float, inverse: bool, norm: bool) -> None:
    x3, o3 = _rows3(x), _rows3(out)
    t, h, hd = x3.shape
    n = t * h
    if n == 0:
        return
    half = cos.shape[1]
    block_p, block_r = _blocks(hd, half, norm)
    _rope_kernel[(triton.cdiv(n, block_r),)](
        x3, o3, w if w is not None else cos, cos, sin, n, h, x3.stride(0), x3.stride(1), o3.stride(0),
        o3.stride(1), cos.stride(0), eps, -1.0 if inverse else 1.0, HD=hd, HALF=half, BLOCK_P=block_p,
        BLOCK_R=block_r, NORM=norm, HAS_W=w is not None, num_warps=4, **pdl.launch(x.device))


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    assert x.dim() >= 2 and x.shape[-1] % 2 == 0 and 2 * cos.shape[1] <= x.shape[-1], (x.shape, cos.shape)
    assert cos.shape == sin.shape and cos.shape[0] == x.shape[0], (x.shape, cos.shape, sin.shape)
    assert cos.dtype == sin.dtype == torch.float32 and cos.stride(1) == sin.stride(1) == 1
    assert cos.stride(0) == sin.stride(0)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """In place: x [T, ..., hd] -> x with its last 2 * cos.shape[1] channels rotated (inverse: by -angle); returns x."""
    _check(x, cos, sin)
    if not use_triton(x):
        rd = 2 * cos.shape[1]
        x[..., -rd:] = rope_ref(x[..., -rd:], cos, sin, inverse)
        return x
    _launch(x, x, None, cos, sin, 0.0, inverse, norm=False)
    return x


def norm_rope(x: torch.Tensor, w: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """x [T, hd] (any row stride) or [T, H, hd], w [hd] or None -> RMSNorm(x) (fp32 math) then RoPE, new tensor."""
    _check(x, cos, sin)
    assert w is None or w.shape == (x.shape[-1],), (x.shape, w.shape)
    if not use_triton(x):
        return norm_rope_ref(x, w, cos, sin, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, out, None if w is None else w.float().contiguous(), cos, sin, eps, False, norm=True)
    return out


def norm_rope2(q: torch.Tensor, kv: torch.Tensor, w_kv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm_rope(q, None, ...), norm_rope(kv, w_kv, ...)) in one launch: q [T, H, hd] (per-head RMSNorm + RoPE) and
    kv [T, hd'] (any row stride; weighted by w_kv [hd'] if given), bit for bit what the two calls return."""
    _check(q, cos, sin)
    _check(kv, cos, sin)
    assert kv.dim() == 2 and (w_kv is None or w_kv.shape == (kv.shape[-1],)), (kv.shape, w_kv)
    if not use_triton(q):
        return norm_rope_ref(q, None, cos, sin, eps), norm_rope_ref(kv, w_kv, cos, sin, eps)
    q3, k3 = _rows3(q), _rows3(kv)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(kv.shape, dtype=kv.dtype, device=kv.device)
    qo3, ko3 = _rows3(qo), _rows3(ko)
    t, h, hdq = q3.shape
    if t == 0:
        return qo, ko
    half, hdk = cos.shape[1], k3.shape[2]
    bpq, brq = _blocks(hdq, half, True)
    bpk, brk = _blocks(hdk, half, True)
    nqp = triton.cdiv(t * h, brq)
    w = None if w_kv is None else w_kv.float().contiguous()
    _norm_rope2_kernel[(nqp + triton.cdiv(t, brk),)](
        q3, qo3, k3, ko3, w if w is not None else cos, cos, sin, nqp, t * h, h, t, q3.stride(0), q3.stride(1),
        qo3.stride(0), qo3.stride(1), k3.stride(0), ko3.stride(0), cos.stride(0), eps, HDQ=hdq, HDK=hdk, HALF=half,
        BPQ=bpq, BPK=bpk, BRQ=brq, BRK=brk, HAS_W=w is not None, num_warps=4, **pdl.launch(q.device))
    return qo, ko
