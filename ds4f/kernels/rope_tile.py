"""⑥ kernels, RoPE epilogue tile (Triton device function, no launch of its own): an attention kernel's fp32 output
tile o [R, C] (R heads of token t, columns d0 .. d0 + C of D) in, the bf16 tile to store out, with the pairs of the
last 2 * HALF of the D columns rotated by -angle (the inverse RoPE of ds4f.kernels.rope.rope_ / rope_ref).

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
