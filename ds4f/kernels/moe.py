"""⑥ kernels, routed MoE: x [T, D] + expert weights + top-k routing in, Σ_j w_j·expert_j(x) [T, D] out.

fused_moe = moe_align (picks sorted by expert into BLOCK_M-row blocks; one Triton program up to 1024 picks, else
three passes over chunks; none for a single token) + the up GEMM with the SwiGLU clamp fused (activation stored
bf16) + the down GEMM writing one weighted bf16 row per (token, pick), no atomics + a sum over each token's k rows.
Decode (FUSE_SUM, one block per pick): each down program covers all k picks of one token for its output columns and
writes the final row itself (no sum launch); SPLIT_K > 1 splits down's K over programs (fp32 partials, summed after).
Kernels in moe_kernels.py; the tile table (_config) was swept on an H200 with bench/bench_moe.py --sweep, the decode
rows (DECODE_TABLE, env DS4F_MOE_DECODE_T1/_T4/_T16) with bench/sweep_moe_decode.py."""

from __future__ import annotations

import os

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.knobs import env_knobs
from ds4f.kernels.ref import fused_moe_ref
from ds4f.kernels.sparse_attn import _INTERPRET, use_triton

try:
    import triton

    from ds4f.kernels.moe_kernels import (
        _align_count,
        _align_offsets,
        _align_scatter,
        _align_small,
        _moe_down,
        _moe_sum,
        _moe_up,
    )
except ImportError:  # CPU-only installs: fused_moe falls back to the reference
    triton = None

ALIGN_SMALL_MAX = 1024  # up to this many picks, moe_align is one Triton program (sort in registers)
ALIGN_CHUNK = 1024  # above: three passes over chunks of this many picks (count, offsets, scatter)


