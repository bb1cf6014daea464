"""⑥ kernels, MXFP4 routed MoE at decode sizes: x [T, D] bf16 (T * k picks <= MAX_PICKS) + packed experts + top-k
routing in, Σ_j w_j·expert_j(x) (+ a shared expert's output) [T, D] bf16 out, in two launches.

Swap-AB on tensor cores, as ds4f/kernels/gemv.py: each program streams a [BLOCK_N, BLOCK_K/4] tile of one picked
expert's packed 16-bit words (4 nibbles = K columns 4w..4w+3; the A operand of tl.dot, pipelined through shared
memory) against x^T. Nibble r of each word decodes with a one-input PTX routine to exact bf16 without its UE8M0
scale (~2.2 instructions per value), so Triton hoists the MMA-operand layout conversion to the load: the words go
from shared memory into the operand registers undecoded and are decoded there (no 16-bit tile round trip through
shared memory, which bounded the older tl.dot tiles). One dot per residue r against B_r, x's columns 4w + r.
The scale is applied to dot partials: the 16 columns of B that a GEMV would waste on padding hold x split by scale
group, B_r[w, j] = x[4w + r] if (4w + r) // 32 == j (BLOCK_K <= 512), so acc[n, j] is row n's partial over group j
and one fp32 multiply by 2^(s[n, j] - 127) per 32 values applies the scale, as the reference does (fp32 products of
exact bf16 values, fp32 sums; only the summation order differs). Offline sm_90 builds (64x256 tiles): 3.3 (up) /
3.6 (down) instructions per weight value in the main loop (2.8 / 3.2 with SUB), no spills, ~156 / ~90 registers.

_dec_up: program (pick m, BLOCK_N gate rows + the same up rows, K slice) -> SwiGLU activation row a[m] (bf16, as the
reference rounds it); with SPLIT > 1 the slices' fp32 partials are summed in slice order by the last program of the
tile to arrive (ds4f/kernels/arrival.py counters, re-armed by that program: CUDA-graph safe).
_dec_down: program ((token t, BLOCK_N output rows), (pick j, K slice)); the last of the k * SPLIT programs of a tile
to arrive sums their weighted partials in (pick, slice) order, adds the shared expert's output and stores bf16: the
pick sum is fused, no [T*k, D] fp32 rows and no separate sum launch.

Tiles per (D, I) shape from CONFIGS (bench/sweep_mxfp4_decode.py fills it), env DS4F_MXFP4_DEC=bn_up,bk_up,split_up,
nw_up,ns_up,bn_dn,bk_dn,split_dn,nw_dn,ns_dn overrides, DS4F_MXFP4_DEC=0 turns the path off (moe_mxfp4's CUDA-core
GEMV), DS4F_MXFP4_DEC_SUB=1|0 forces the SUB decode on|off (default: on for sm_90; one instruction fewer per two
values; needs subnormal bf16 MMA inputs, see _SUB_ASM). Two concurrent calls of one shape on two streams would share
the tile counters: not supported. The Triton programs and the decode routines (_NIB_ASM, _SUB_ASM) live in
ds4f/kernels/moe_mxfp4_decode_kernels.py (imported only where triton is).
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.knobs import env_knobs

try:
    import triton

    from ds4f.kernels.moe_mxfp4_decode_kernels import _dec_down, _dec_up
except ImportError:  # CPU-only installs: moe_mxfp4 never calls in here without triton
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_PICKS = 64  # T * k up to this: this path (each pick reads its expert; a repeated expert is read again)

_SUB_ENV = os.environ.get("DS4F_MXFP4_DEC_SUB", "")


@cache
def sub_default(device: torch.device) -> bool:
    """The SUB decode for launches on device: DS4F_MXFP4_DEC_SUB if set, else on for sm_90 (H100 / H200) only (a CPU
    device, the interpreter: off)."""
    if _SUB_ENV in ("0", "1"):
        return _SUB_ENV == "1"
    if device.type != "cuda":
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(i) == (9, 0)

Cfg = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages

# (D, I, token bucket) -> (up config, down config); bucket 1: T = 1, bucket 4: T >= 2. V4-Flash: D = 4096,
# I = 2048 / tp. bench/sweep_mxfp4_decode.py on an H200, 2026-11-29 (bench/results/moe_mxfp4.jsonl), us per layer
# for 6 picks (up + down, graphs over distinct random picks) vs the former CUDA-core GEMV + moe_sum:
CONFIGS: dict[tuple[int, int, int], tuple[Cfg, Cfg] | None] = {  # None: moe_mxfp4's GEMV wins there
    (4096, 1024, 1): ((64, 256, 4, 4, 4), (64, 256, 4, 4, 4)),  # TP=2: 28.2 vs 35.8
    (4096, 1024, 4): ((64, 256, 1, 4, 4), (64, 256, 1, 4, 4)),  # 77.8 vs 108.9
    (4096, 2048, 1): ((64, 256, 2, 4, 4), (64, 256, 1, 4, 4)),  # TP=1: 45.1 vs 62.4
    (4096, 2048, 4): ((64, 256, 1, 4, 4), (64, 256, 1, 4, 4)),  # 139.5 vs 199.7
}


def bucket(T: int) -> int:
    return 1 if T <= 1 else 4


@cache
def _env() -> tuple[Cfg, Cfg] | None | str:
    """DS4F_MXFP4_DEC: "0" -> None (path off), ten ints -> (up, down) configs, unset -> "table"."""
    if os.environ.get("DS4F_MXFP4_DEC", "") == "0":
        return None
    v = env_knobs("DS4F_MXFP4_DEC", 10, "64,256,8,4,4,64,256,2,4,4")
    return (v[:5], v[5:]) if v else "table"  # type: ignore[return-value]


def generic_config(D: int, I: int, T: int) -> tuple[Cfg, Cfg]:
    """Configs for a shape the table lacks: 64-row tiles, 256-column steps, K split to 2 (T = 1) or 4 steps per
    program, at most 8 ways."""
    def one(n: int, k: int) -> Cfg:
        bn = next(b for b in (64, 32, 16) if n % b == 0)
        bk = next((b for b in (256, 128, 64) if k % b == 0), 64)
        split = max(1, min(8, k // ((2 if T <= 1 else 4) * bk)))
        while split > 1 and k % (split * bk):
            split -= 1
        return bn, bk, split, 4, 4  # k off the 64 grid: fits() rejects it (the caller's other paths run)
    return one(I, D), one(D, I)


def pick(D: int, I: int, T: int) -> tuple[Cfg, Cfg] | None:
    """(up, down) configs for (D, I, T): env override, then the table, then generic_config; None = this path off
    (env "0", or a None table entry)."""
    env = _env()
    if env is None:
        return None
    if env != "table":
        return env  # type: ignore[return-value]
    key = (D, I, bucket(T))
    return CONFIGS[key] if key in CONFIGS else generic_config(D, I, T)


def fits(cfgs: tuple[Cfg, Cfg], D: int, I: int) -> bool:
    """Whether (up, down) tile the shape exactly (no masks in the kernels) with BLOCK_K in [64, 512] (>= 16 words
    per residue dot)."""
    (bn_u, bk_u, sp_u, *_), (bn_d, bk_d, sp_d, *_) = cfgs
    return (I % bn_u == 0 and D % (sp_u * bk_u) == 0 and D % bn_d == 0 and I % (sp_d * bk_d) == 0
            and all(64 <= b <= 512 and b % 64 == 0 for b in (bk_u, bk_d)) and min(bn_u, bn_d) >= 16)


def tiles_for(config: dict | None, native: bool, T: int, k: int, D: int, I: int) -> tuple[Cfg, Cfg] | None:
    """fused_moe_mxfp4's choice: config["DEC"] (ten ints, up then down; any device the kernels run on) forces these
    kernels; with no config, native CUDA calls of T * k <= MAX_PICKS picks take pick()'s tiles where they fit;
    None = moe_mxfp4's own GEMM / GEMV paths."""
    if config is not None:
        v = config.get("DEC")
        if not v:
            return None
        cfgs = (tuple(v[:5]), tuple(v[5:]))
        assert len(v) == 10 and fits(cfgs, D, I), f"DEC={v} does not tile D={D}, I={I}"  # type: ignore[arg-type]
        assert T * k <= MAX_PICKS, f"DEC: {T * k} picks > {MAX_PICKS}"
        return cfgs  # type: ignore[return-value]
    cfgs = pick(D, I, T) if native and T * k <= MAX_PICKS else None
    return cfgs if cfgs is not None and fits(cfgs, D, I) else None


