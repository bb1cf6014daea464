"""⑥ kernels, block-FP8 decode GEMV: x [T, G, K] bf16 (T <= MAX_T tokens) + W [G*N, K] e4m3 with one scale per
128x128 block (fp32, or UE8M0 bytes) in, x @ W^T [T, G, N] out (G > 1: group g's rows read x[:, g]; wo_a).

Swap-AB, as the bf16 GEMV (ds4f/kernels/gemv.py): each program streams a [BLOCK_N, BLOCK_K] tile of W (the A operand
of tl.dot, pipelined over num_stages) against x^T [128, 16] (T zero-padded to 16), so the weight is read once at full
width whatever T is. Per 128-column scale block: the e4m3 tile is widened to bf16 in registers (by integer ops in
inline PTX on any sm_80+, E4M3_BF16_ASM; with DS4F_FP8_GEMV_WIDEN=cvt and in the interpreter: Triton's cvt on sm_89+,
fp16 bit patterns below), dotted, and the fp32 partial is scaled by the block's scale; BLOCK_N divides 128, so a
tile's rows share one scale row. Same math as fp8_gemm.fp8_linear_ref up to fp32 summation order. A K split (fp32
partials) is summed in split order by the last program of each N tile to arrive (ds4f/kernels/arrival.py counters,
re-armed by that program: CUDA-graph safe).

The a8 form (sm_89+, the default for the shapes in CONFIGS_A8; DS4F_FP8_GEMV_A8=0 / 1: none / all): each program
quantizes its x tiles per token per 128 columns to e4m3 with power-of-two scales (fp8_gemm.quant_act_ref's math,
the checkpoint's dynamic activation scheme) and dots the e4m3 weight tile as loaded against them (no widening),
scaling each 128-column partial by both scales.

Configs (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages) per (G*N, K, G) from CONFIGS (bench/sweep_fp8_gemv.py on an
H200 fills it; None = fp8_gemm's w8 tiles win there), env DS4F_FP8_GEMV_<NAME>=bn,bk,split,nw,ns ("0": the w8 tiles),
else generic_config. DS4F_FP8_GEMV=0 turns the path off (fp8_gemm's _w8_kernel for every M). Counters are per
weight shape: two calls of one shape must not run at once on two streams (decode's side-stream indexer wq_b differs
in shape from wq_b). The Triton programs are in fp8_gemv_kernels.py.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.fp8_gemv_kernels import _fp8_gemv  # None without triton
from ds4f.kernels.knobs import env_knobs
from ds4f.kernels.sparse_attn import sm_count

MAX_T = 16  # tokens per call (decode buckets 1, 4, 16)
BLOCK_T = 16  # tl.dot's smallest N: T columns padded with zeros
USE_GEMV = os.environ.get("DS4F_FP8_GEMV", "1") != "0"

Cfg = tuple[int, int, int, int, int]  # BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages

# name -> ((G*N, K, G), config or None for fp8_gemm's _w8_kernel): the per-rank decode projections of V4-Flash
# (ds4f/model/args.py flash_config sharded by ds4f/model/tp.py). IN_PROJ = [wq_a; wkv] (the fp8 run of
# runner/gpu/packed.InProj in every layer type: the compressor / indexer input linears are bf16), IDX_WQ_B = the
# indexer's wq_b (CSA layers, replicated; on a side stream beside WQ_B), W13 = the shared expert's [w1; w3].
# WO_B_TP2 is also W13_TP1. bench/sweep_fp8_gemv.py on an H200, 2026-11-29 (bench/results/fp8_gemv.jsonl), one
# token, us this kernel vs _w8_kernel's default tiles (each shape from HBM: weight copies rotated past the L2):
CONFIGS: dict[str, tuple[tuple[int, int, int], Cfg | None]] = {
    "IN_PROJ": ((1536, 4096, 1), (32, 128, 6, 4, 6)),  # 6.94 vs 7.69
    "IDX_WQ_B": ((8192, 1024, 1), (32, 128, 1, 4, 6)),  # 6.26 vs 7.94
    "WQ_B_TP2": ((16384, 1024, 1), (64, 128, 1, 4, 4)),  # 8.93 vs 11.93
    "WO_A_TP2": ((4096, 4096, 4), (32, 128, 3, 4, 6)),  # 10.26 vs 11.63
    "WO_B_TP2": ((4096, 4096, 1), (32, 128, 3, 4, 6)),  # 10.29 vs 11.66
    "W13_TP2": ((2048, 4096, 1), (64, 128, 8, 4, 4)),  # 7.49 vs 8.01
    "W2_TP2": ((4096, 1024, 1), (32, 128, 1, 4, 6)),  # 4.94 vs 6.31
    "WQ_B_TP1": ((32768, 1024, 1), (64, 128, 1, 4, 4)),  # 14.90 vs 17.25
    "WO_A_TP1": ((8192, 4096, 8), (64, 128, 3, 4, 4)),  # 15.71 vs 18.29
    "WO_B_TP1": ((4096, 8192, 1), (32, 128, 3, 4, 6)),  # 15.90 vs 18.18
    "W2_TP1": ((4096, 2048, 1), (32, 128, 2, 4, 6)),  # 7.19 vs 7.94
}

WIDEN_BITS = os.environ.get("DS4F_FP8_GEMV_WIDEN", "bits") != "cvt"  # "cvt": Triton's conversions (as fp8_gemm)
# the a8 form: x quantized per token per 128 columns (pow2 scales, fp8_gemm.quant_act_ref: the checkpoint's dynamic
# activation scheme, as HF's FP8Linear and the prefill's a8w8 path) and an e4m3 x e4m3 dot, so the weight tile feeds
# the MMA as loaded (sm_89+; below, the widening path). Default "table": the shapes CONFIGS_A8 lists; "1": every
# shape; "0": none
A8 = os.environ.get("DS4F_FP8_GEMV_A8", "table")

# the a8 form's tiles per name (bench/sweep_fp8_gemv.py --a8 fills it; a name not here runs the widening form with
# CONFIGS' tiles unless DS4F_FP8_GEMV_A8=1). H200, 2026-11-29 (bench/results/fp8_gemv.jsonl), one token, us a8 vs the
# widening form at its table tiles in the same run. Every TP=2 shape takes it: in the full model's TP=2 rank step
# (bench_full --tp-sim 2, 43 layers) these seven together took the step from 6.184 to 5.559 ms, more than the
# kernels' sums, as the in-proj / shared-expert GEMVs overlap other streams' kernels there
CONFIGS_A8: dict[str, Cfg] = {  # name -> tiles; the shape is CONFIGS' under the same name
    "IN_PROJ": (128, 128, 11, 8, 4),  # 6.47 vs widening 6.37 us
    "IDX_WQ_B": (128, 128, 4, 8, 4),  # 5.53 vs 5.47
    "WQ_B_TP2": (128, 128, 1, 4, 4),  # 7.18 vs 7.71
    "WO_A_TP2": (128, 128, 8, 8, 4),  # 9.00 vs 12.63
    "WO_B_TP2": (128, 128, 8, 8, 4),  # 9.01 vs 12.64
    "W13_TP2": (128, 128, 8, 8, 4),  # 6.76 vs 6.58
    "W2_TP2": (128, 128, 4, 8, 4),  # 4.59 vs 3.93
}


def generic_config(nt: int, k: int, groups: int, sms: int) -> Cfg:
    """A config for a shape the table lacks: 64-row tiles when they give >= 2 programs per SM, else 32; a K split
    up to about 2 programs per SM (>= 2 BLOCK_K steps each)."""
    bk = 256 if k >= 512 else 128
    bn = 64 if nt >= 64 * 2 * sms else 32
    if groups > 1:
        while bn > 16 and (nt // groups) % bn:
            bn //= 2
    tiles, chunks = -(-nt // bn), -(-k // bk)
    split = max(1, min(chunks // 2, 8, -(-2 * sms // tiles)))
    return bn, bk, split, 4, 4


@cache
def _env_config(name: str) -> Cfg | None | str:
    """DS4F_FP8_GEMV_<name>: "0" -> None (the w8 tiles), five ints -> that config, unset -> "table"."""
    var = f"DS4F_FP8_GEMV_{name}"
    if os.environ.get(var, "") == "0":
        return None
    v = env_knobs(var, 5, "64,256,4,4,4")
    return v if v else "table"  # type: ignore[return-value]


def pick(nt: int, k: int, groups: int, dev: torch.device) -> Cfg | None:
    """The config for W [nt, K] in G groups on dev: env override, then CONFIGS_A8 (with A8) or CONFIGS, then
    generic_config; None = use fp8_gemm's _w8_kernel."""
    for name, (shape, cfg) in CONFIGS.items():
        if shape == (nt, k, groups):
            env = _env_config(name)
            if env == "table" and A8 != "0" and name in CONFIGS_A8 and _e4m3(dev):
                return CONFIGS_A8[name]
            return cfg if env == "table" else env  # type: ignore[return-value]
    return generic_config(nt, k, groups, sm_count(dev))