def _align_bound(M: int, num_experts: int, block_m: int) -> int:
    return (M + block_m - 1) // block_m + min(num_experts, M)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the T*k picks by expert, each expert's run padded to a multiple of block_m, without a host sync.

    Returns sorted_ids [P] int32 (flat pick id t*k+j, or T*k for padding) and block_expert [P // block_m] int32
    (-1 = unused block); P = block_m * (ceil(T*k / block_m) + min(E, T*k)) bounds the padded length. Within an
    expert, picks keep their flat order."""
    flat = topk_ids.reshape(-1)
    M = flat.numel()
    dev = flat.device
    nb = _align_bound(M, num_experts, block_m)
    if M == 0:
        return torch.empty(0, dtype=torch.int32, device=dev), torch.empty(0, dtype=torch.int32, device=dev)
    if use_triton(flat) and num_experts < 4096:
        return _align_triton(flat.to(torch.int32).contiguous(), num_experts, block_m, nb)[:2]
    return _align_torch(flat, num_experts, block_m, nb)


def _align_torch(flat: torch.Tensor, num_experts: int, block_m: int, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, dev = flat.numel(), flat.device
    flat = flat.long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    rank = torch.arange(M, device=dev) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    dest = (pend - padded)[e_sorted] + rank
    sorted_ids = torch.full((nb * block_m,), M, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(nb, device=dev) * block_m
    be = torch.searchsorted(pend, starts, right=True)  # first expert whose padded run ends after the block start
    block_expert = torch.where(be < num_experts, be, -1).to(torch.int32)
    return sorted_ids, block_expert


def _align_triton(flat: torch.Tensor, E: int, bm: int, nb: int, tail_m: int = 0,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """moe_align on the GPU; tail_m > 0 (three-pass path only): also a second tier of tail_m-row blocks that takes
    each expert's last <= tail_m picks past its full bm blocks, as (sorted_ids, block_expert) of min(E, M) blocks."""
    M, dev, ep = flat.numel(), flat.device, triton.next_power_of_2(E + 1)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    if M <= ALIGN_SMALL_MAX and not tail_m:
        sorted_ids = torch.empty(nb * bm, dtype=torch.int32, device=dev)
        mp = triton.next_power_of_2(M)
        _align_small[(1,)](flat, sorted_ids, block_expert, M, nb, E, BLOCK_M=bm, MP=mp, EP=ep,
                           PP=triton.next_power_of_2(nb * bm), NBP=triton.next_power_of_2(nb),
                           num_warps=4 if mp <= 256 else 8)
        return sorted_ids, block_expert, None, None
    sorted_ids = torch.full((nb * bm,), M, dtype=torch.int32, device=dev)
    nb2 = min(E, M) if tail_m else 0
    sid2 = torch.full((nb2 * tail_m,), M, dtype=torch.int32, device=dev) if tail_m else sorted_ids  # unused if 0
    be2 = torch.empty(nb2, dtype=torch.int32, device=dev) if tail_m else block_expert
    n_chunks = triton.cdiv(M, ALIGN_CHUNK)
    hist = torch.empty(n_chunks, ep, dtype=torch.int32, device=dev)
    rank0 = torch.empty_like(hist)
    meta = torch.empty(3, ep, dtype=torch.int32, device=dev)
    _align_count[(n_chunks,)](flat, hist, M, E, CH=ALIGN_CHUNK, EP=ep, num_warps=4)
    _align_offsets[(1,)](hist, rank0, meta, block_expert, be2, n_chunks, nb, nb2, E, BM1=bm, BM2=tail_m, EP=ep,
                         MAXC=triton.next_power_of_2(n_chunks), NBP1=triton.next_power_of_2(nb),
                         NBP2=triton.next_power_of_2(max(nb2, 1)), num_warps=4)
    _align_scatter[(n_chunks,)](flat, rank0, meta, sorted_ids, block_expert, sid2, be2, M, E, BM1=bm, BM2=tail_m,
                                CH=ALIGN_CHUNK, EP=ep, num_warps=8)
    return sorted_ids, block_expert, (sid2 if tail_m else None), (be2 if tail_m else None)


def moe_sum(rows: torch.Tensor, T: int, k: int, shared: torch.Tensor | None = None,
            round_by_hand: bool = False) -> torch.Tensor:
    """[T*k, D] per-pick rows (bf16 or fp32) -> [T, D] bf16, each token's k rows summed in fp32 in pick order
    (+ shared [T, D], a shared expert's output), one launch. round_by_hand: round to bf16 to nearest even in the
    kernel (the interpreter truncates)."""
    D = rows.shape[1]
    if not use_triton(rows):
        y = rows.view(T, k, D).sum(1)
        return y if shared is None else (y.float() + shared.float()).to(torch.bfloat16)
    out = torch.empty(T, D, dtype=torch.bfloat16, device=rows.device)
    sh = shared.contiguous() if shared is not None else out
    bt, bd = (4, 512) if T > 64 else (1, 256)
    _moe_sum[(triton.cdiv(T, bt), triton.cdiv(D, bd))](rows, sh, out, T, K=k, D=D, HAS_SH=shared is not None,
                                                        BLOCK_T=bt, BLOCK_D=bd, F32=round_by_hand, num_warps=4)
    return out


def _gemm(bn: int, bk: int, gm: int, nw: int, ns: int, which: str) -> dict[str, int]:
    return {f"{which}_BLOCK_N": bn, f"{which}_BLOCK_K": bk, f"{which}_GROUP_M": gm, f"{which}_num_warps": nw,
            f"{which}_num_stages": ns}


# FUSE_SUM with SPLIT_K > 1 at <= SERIAL_MAX_T tokens: the last-arriving split sums the partials into the bf16 output
# (moe_sum's order, same bits) instead of a moe_sum launch; DS4F_MOE_SERIAL_SUM=0: the launch
SERIAL_SUM = os.environ.get("DS4F_MOE_SERIAL_SUM", "1") == "1"
SERIAL_MAX_T = 64

# Decode rows: (BLOCK_M, PER_PICK, FUSE_SUM, SPLIT_K, up BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, down
# BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) by token bucket (T = 1, 2..4, 5..16); None = the picks-per-expert
# table below. Filled from bench/sweep_moe_decode.py's PICK line; env DS4F_MOE_DECODE_T<bucket> overrides a row.
DecodeRow = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int]
DECODE_BUCKETS = (1, 4, 16)
# T = 1 (H200, 2026-11-28, 4 layers' weights cycled): up 64x128 tiles + down with the fused sum and K split in 2,
# 89.8 us end to end vs 92.0 for the picks-per-expert table (0.912 vs 0.891 of the copy ceiling)
DECODE_TABLE: dict[int, DecodeRow | None] = {1: (16, 1, 1, 2, 64, 128, 1, 4, 3, 64, 256, 1, 4, 4), 4: None,
                                             16: None}