def moe_decode(x: torch.Tensor, w13: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor],
               ids: torch.Tensor, weights: torch.Tensor, limit: float, shared_out: torch.Tensor | None,
               cfgs: tuple[Cfg, Cfg], asm: bool, sub: bool = False, shared_ready: Any = None, form: str = "dec",
               act_out: list[torch.Tensor] | None = None, out_f32: bool = False, x_side: Any = None) -> torch.Tensor:
    """The two launches. x [T, D] bf16; w13 = (bytes [E, 2I, D/2], UE8M0 [E, 2I, D/32]) and w2 = ([E, D, I/2],
    [E, D, I/32]) uint8, contiguous (moe_mxfp4 checked them; the bf16 form reads the bytes as int16 words); ids
    [T, k] int32, weights [T, k] fp32; shared_out [T, D] or None; cfgs from pick() that fits() the shape; asm: the PTX
    decode (CUDA), sub: its SUB form; form: "dec" these kernels, "a8" moe_mxfp4_a8's (FP8 activations; asm / sub
    unused), "cc" moe_mxfp4_cc's CUDA-core kernels (cfgs its fits(): num_stages = DEPTH);
    shared_ready: the stream computing shared_out, joined before down reads it; act_out: a list that receives the
    activation rows a [T*k, I] bf16; out_f32 (form "a8"): the pick sum in fp32, out [T, D] fp32; x_side (form "a8",
    CUDA): (stream, event recorded on the caller's stream before its router launch): x's MMA operands (_a8_expand)
    are built on that stream from the event on, beside the router, and joined right before the up launch, instead
    of between the router and the up kernel on the chain. -> [T, D] bf16."""
    (q13, s13), (q2, s2) = w13, w2
    xb = xb_down = None
    half = False  # a8: one weight half per up program (moe_mxfp4_a8.HALF)
    fu: dict[str, int] = {}
    fd: dict[str, int] = {}
    (bn_u, bk_u, sp_u, nw_u, ns_u), (bn_d, bk_d, sp_d, nw_d, ns_d) = cfgs
    assert form in ("dec", "a8", "cc"), form
    if form == "cc":
        from ds4f.kernels import moe_mxfp4_cc as mcc
        from ds4f.kernels.moe_mxfp4_cc import _cc_down as down
        from ds4f.kernels.moe_mxfp4_cc import _cc_up as up

        q13, q2 = q13.view(torch.int16), q2.view(torch.int16)  # 4 nibbles (K columns 4w..4w+3) per word
        name, per, flags, ppp = "mxfp4_cc", 4, {}, 1
        fu, fd, ns_u, ns_d = dict(DEPTH=ns_u, SUB=mcc.SUB), dict(DEPTH=ns_d, SUB=mcc.SUB), 1, 1
    elif form == "a8":
        from ds4f.kernels import moe_mxfp4_a8 as a8
        from ds4f.kernels.moe_mxfp4_a8 import _a8_down as down
        from ds4f.kernels.moe_mxfp4_a8 import _a8_up as up

        half = bucket(x.shape[0]) in a8.HALF
        name, per, flags = "mxfp4_a8", 2, {}  # bytes: 2 columns each
        fu = dict(HALF=True) if half else {}  # the up launch's only
        ppp = a8.down_picks(x.shape[0], ids.shape[1])
        if (a8.XB or half) and x_side is not None:
            side, fork = x_side
            side.wait_event(fork)
            with torch.cuda.stream(side):  # read on this stream only after the join below (memory: see the caller)
                xb = a8.expand_x(x, cfgs[0][1])
            built = torch.cuda.Event()
            built.record(side)
            torch.cuda.current_stream().wait_event(built)
        elif a8.XB or half:
            xb = a8.expand_x(x, cfgs[0][1])
    else:
        up, down = _dec_up, _dec_down
        q13, q2 = q13.view(torch.int16), q2.view(torch.int16)  # 4 nibbles (K columns 4w..4w+3) per word
        name, per, flags, ppp = "mxfp4_dec", 4, dict(ASM=int(asm), SUB=int(sub)), 1
    T, D = x.shape
    k = ids.shape[1]
    I = q2.shape[2] * per
    M = T * k
    dev = x.device
    flat = ids.contiguous().view(-1)
    tw = weights.contiguous().view(-1)
    f32 = int(_INTERPRET)
    a = torch.empty(M, I, dtype=torch.bfloat16, device=dev)
    nt_u = I // bn_u
    arrive = sp_u > 1 or half  # HALF: the gate and up halves of a tile meet by arrival too
    part_u = torch.empty(M * sp_u * 2 * I if arrive else 1, dtype=torch.float32, device=dev)
    # counters sized for MAX_PICKS whatever T is: one buffer per key for every batch size, so a graph captured at
    # one T never holds a buffer that a later, larger T replaced
    lock_u = arrival.counters(dev, MAX_PICKS * nt_u, (f"{name}_up", I, bn_u)) if arrive else part_u
    up[(M, nt_u, sp_u * (2 if half else 1))](
        x, q13, s13, flat, a, part_u, lock_u, float(limit), x.stride(0), q13.stride(0), q13.stride(1), s13.stride(0),
        s13.stride(1), a.stride(0), I=I, DM=D, TOPK=k, BLOCK_N=bn_u, BLOCK_K=bk_u, SPLIT=sp_u, F32=f32,
        num_warps=nw_u, num_stages=ns_u, **flags, **fu,
        **({} if xb is None else dict(XB=True, xb_ptr=xb[0], xs_ptr=xb[1])), **pdl.launch(dev))
    if act_out is not None:
        act_out.append(a)
    if form == "a8" and bucket(T) in a8.XB_DOWN:
        xb_down = a8.expand_x(a, bk_d)
    assert not out_f32 or form == "a8", "out_f32: the a8 down kernel only"
    out = torch.empty(T, D, dtype=torch.float32 if out_f32 else torch.bfloat16, device=dev)
    nt_d = D // bn_d
    part_d = torch.empty(T * k * sp_d * D, dtype=torch.float32, device=dev)
    lock_d = arrival.counters(dev, MAX_PICKS * nt_d, (f"{name}_down", D, bn_d))
    if shared_ready is not None:
        torch.cuda.current_stream().wait_stream(shared_ready)
    sh = shared_out.contiguous() if shared_out is not None else out
    down[(T * nt_d, k // ppp * sp_d)](
        a, q2, s2, flat, tw, sh, out, part_d, lock_d, a.stride(0), q2.stride(0), q2.stride(1), s2.stride(0),
        s2.stride(1), sh.stride(0), out.stride(0), DM=D, I=I, TOPK=k, BLOCK_N=bn_d, BLOCK_K=bk_d, SPLIT=sp_d,
        HAS_SH=shared_out is not None, F32=f32, num_warps=nw_d, num_stages=ns_d, **flags, **fd, **pdl.launch(dev),
        **({} if xb_down is None else dict(XB=True, xb_ptr=xb_down[0], xs_ptr=xb_down[1])),
        **({} if ppp == 1 else dict(PPP=ppp)), **({} if not out_f32 else dict(OUT_F32=True)))
    return out
