"""⑥ kernels, RoPE tiles (Triton device functions, no launch of their own). inv_rope_tile: an attention kernel's fp32
output tile o [R, C] (R heads of token t, columns d0 .. d0 + C of D) in, the bf16 tile to store out, with the pairs of
the last 2 * HALF of the D columns rotated by -angle (the inverse RoPE of ds4f.kernels.rope.rope_ / rope_ref).
norm_rope_tile: rows loaded, RMS-normed and rotated (ds4f.kernels.rope's kernels, kv_store's, and sparse attention's
q prologue).

Rounding: o is rounded to bf16 first, then rotated in fp32 and rounded again, exactly the ops of storing o and then
running rope_(o, cos, sin, inverse=True) on it; the other columns are stored as the plain bf16 rounding of o.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch references
    triton = None

if triton is not None:

    @triton.jit
    def inv_rope_tile(o, cos_ptr, sin_ptr, t, s_cs, d0, D: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr,
                      C: tl.constexpr):
        # d0 even (C-column chunks never split a pair); cos / sin rows [*, HALF] fp32 at token t * s_cs
        ob = o.to(tl.bfloat16)
        e, od = tl.split(tl.reshape(ob, [R, C // 2, 2]))  # bf16 split: half the layout shuffle of fp32
        e = e.to(tl.float32)
        od = od.to(tl.float32)
        ci = d0 // 2 + tl.arange(0, C // 2) - (D // 2 - HALF)  # cos / sin column; outside [0, HALF): not rotated
        cm = (ci >= 0) & (ci < HALF)
        c = tl.load(cos_ptr + t * s_cs + ci, mask=cm, other=1.0)[None, :]
        s = (tl.load(sin_ptr + t * s_cs + ci, mask=cm, other=0.0) * -1.0)[None, :]
        keep = (~cm)[None, :]  # stored as rounded, bit for bit (no e * 1 - od * 0 sign-of-zero flips)
        ye = tl.where(keep, e, e * c - od * s).to(tl.bfloat16)
        yo = tl.where(keep, od, od * c + e * s).to(tl.bfloat16)
        y = tl.join(ye, yo)
        return tl.reshape(y, [R, C])

    @triton.jit
    def norm_rope_tile(x_ptr, w_ptr, cos_ptr, sin_ptr, rm, tok, xrow, s_cs, eps, sign, HD: tl.constexpr,
                       HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, NORM: tl.constexpr,
                       HAS_W: tl.constexpr):
        # rows at x_ptr + xrow (rm: valid; tok: their tokens) -> (y [BLOCK_R, 2 * BLOCK_P] in x's dtype, channels,
        # mask): normed (NORM) and rotated, in channel order
        NOPE_P: tl.constexpr = HD // 2 - HALF
        P0: tl.constexpr = 0 if NORM else NOPE_P  # rotate only: touch the rope pairs alone
        ch = 2 * P0 + tl.arange(0, 2 * BLOCK_P)  # channels, loaded contiguously, then split into (even, odd)
        chm = ch < HD
        m2 = rm[:, None] & chm[None, :]
        xv = tl.load(x_ptr + xrow[:, None] + ch[None, :], mask=m2, other=0.0)
        dt = xv.dtype
        if NORM:
            f = xv.to(tl.float32)
            r = tl.rsqrt(tl.sum(f * f, 1) / HD + eps)
            f = f * r[:, None]
            if HAS_W:
                f = f * tl.load(w_ptr + ch, mask=chm, other=0.0)[None, :]
            xv = f.to(dt)  # the normed row is rounded to x's dtype before it rotates (as the reference)
        e, o = tl.split(tl.reshape(xv.to(tl.float32), [BLOCK_R, BLOCK_P, 2]))
        ci = P0 + tl.arange(0, BLOCK_P) - NOPE_P  # cos / sin column; < 0: a nope pair (cos 1, sin 0)
        cm = rm[:, None] & (ci >= 0)[None, :] & (ci < HALF)[None, :]
        c = tl.load(cos_ptr + tok[:, None] * s_cs + ci[None, :], mask=cm, other=1.0)
        s = tl.load(sin_ptr + tok[:, None] * s_cs + ci[None, :], mask=cm, other=0.0) * sign
        y = tl.join((e * c - o * s).to(dt), (o * c + e * s).to(dt))
        return tl.reshape(y, [BLOCK_R, 2 * BLOCK_P]), ch, m2