DECODE_ENV = {b: env_knobs(f"DS4F_MOE_DECODE_T{b}", 14, "16,1,1,1,32,256,1,4,4,32,256,1,4,4", minimum=0)
              for b in DECODE_BUCKETS}


def decode_row_config(row: DecodeRow) -> dict[str, int]:
    """A decode row (see DECODE_TABLE) -> the config dict fused_moe takes."""
    bm, pp, fs, sk, *g = row
    assert bm in (16, 32, 64) and pp in (0, 1) and fs in (0, 1) and sk >= 1 and (pp or not fs), row
    assert all(v >= 1 for v in g), row
    return dict(BLOCK_M=bm, PER_PICK=pp, TAIL_M=0, FUSE_SUM=fs, SPLIT_K=sk, **_gemm(*g[:5], "up"),
                **_gemm(*g[5:], "down"))


def _decode_row(T: int) -> DecodeRow | None:
    for b in DECODE_BUCKETS:
        if b >= T:
            env = DECODE_ENV[b]
            return env if env else DECODE_TABLE[b]  # type: ignore[return-value]
    return None


def _config(M: int, E: int, T: int) -> dict[str, int]:
    """Tiles by picks per expert (swept on an H200 with bench/bench_moe.py --sweep). Keys: BLOCK_M, PER_PICK
    (one block per pick, no sort), TAIL_M (> 0: a second tier of TAIL_M-row blocks for each expert's tail), FUSE_SUM
    (PER_PICK only: down sums each token's picks itself), SPLIT_K (down's K over this many programs), then per
    GEMM (prefix up_, down_, tail_up_, tail_down_) BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages."""
    row = _decode_row(T)
    if row is not None:
        return decode_row_config(row)
    m = M / E
    one = dict(TAIL_M=0, FUSE_SUM=0, SPLIT_K=1)
    if M <= 64:  # a few tokens: bytes-bound, every program in flight at once (one wave over the SMs)
        return dict(BLOCK_M=16, PER_PICK=int(T == 1), **one, **_gemm(64, 128, 1, 4, 3, "up"),
                    **_gemm(32, 256, 1, 4, 3, "down"))
    if m <= 4:  # batched decode: bytes-bound on the picked experts' weights
        return dict(BLOCK_M=16, PER_PICK=0, **one, **_gemm(32, 128, 1, 4, 4, "up"),
                    **_gemm(32, 128, 1, 4, 4, "down"))
    if m <= 48:
        return dict(BLOCK_M=32, PER_PICK=0, **one, **_gemm(64, 128, 8, 4, 4, "up"),
                    **_gemm(128, 128, 8, 4, 4, "down"))
    if m <= 128:
        return dict(BLOCK_M=64, PER_PICK=0, **one, **_gemm(128, 64, 16, 8, 4, "up"),
                    **_gemm(256, 64, 16, 8, 3, "down"))
    # prefill: compute-bound, 128-row tiles. TAIL_M=64 (each expert's tail in a second launch of 64-row tiles) cuts
    # the padded rows ~11% at 8192 tokens but measured no faster (H200): the tail blocks re-read their experts'
    # weights, and at ~190 picks per expert the GEMMs sit near the bytes/FLOP ridge. Kept as a config option.
    return dict(BLOCK_M=128, PER_PICK=0, **one, **_gemm(128, 64, 8, 8, 4, "up"),
                **_gemm(256, 64, 8, 8, 4, "down"))


def resolve_config(M: int, E: int, T: int, config: dict[str, int] | None = None) -> dict[str, int]:
    """The table's tiles, overridden by config; an unprefixed GEMM key (BLOCK_N, GROUP_M, ...) sets up_ and down_."""
    cfg = _config(M, E, T)
    for key, v in (config or {}).items():
        if key in ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"):
            cfg[f"up_{key}"] = cfg[f"down_{key}"] = v
        else:
            assert key in cfg or key.startswith("tail_"), f"unknown fused_moe config key {key}"
            cfg[key] = v
    assert cfg["PER_PICK"] or not cfg["FUSE_SUM"], "FUSE_SUM needs PER_PICK"
    return cfg