def _e4m3(dev: torch.device) -> bool:
    """e4m3 MMAs on dev (sm_89+; the interpreter: yes): where the a8 form runs (fp8_gemm.fp8_native)."""
    from ds4f.kernels.fp8_gemm import fp8_native

    return fp8_native(dev)


def use_a8(nt: int, k: int, groups: int) -> bool:
    """Whether W [nt, K] in G groups runs the a8 form (DS4F_FP8_GEMV_A8: "table" = the shapes CONFIGS_A8 lists)."""
    if A8 in ("0", "1"):
        return A8 == "1"
    return any(CONFIGS[name][0] == (nt, k, groups) for name in CONFIGS_A8)


def valid(cfg: Cfg, nt: int, groups: int) -> bool:
    """Whether the kernel can run cfg: BLOCK_N a power of two dividing 128 (one scale row per tile) and each group's
    rows, BLOCK_K a multiple of 128."""
    bn, bk, split, nw, ns = cfg
    return (16 <= bn <= 128 and 128 % bn == 0 and (groups == 1 or (nt // groups) % bn == 0)
            and bk % 128 == 0 and bk >= 128 and split >= 1 and nw in (1, 2, 4, 8, 16) and ns >= 1)


@cache
def _smem(index: int) -> int:
    p = torch.cuda.get_device_properties(index)
    return int(getattr(p, "shared_memory_per_block_optin", 99 * 1024))


def smem_of(dev: torch.device) -> int:
    """Opt-in shared memory per block of dev in bytes (the interpreter: an H200's)."""
    if dev.type != "cuda":
        return 227 << 10
    return _smem(dev.index if dev.index is not None else torch.cuda.current_device())


def fit(cfg: Cfg, smem: int) -> Cfg:
    """Fewer pipeline stages where `smem` bytes (~99 KB on sm_86 / sm_12x, 163 KB on sm_80) cannot hold them: a
    stage is the e4m3 tile [BLOCK_N, BLOCK_K] plus bf16 x [16, BLOCK_K]."""
    bn, bk, split, nw, ns = cfg
    while ns > 2 and ns * (bn + 2 * BLOCK_T) * bk > smem - 4096:
        ns -= 1
    return bn, bk, split, nw, ns


def launch(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
           native: bool, cfg: Cfg, bits: bool | None = None, norm: tuple[torch.Tensor, float] | None = None,
           a8: bool | None = None, act: float | None = None, pdl_on: bool = True) -> None:
    """out [T, G, N] (contiguous) = x [T, G, K] (unit inner stride) @ W^T per group, W = w [G*N, K] e4m3 (uint8 bytes
    when not native) with block scales ws [ceil(G*N/128), ceil(K/128)] fp32 or UE8M0 bytes (e8m0). T <= MAX_T.
    bits: widen e4m3 by integer ops (default WIDEN_BITS on CUDA; the interpreter always converts).
    norm = (g [K], eps), one group: out = RMSNorm_g(x) @ W^T (model.layers.RMSNorm on x's rows; no K split).
    a8 (default use_a8; native only): x quantized per token per 128 columns, e4m3 x e4m3 dot (fp8_linear_a8_ref's
    math; with norm, the quantized rows are g * x, the 1 / rms applied after the dot). act = limit (one group):
    x's rows are the gate halves of rows [gate | up] whose up half sits K elements further (x a [T, 1, K] view of
    h [T, 2K]), and the GEMV's input is their SwiGLU (clamp at limit) rounded to bf16, as glue.swiglu_act.
    pdl_on=False: a plain launch even where PDL is on (a kernel on a side stream: launched early it would hold SM
    slots while it waits, beside the main stream's kernels)."""
    a8 = (use_a8(w.shape[0], w.shape[1], groups) if a8 is None else a8) and native
    t, (nt, k) = x.shape[0], w.shape
    bn, bk, split, nw, ns = fit(cfg, smem_of(x.device))
    if not valid(cfg, nt, groups) or t > MAX_T:
        raise ValueError(f"fp8 GEMV config {cfg} invalid for [{nt}, {k}] in {groups} groups at T={t}")
    chunks = -(-k // bk)
    per = -(-chunks // max(1, split))
    split = -(-chunks // per)  # no empty K slice
    if norm is not None:  # the rows' squares are summed inside one program: the whole of K
        assert groups == 1 and norm[0].shape == (k,) and norm[0].stride(0) == 1, "norm: one group, g [K]"
        split, per = 1, chunks
    tiles = -(-nt // bn)
    if split > 1:
        part = torch.empty(split * t * tiles * bn, dtype=torch.float32, device=x.device)
        lock = arrival.counters(x.device, tiles, ("fp8_gemv", nt, k, bn, split))
    else:
        part = lock = out  # unused
    interp = not x.is_cuda  # every split runs `per` steps: the last one's extra steps masked unless K is even
    _fp8_gemv[(tiles, split)](
        x, w if native else w.view(torch.uint8), ws, out, part, lock, x if norm is None else norm[0], t, nt, k,
        nt // groups, x.stride(0), x.stride(1), ws.stride(0), out.stride(0), per * bk,
        0.0 if norm is None else float(norm[1]), BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=BLOCK_T, SPLIT_K=split > 1,
        EVEN_K=k % bk == 0 and not (interp and chunks % per), NATIVE=native, SCALE_E8M0=e8m0, DOT_F32=interp,
        ITERS=per if interp else 0, BITS=not interp and (WIDEN_BITS if bits is None else bits), NORM=norm is not None,
        A8=a8, ACT=act is not None, up_off=k, limit=0.0 if act is None else float(act), num_warps=nw,
        num_stages=ns, **(pdl.launch(x.device) if pdl_on else dict(PDL=False, launch_pdl=False)))


def linear_norm(x: torch.Tensor, g: torch.Tensor, eps: float, w: torch.Tensor, ws: torch.Tensor, e8m0: bool,
                native: bool) -> torch.Tensor:
    """RMSNorm_g(x [T, K]) @ W^T -> [T, N] bf16 in one launch (W = w [N, K] e4m3 with block scales ws; T <= MAX_T):
    the decode step's q_norm inside wq_b's GEMV. The CUDA-core kernel where it takes the shape
    (fp8_gemv_cc.norm_takes: its tiles, the norm in its prologue), else this kernel at the table's config
    (generic_config where it has none)."""
    from ds4f.kernels import fp8_gemv_cc as cc

    nt, k = w.shape
    if cc.norm_takes(x, nt, k):
        cfg, depth = cc.config(nt, k, 1, sm_count(x.device))
        out = torch.empty(x.shape[0], 1, nt, dtype=torch.bfloat16, device=x.device)
        cc.launch_cc(x.view(x.shape[0], 1, -1), w, ws, e8m0, out, 1, cfg, depth=depth, norm=(g, eps))
        return out.view(x.shape[0], nt)
    return _one_group(x.view(x.shape[0], 1, -1), w, ws, e8m0, native, norm=(g, eps))


def _one_group(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, native: bool,
               **kw: object) -> torch.Tensor:
    """launch(x [T, 1, K], ..., **kw) for one group at the table's config (generic_config where it has none) ->
    [T, N] bf16."""
    nt, k = w.shape
    c = pick(nt, k, 1, x.device) or generic_config(nt, k, 1, sm_count(x.device))
    out = torch.empty(x.shape[0], 1, nt, dtype=torch.bfloat16, device=x.device)
    launch(x, w, ws, e8m0, out, 1, native, c, **kw)  # type: ignore[arg-type]
    return out.view(x.shape[0], nt)


def linear_act(h: torch.Tensor, limit: float, w: torch.Tensor, ws: torch.Tensor, e8m0: bool,
               native: bool) -> torch.Tensor:
    """swiglu_clamp(h [T, 2K] = [gate | up], limit) rounded to bf16, @ W^T -> [T, N] bf16 in one launch (W = w [N, K]
    e4m3 with block scales ws; T <= MAX_T): the shared expert's SwiGLU inside its w2 GEMV. The table's config; a
    plain launch (no PDL): it runs on the shared expert's side stream right behind its w13 GEMV, and launched early
    its programs would wait there holding SM slots the routed up kernel beside it needs (session 17: up ~5 us
    slower per layer in the full TP=2 run)."""
    k = w.shape[1]
    assert h.shape[1] == 2 * k and h.stride(1) == 1, "h: [T, 2K] rows [gate | up]"
    return _one_group(h[:, None, :k], w, ws, e8m0, native, act=limit, pdl_on=False)


def w8_gemv(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, e8m0: bool, out: torch.Tensor, groups: int,
            native: bool, split: int | None = None, force: bool = False, a8: bool | None = None) -> bool:
    """fp8_gemm's w8 entry for T <= MAX_T: out [T, G, N] = x [T, G, K] @ W^T with pick's config (split overrides
    its SPLIT; a8 as launch's). -> False (nothing launched) when the table or env gives this shape to the w8 tiles,
    unless force (then generic_config runs it)."""
    nt, k = w.shape
    from ds4f.kernels import fp8_gemv_cc as cc  # the CUDA-core form (its table's shapes at T = 1: DS4F_FP8_GEMV_CC)
    from ds4f.kernels import fp8_gemv_h2 as h2  # its f16x2 form (its table's shapes, DS4F_FP8_GEMV_H2's buckets)
    from ds4f.kernels import fp8_gemv_mma as mma  # the register-fed MMA form (opt-in: DS4F_FP8_GEMV_MMA=1)

    if split is None and a8 is None and mma.takes(x, nt, k, groups) and w.data_ptr() % 16 == 0:
        mma.launch_mma(x, w, ws, e8m0, out, groups)
        return True
    c2 = h2.choose(x, nt, k, groups) if split is None and a8 is None else None
    if c2 is not None:
        h2.launch_h2(x, w, ws, e8m0, out, groups, c2[0], depth=c2[1])
        return True
    if split is None and a8 is None and cc.takes(x, nt, k, groups):
        cfg, depth = cc.config(nt, k, groups, sm_count(x.device))
        cc.launch_cc(x, w, ws, e8m0, out, groups, cfg, depth=depth)
        return True
    c = pick(nt, k, groups, x.device)
    if c is None:
        if not force:
            return False
        c = generic_config(nt, k, groups, sm_count(x.device))
    if split is not None:
        c = (c[0], c[1], split, c[3], c[4])
    bn = c[0]
    while groups > 1 and bn > 16 and (nt // groups) % bn:  # a table BLOCK_N that does not divide the group
        bn //= 2
    launch(x, w, ws, e8m0, out, groups, native, (bn, *c[1:]), a8=a8)
    return True