def _gemm_kw(cfg: dict[str, int], which: str) -> dict[str, int]:
    return {k[len(which) + 1:]: v for k, v in cfg.items() if k.startswith(which + "_")}


Tier = tuple[torch.Tensor, torch.Tensor, int, dict[str, int]]  # sorted_ids, block_expert, blocks, its tile config


def moe_plan(topk_ids: torch.Tensor, E: int, cfg: dict[str, int]) -> list[Tier]:
    """The blocks for the kernels: one tier, or two (BLOCK_M rows, then TAIL_M rows) for large batches."""
    if cfg["PER_PICK"]:
        be = topk_ids.contiguous().view(-1)
        return [(be, be, be.numel(), cfg)]
    flat, bm, tm = topk_ids.reshape(-1), cfg["BLOCK_M"], cfg["TAIL_M"]
    if 0 < tm < bm and use_triton(flat) and flat.numel() > ALIGN_SMALL_MAX and E < 4096:
        s1, b1, s2, b2 = _align_triton(flat.to(torch.int32).contiguous(), E, bm,
                                       _align_bound(flat.numel(), E, bm), tm)
        tail = dict(cfg, BLOCK_M=tm, **{k[5:]: v for k, v in cfg.items() if k.startswith("tail_")})
        return [(s1, b1, b1.numel(), cfg), (s2, b2, b2.numel(), tail)]
    sorted_ids, be = moe_align(topk_ids, E, bm)
    return [(sorted_ids, be, be.numel(), cfg)]


def moe_up(x: torch.Tensor, w13: torch.Tensor, sorted_ids: torch.Tensor, be: torch.Tensor, nb: int, k: int,
           limit: float, cfg: dict[str, int]) -> torch.Tensor:
    """a [nb*BLOCK_M, I] bf16: the SwiGLU activation of each sorted slot (padding slots unwritten)."""
    I = w13.shape[1] // 2
    bm, kw = cfg["BLOCK_M"], _gemm_kw(cfg, "up")
    bn = kw.pop("BLOCK_N")
    a = torch.empty(nb * bm, I, dtype=torch.bfloat16, device=x.device)
    _moe_up[(nb * triton.cdiv(I, bn),)](
        x, w13, sorted_ids, be, a, x.shape[0] * k, nb, float(limit), x.stride(0), w13.stride(0),
        w13.stride(1), a.stride(0), I=I, DM=x.shape[1], TOPK=k, BLOCK_M=bm, BLOCK_N=bn, PER_PICK=cfg["PER_PICK"],
        F32_DOT=_INTERPRET, **kw, **pdl.launch(x.device),
    )
    return a


def moe_down(a: torch.Tensor, w2: torch.Tensor, sorted_ids: torch.Tensor, be: torch.Tensor, nb: int,
             tw: torch.Tensor, M: int, cfg: dict[str, int], out: torch.Tensor | None = None,
             topk_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[M, D] bf16: row t*k+j = topk_weights[t, j] * expert(x[t]) of that pick (only this plan's picks are
    written into out). SPLIT_K = S > 1: [M*S, D] fp32, row (t*k+j)*S + s = split s's part of that row.
    FUSE_SUM (topk_ids [T, k] needed): [T*S, D], row t*S + s = Σ_j of token t's picks (bf16 when S == 1: the
    final output; S > 1 and SERIAL_SUM: the final [T, D] bf16 too, the splits summed by the last to arrive)."""
    DM, I = w2.shape[1], w2.shape[2]
    kw = _gemm_kw(cfg, "down")
    bn = kw.pop("BLOCK_N")
    sk, fs = cfg.get("SPLIT_K", 1), bool(cfg.get("FUSE_SUM", 0))
    assert I % sk == 0, f"SPLIT_K={sk} must divide I={I}"
    if fs:
        assert topk_ids is not None and cfg["PER_PICK"], "FUSE_SUM: one block per pick, topk_ids given"
        T, k = topk_ids.shape
        ids, rows_out, grid = topk_ids.contiguous(), T * sk, T * sk * triton.cdiv(DM, bn)
    else:
        k = 1
        ids, rows_out, grid = tw, M * sk, nb * sk * triton.cdiv(DM, bn)  # ids unused
    if out is None:
        out = torch.empty(rows_out, DM, dtype=torch.float32 if sk > 1 else torch.bfloat16, device=a.device)
    serial = fs and sk > 1 and SERIAL_SUM and T <= SERIAL_MAX_T
    fin = torch.empty(T, DM, dtype=torch.bfloat16, device=a.device) if serial else out
    cnt = arrival.counters(a.device, SERIAL_MAX_T * triton.cdiv(DM, bn), ("moe_down_sum", DM, bn)) if serial else out
    _moe_down[(grid,)](
        a, w2, sorted_ids, be, tw, ids, out, M, T if fs else nb, a.stride(0), w2.stride(0), w2.stride(1),
        out.stride(0), DM=DM, I=I, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, PER_PICK=cfg["PER_PICK"], F32_DOT=_INTERPRET,
        TOPK=k, KP=triton.next_power_of_2(k), SPLIT_K=sk, FUSE_SUM=fs, fin_ptr=fin, cnt_ptr=cnt, SERIAL=serial, **kw,
        **pdl.launch(a.device),
    )
    return fin if serial else out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    limit: float,
    *,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """out [T, D] bf16 = Σ_j topk_weights[t,j] · (swiglu_clamp(x[t] @ w13[e]ᵀ) @ w2[e]ᵀ), e = topk_ids[t,j].

    x [T, D] bf16; w13 [E, 2I, D] bf16 (gate rows then up rows); w2 [E, D, I] bf16; topk_ids [T, k] int32 in [0, E);
    topk_weights [T, k] fp32. Two grouped GEMMs over the expert-sorted picks (no loop over experts); the SwiGLU
    activation is stored bf16 between them, each pick's weighted output row too. No host sync: CUDA-graph safe.
    config overrides the tile table (see resolve_config)."""
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(-1) == 1, "x must be [T, D] bf16"
    T, DM = x.shape
    assert w13.dim() == 3 and w13.dtype == torch.bfloat16 and w13.is_contiguous() and w13.shape[2] == DM
    E, I2, _ = w13.shape
    assert I2 % 2 == 0
    I = I2 // 2
    assert w2.shape == (E, DM, I) and w2.dtype == torch.bfloat16 and w2.is_contiguous()
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == T and topk_ids.dtype == torch.int32
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32
    if not use_triton(x):
        return fused_moe_ref(x, w13, w2, topk_ids, topk_weights, limit)
    k = topk_ids.shape[1]
    M = T * k
    if M == 0:
        return torch.zeros_like(x)
    cfg = resolve_config(M, E, T, config)
    tw = topk_weights.contiguous().view(-1)
    sk = cfg["SPLIT_K"]
    if cfg["FUSE_SUM"]:
        (sorted_ids, be, nb, c), = moe_plan(topk_ids, E, cfg)
        part = moe_down(moe_up(x, w13, sorted_ids, be, nb, k, limit, c), w2, sorted_ids, be, nb, tw, M, c,
                        topk_ids=topk_ids)
        return moe_sum(part, T, sk) if sk > 1 and part.dtype == torch.float32 else part  # bf16: summed in-kernel
    rows = torch.empty(M * sk, DM, dtype=torch.float32 if sk > 1 else torch.bfloat16, device=x.device)
    for sorted_ids, be, nb, c in moe_plan(topk_ids, E, cfg):
        moe_down(moe_up(x, w13, sorted_ids, be, nb, k, limit, c), w2, sorted_ids, be, nb, tw, M, c, rows)
    return moe_sum(rows, T, k * sk) if k * sk > 1 else rows


def moe_bytes(T: int, k: int, E: int, D: int, I: int) -> float:
    """Fewest HBM bytes: each distinct expert hit is read once (expected count for uniform routing), x in, out out."""
    hit = E * (1.0 - (1.0 - 1.0 / E) ** (T * k))
    return hit * 3 * I * D * 2 + T * D * 2 * 2


def moe_flops(T: int, k: int, D: int, I: int) -> float:
    return 2.0 * T * k * 3 * I * D
