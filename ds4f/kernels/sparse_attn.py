"""⑥ kernels, sparse MQA attention: q [T, H, D] + a flat KV slot pool + per-token slot lists in, o [T, H, D] out
(optionally with the inverse RoPE of its last rope channels applied in the kernel that writes o). The wrapper, its
launch choices (tiles, key splits, DecodePolicy) and the torch fallback; the Triton kernels are in
ds4f/kernels/sparse_attn_kernels.py (re-exported here where triton is: _attn_fwd, _attn_combine, _kv_row_tile)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ds4f.kernels import arrival, pdl
from ds4f.kernels.fp8 import dequantize_kv_rows
from ds4f.kernels.knobs import env_knobs
from ds4f.kernels.ref import sparse_attn_ref

try:
    import triton
    from triton.runtime.errors import OutOfResources

    from ds4f.kernels.sparse_attn_kernels import _attn_combine, _attn_fwd
    from ds4f.kernels.sparse_attn_kernels import _kv_row_tile as _kv_row_tile  # prefix_attn's kernels use it
except ImportError:  # CPU-only installs: sparse_attn falls back to the reference
    triton = None

HAS_TRITON = triton is not None
LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_SM_COUNT: dict[int, int] = {}
# key splits per (token, head block) when num_splits is not given; DS4F_ATTN_MAX_SPLITS=0 lifts the cap (A/B). H200,
# one token, 32 heads, 8320 HCA keys at 1M (bench/results/decode_long.jsonl): 51.6 us at 64 vs 62.9 at 32 (session
# 5's tiles); with the 64-key 8-warp tiles below, 128 asked (65 splits of 128 keys) 24.0 us vs 37.9 for 44 of 192
# (4 warps; session 15)
MAX_SPLITS = int(os.environ.get("DS4F_ATTN_MAX_SPLITS", "128")) or 1 << 30
# ... and at most SPLIT_PROGRAMS // head blocks: 32 heads (TP=2, 2 blocks of 16) -> 128 (the 130 programs of the
# measured point above); 64 heads (one GPU, 4 blocks) -> 64 (not timed since the 64-key tiles)
SPLIT_PROGRAMS = 256
# splits _attn_combine merges per iteration; 0 (default): all of them at once (up to COMBINE_MAX_UNROLL) in tiles of
# fewer heads, so no chain of dependent partial loads: at 1M context an HCA layer's 64 splits in 16 rounds of 4 took
# ~30 us per layer; a power of two: that many per round over 16-head tiles (the former shape, A/B)
COMBINE_UNROLL = int(os.environ.get("DS4F_ATTN_COMBINE_UNROLL", "0"))
if COMBINE_UNROLL < 0 or COMBINE_UNROLL & (COMBINE_UNROLL - 1):
    raise ValueError(f"DS4F_ATTN_COMBINE_UNROLL={COMBINE_UNROLL}: must be 0 (auto) or a power of two (1 = one split "
                     "at a time)")
COMBINE_MAX_UNROLL = 128
# DS4F_ATTN_ROPE_SPLIT=1: fp8_ds_mla rows' rope columns as a [keys, D - nope] tile of their own (a second pair of
# products) instead of a [keys, BLOCK_D] tile masked to them: a pipelined stage of 64 keys then fits the H200's shared
# memory (sparse_attn_kernels._key_block_rs); opt-in until timed; read at each launch (benches swap it)
ROPE_SPLIT = os.environ.get("DS4F_ATTN_ROPE_SPLIT", "0") == "1"
COMBINE_TILE = 8192  # fp32 partials one combine program holds: UNROLL x BLOCK_H x BLOCK_DC (64 registers at 4 warps)


def combine_shape(num_splits: int, block_d: int) -> tuple[int, int, int]:
    """(UNROLL, BLOCK_H, BLOCK_DC) of _attn_combine for num_splits partials of block_d columns."""
    dc = min(block_d, 64)
    if COMBINE_UNROLL:
        return COMBINE_UNROLL, 16, dc
    unroll = min(triton.next_power_of_2(num_splits), COMBINE_MAX_UNROLL)
    return unroll, max(1, min(16, COMBINE_TILE // (unroll * dc))), dc
# "block_h,block_k,num_warps,num_stages" for calls of < PREFILL_MIN_T tokens with >= LONG_K keys per token (the HCA
# layers' lists at a long max_ctx; bench/sweep_decode_long.py) ...
LONG_K = 2048
# H200, session 15 (bench/sweep_decode_long.py --parts attn, 8320 keys, L2 flushed): 16,64,8,1 (65 splits) 24.0 us vs
# 33.9 for the former 16,32,4,2 (52 splits of 160); with 384 live keys (a context just past the 32768-token graph
# class: 256 compressed + 128 window rows) 15.9 vs 14.2. (The sweep asked for 2 and 3 stages too: a 64-key tile
# pipelined needs ~246 KB of shared memory, over the H200's 227, so the launch shrank every one of them to 1 stage:
# the same times.) Not faster: the key loop pipelined by hand in registers (29-634 us, spills) and rows dequantized
# in bf16 without the fp32 tile (25.3 us). GB10 (99 KB) runs the tile _launch shrinks it to, 16,32,8,1 (not timed)
DECODE_KNOBS = env_knobs("DS4F_ATTN_DECODE", 4, "16,64,8,1")
LONG_FP8_KNOBS = DECODE_KNOBS or (16, 64, 8, 1)  # fp8 rows (the sweep's); bf16 rows keep the built-in tiles
# ... and with fewer (window, CSA top-k and short-context HCA lists; bench/sweep_attn_decode.py, H200, 32 heads, one
# token, 2026-11-29: 8 warps 11.6-12.8 us vs 17.0-17.6 for the former tiles at 128-192 keys; lists of >= MID_K keys
# (CSA: window + top-512) 64-key blocks: 16.5-16.8 vs 17.7-18.3 us at 640)
# (defaults since session 11: before, an unset variable gave (), so the swept tiles ran only where set; the env
# overrides, e.g. DS4F_ATTN_SHORT=16,32,4,2 is the former choice)
SHORT_KNOBS = env_knobs("DS4F_ATTN_SHORT", 4, "16,32,8,2") or (16, 32, 8, 2)
MID_K = 512
# (one stage: the launch always shrank the swept 16,64,8,2 to it, see LONG_FP8_KNOBS; the same kernel, without the
# failed first build)
MID_KNOBS = env_knobs("DS4F_ATTN_MID", 4, "16,64,8,1") or (16, 64, 8, 1)


@dataclass(frozen=True)
class DecodePolicy:
    """Static launch choices of decode calls (< PREFILL_MIN_T tokens); from shapes / capacity only, never from
    device values (the live counts are read by the kernels). bench/sweep_attn_decode.py times each. Env: one field
    each through DS4F_ATTN_DYN, _FUSE_MAX, _SKIP, _SPLIT_BLOCKS, _NOSPLIT_K; DS4F_ATTN_POLICY=old: OLD_POLICY."""

    dyn: bool = True  # with live: the splits share the live keys (not the capacity K): a short live count at a
    # large K still spreads over the programs, and the combine reads only the splits that saw a key
    fuse_max: int = 0  # split counts <= this (<= 16) merge in the last-arriving program (no _attn_combine launch);
    # 0: the sweep timed the separate combine faster (SWA 11.6 vs 12.7-13.3 us, HCA at 8K capacity 12.7 vs 14.4)
    skip: bool = True  # lists without live: a key block of -1 only skips its loads and math
    split_blocks: int = 1  # fewest key blocks per split
    nosplit_k: int = 0  # K <= this: one program per (token, head block), no partials


# the policy before bench/sweep_attn_decode.py (DS4F_ATTN_POLICY=old: A/B); prefill chunks always use it
OLD_POLICY = DecodePolicy(dyn=False, fuse_max=0, skip=False, split_blocks=2, nosplit_k=0)


def _policy() -> DecodePolicy:
    if os.environ.get("DS4F_ATTN_POLICY", "") == "old":
        return OLD_POLICY
    base = DecodePolicy()
    vals = {f: env_knobs(f"DS4F_ATTN_{f.upper()}", 1, str(int(getattr(base, f))), int(f == "split_blocks"))
            for f in ("dyn", "fuse_max", "skip", "split_blocks", "nosplit_k")}
    return replace(base, **{f: type(getattr(base, f))(v[0]) for f, v in vals.items() if v})


POLICY = _policy()  # benches and tests swap it (sparse_attn reads it per call)
_FITTED: dict[tuple, tuple[int, int, int, int]] = {}  # launch key -> the tiles that fit the device (see _launch)

# "block_k,num_warps,num_stages" for calls of >= PREFILL_MIN_T tokens (prefill chunks; bench/sweep_attn_prefill.py)
PREFILL_MIN_T = 1024
PREFILL_KNOBS = env_knobs("DS4F_ATTN_PREFILL", 3, "32,4,1")


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRET)


def sparse_attn(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
    *,
    kv_rope: torch.Tensor | None = None,
    native_fp8: bool | None = None,
    block_h: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    scale_bcast: bool = True,
    live: torch.Tensor | None = None,
    inv_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    q_norm: float | None = None,
) -> torch.Tensor:
    """o [T, H, D] bf16 = one softmax per (t, h) over kv_pool[indices[t]] with the sink in the denominator only.

    q [T, H, D] bf16 (last dim contiguous); kv_pool [N, D] bf16, or e4m3 with kv_scale [N, NG] fp32 (power-of-two
    scales for groups of D // NG columns), or the fp8_ds_mla split rows (ds4f/kernels/fp8.py quantize_kv_rows):
    kv_pool [N, nope] e4m3 (or its uint8 bits) + kv_scale [N, >= ceil(nope / 64)] uint8 UE8M0 exponents + kv_rope
    [N, D - nope] bf16; indices [T, K] int32 flat slot ids in [-1, N) (-1 = unused; ids are not bounds-checked on
    the device); sink [H] fp32. num_splits=None picks a key split that fills the GPU when T is small (decode); the
    split partials are merged by a second kernel. native_fp8 (split rows): hardware e4m3 converts, default on
    sm_89+; else a bit-level decode that builds on sm_80. block_h..scale_bcast are tuning knobs (bench/).
    live [T] int32 (optional): indices[t, live[t]:] are all -1 (a short context in a table sized for a long one);
    the kernel then reads and merges only the key splits below it (the same result up to rounding: decode calls
    size the splits by live on the device, DecodePolicy.dyn, so a short live count spreads over them).
    inv_rope = (cos, sin) [T, rd/2] fp32 (optional): returns rope_(o, cos, sin, inverse=True) instead of o, rotated
    by the kernel that writes o (same roundings: o to bf16, then rotated in fp32 and rounded again). q_norm = eps
    (with inv_rope): q is the raw projection and the kernel loads it as rope.norm_rope(q, None, cos, sin, eps) (per-head
    RMSNorm rounded to bf16, then RoPE of its last rope channels); elsewhere that call runs first. Decode launch
    choices: DecodePolicy (POLICY, env DS4F_ATTN_*). No host sync: CUDA-graph safe."""
    if q_norm is not None:
        assert inv_rope is not None, "q_norm: the kernel rotates q by inv_rope's (cos, sin) tables"
        if not use_triton(q) or q.shape[2] & (q.shape[2] - 1):  # the normed q first (a tile needs D = 2^n)
            from ds4f.kernels.rope import norm_rope

            q, q_norm = norm_rope(q, None, inv_rope[0], inv_rope[1], q_norm), None
    if inv_rope is not None:
        cos, sin = inv_rope
        assert cos.shape == sin.shape == (q.shape[0], cos.shape[1]) and 0 < 2 * cos.shape[1] <= q.shape[2]
        assert cos.dtype == sin.dtype == torch.float32 and cos.stride(1) == sin.stride(1) == 1
        assert cos.stride(0) == sin.stride(0) and q.shape[2] % 2 == 0 and cos.device == q.device, "cos / sin rows"
        if not use_triton(q):  # the references: attention, then the rotation
            from ds4f.kernels.rope import rope_ref

            return rope_ref(sparse_attn(q, kv_pool, indices, sink, scale, kv_scale, kv_rope=kv_rope, live=live),
                            cos, sin, True)
    if live is not None:
        assert live.shape == (indices.shape[0],) and live.dtype == torch.int32 and live.is_contiguous()
    assert q.dim() == 3 and q.dtype == torch.bfloat16 and q.stride(-1) == 1, "q must be [T, H, D] bf16, dim -1 dense"
    T, H, D = q.shape
    assert indices.dim() == 2 and indices.shape[0] == T and indices.dtype == torch.int32 and indices.stride(-1) == 1
    assert sink.shape == (H,) and sink.dtype == torch.float32 and sink.is_contiguous()
    if kv_rope is not None:
        return _sparse_attn_split(q, kv_pool, kv_scale, kv_rope, indices, sink, scale, native_fp8, block_h, block_k,
                                  num_splits, num_warps, num_stages, scale_bcast, live, inv_rope, q_norm)
    assert kv_pool.dim() == 2 and kv_pool.shape[1] == D and kv_pool.stride(-1) == 1, "kv_pool must be [N, D]"
    ng = 0
    if kv_pool.dtype == torch.float8_e4m3fn:
        assert kv_scale is not None and kv_scale.dtype == torch.float32 and kv_scale.is_contiguous()
        assert kv_scale.shape[0] == kv_pool.shape[0] and D % kv_scale.shape[1] == 0
        ng = kv_scale.shape[1]
        assert D & (D - 1) == 0 and ng & (ng - 1) == 0, "fp8 pools need power-of-two D and group count"
    else:
        assert kv_pool.dtype == torch.bfloat16 and kv_scale is None, "kv_pool must be bf16 (or fp8 + kv_scale)"
    assert q.device == kv_pool.device == indices.device == sink.device
    if not use_triton(q):
        return sparse_attn_ref(q, kv_pool, indices, sink, scale, kv_scale)
    kvs = kv_scale if kv_scale is not None else kv_pool
    return _launch(q, kv_pool, kvs, kv_pool, indices, sink, scale, ng, 0, False, (kv_pool.stride(0), 0, 0),
                   block_h, block_k, num_splits, num_warps, num_stages, scale_bcast, live, inv_rope, q_norm)


def _sparse_attn_split(q: torch.Tensor, nope: torch.Tensor, exp: torch.Tensor | None, rope: torch.Tensor,
                       indices: torch.Tensor, sink: torch.Tensor, scale: float, native_fp8: bool | None,
                       block_h: int | None, block_k: int | None, num_splits: int | None, num_warps: int | None,
                       num_stages: int | None, scale_bcast: bool, live: torch.Tensor | None = None,
                       inv_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                       q_norm: float | None = None) -> torch.Tensor:
    T, H, D = q.shape
    N, dn = nope.shape
    assert nope.dtype in (torch.float8_e4m3fn, torch.uint8) and nope.stride(-1) == 1, "nope must be [N, dn] e4m3"
    assert rope.dtype == torch.bfloat16 and rope.shape == (N, D - dn) and rope.stride(-1) == 1 and dn < D
    assert exp is not None and exp.dtype == torch.uint8 and exp.shape[0] == N and exp.stride(-1) == 1
    assert exp.shape[1] * 64 >= dn, "one UE8M0 exponent per 64 nope columns"
    assert q.device == nope.device == exp.device == rope.device == indices.device == sink.device
    if not use_triton(q):  # dequantize only the rows the indices name (exact in bf16), then the reference
        valid = indices >= 0
        flat = indices.long().clamp(min=0).reshape(-1)
        rows = dequantize_kv_rows(nope[flat], exp[flat], rope[flat], torch.bfloat16)
        local = torch.arange(flat.numel(), device=q.device).view(T, -1)
        return sparse_attn_ref(q, rows, torch.where(valid, local, -1).to(torch.int32), sink, scale)
    if native_fp8 is None:
        native_fp8 = q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9)
    return _launch(q, nope.view(torch.uint8), exp, rope, indices, sink, scale, 0, dn, native_fp8,
                   (nope.stride(0), exp.stride(0), rope.stride(0)), block_h, block_k, num_splits, num_warps,
                   num_stages, scale_bcast, live, inv_rope, q_norm)


def _launch(q: torch.Tensor, kv: torch.Tensor, kvs: torch.Tensor, rope: torch.Tensor, indices: torch.Tensor,
            sink: torch.Tensor, scale: float, ng: int, nope: int, native_fp8: bool, strides: tuple[int, int, int],
            block_h: int | None, block_k: int | None, num_splits: int | None, num_warps: int | None,
            num_stages: int | None, scale_bcast: bool, live: torch.Tensor | None = None,
            inv_rope: tuple[torch.Tensor, torch.Tensor] | None = None, q_norm: float | None = None) -> torch.Tensor:
    T, H, D = q.shape
    K = indices.shape[1]
    if T == 0:
        return torch.empty(T, H, D, dtype=torch.bfloat16, device=q.device)
    decode = T < PREFILL_MIN_T
    # the decode policy and the short / mid tiles were swept on fp8 rows (the TP=2 model's pools); bf16 rows keep
    # the former choices: at 64 heads an 8-layer step's window layers took 11.1 us with them vs 8.8 us before
    fp8_rows = ng > 1 or bool(nope)
    pol = POLICY if decode and fp8_rows else OLD_POLICY
    if PREFILL_KNOBS and not decode and block_k is None and num_warps is None:
        block_k, num_warps, num_stages = PREFILL_KNOBS
    if K >= LONG_K:
        knobs = LONG_FP8_KNOBS if fp8_rows else DECODE_KNOBS
    else:
        knobs = None if not fp8_rows else MID_KNOBS if K >= MID_K else SHORT_KNOBS
    if knobs and decode and block_h is None and block_k is None:
        block_h, block_k, num_warps, num_stages = knobs
    block_d = triton.next_power_of_2(D)
    if nope:  # split rows: the tile holds whole 64-column exponent groups
        block_d = max(64, block_d)
    if block_h is None:  # H200 sweeps: 16-head blocks win only at a handful of tokens (T=1: 16.6 vs 20.2 us)
        block_h = 16 if T * triton.cdiv(H, 64) < 16 else 64
    block_h = max(16, min(block_h, triton.next_power_of_2(H)))
    # fp8 group scales stage the tile in fp32: 32-key blocks with 16 heads, 64 with 64 heads measured best
    block_k = max(16, block_k or (32 if (ng > 1 or nope) and block_h < 64 else 64))
    num_warps = num_warps or (8 if block_h >= 64 else 4)
    if num_stages is None:
        # a prefill chunk with 32-head blocks (one TP=2 rank): unpipelined measured 6.5 vs 11.3 ms at 8192 tokens x
        # 640 fp8 rows (bench/results/attn_prefill.jsonl); 64-head blocks and decode keep 2
        num_stages = 1 if T >= PREFILL_MIN_T and block_h < 64 else 2
    # a device whose shared memory cannot hold the tile (GB10 / sm_12x: 99 KB per block; the knobs were swept on
    # H200's 227 KB) gets the largest smaller one that loads: found once per shape by the launch failing before it
    # runs (Triton's OutOfResources), kept in _FITTED
    key = (q.device, T if T < PREFILL_MIN_T else -1, H, D, K, ng, nope, native_fp8, block_h, block_k, num_warps,
           num_stages, num_splits, live is not None, inv_rope is not None, q_norm is not None, ROPE_SPLIT)
    cfg = _FITTED.get(key, (block_h, block_k, num_warps, num_stages))
    while True:
        try:
            return _launch_tiles(q, kv, kvs, rope, indices, sink, scale, ng, nope, native_fp8, strides, *cfg,
                                 num_splits, pol, decode, block_d, scale_bcast, live, inv_rope, q_norm)
        except OutOfResources:
            smaller = shrink(cfg)
            if smaller is None:
                raise
            cfg = _FITTED[key] = smaller


def shrink(cfg: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The next smaller (block_h, block_k, num_warps, num_stages) to try where a tile does not fit shared memory:
    one pipeline stage first, then halved key blocks, then halved head blocks (down to 16); None: none left."""
    bh, bk, nw, ns = cfg
    if ns > 1:
        return bh, bk, nw, ns - 1
    if bk > 16:
        return bh, bk // 2, nw, ns
    if bh > 16:
        return bh // 2, bk, nw, ns
    return None


def _launch_tiles(q: torch.Tensor, kv: torch.Tensor, kvs: torch.Tensor, rope: torch.Tensor, indices: torch.Tensor,
                  sink: torch.Tensor, scale: float, ng: int, nope: int, native_fp8: bool,
                  strides: tuple[int, int, int], block_h: int, block_k: int, num_warps: int, num_stages: int,
                  num_splits: int | None, pol: DecodePolicy, decode: bool, block_d: int, scale_bcast: bool,
                  live: torch.Tensor | None, inv_rope: tuple[torch.Tensor, torch.Tensor] | None,
                  q_norm: float | None = None) -> torch.Tensor:
    T, H, D = q.shape
    K = indices.shape[1]
    assert q_norm is None or (inv_rope is not None and block_d == D), "q_norm: inv_rope's tables and D = 2^n"
    o = torch.empty(T, H, D, dtype=torch.bfloat16, device=q.device)
    n_hb = triton.cdiv(H, block_h)
    if num_splits is None and pol.nosplit_k >= K:
        num_splits = 1
    if num_splits is None:
        # fill ~2 programs per SM; each split keeps >= split_blocks key blocks and at most MAX_SPLITS: the combine
        # walks the splits in order (at 1M context an HCA layer's 8320 keys made 130 splits of 64 keys for one
        # decode token, a chain of 130 dependent partial loads)
        want = triton.cdiv(2 * sm_count(q.device), T * n_hb)
        cap = MAX_SPLITS if MAX_SPLITS >= 1 << 30 else min(MAX_SPLITS, max(1, SPLIT_PROGRAMS // n_hb))
        num_splits = max(1, min(want, K // (pol.split_blocks * block_k), cap))
    kps = triton.cdiv(triton.cdiv(max(K, 1), num_splits), block_k) * block_k
    num_splits = max(1, triton.cdiv(K, kps))
    split = num_splits > 1
    dyn = split and live is not None and pol.dyn
    # the finisher's loop over the splits is unrolled: at most 16 (32 built 279 KB of code, spilling)
    fuse = triton.next_power_of_2(num_splits) if split and num_splits <= min(pol.fuse_max, 16) else 0
    if split:
        po = torch.empty(T, num_splits, H, block_d, dtype=torch.float32, device=q.device)
        pm = torch.empty(T, num_splits, H, 2, dtype=torch.float32, device=q.device)
    else:
        po = pm = o  # unused
    # per (token, head block) arrival counts, re-armed by the kernel; sized once for any decode call (no regrowth
    # inside a graph capture)
    cnt = arrival.counters(q.device, max(T * n_hb, PREFILL_MIN_T * 8), "sparse_attn") if fuse else sink
    lv = live if live is not None else indices
    cos, sin = inv_rope if inv_rope is not None else (sink, sink)  # HALF = 0: never read
    half, s_cs = (cos.shape[1], cos.stride(0)) if inv_rope is not None else (0, 0)
    _attn_fwd[(T, n_hb, num_splits)](
        q, kv, kvs, rope, indices, sink, o, po, pm, lv, cos, sin, cnt,
        H, K, kps, scale * LOG2E,
        q.stride(0), q.stride(1), *strides, indices.stride(0), o.stride(0), o.stride(1), s_cs,
        q_norm if q_norm is not None else 0.0,
        D=D, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_K=block_k, NG=ng, SPLIT=split, SCALE_BCAST=scale_bcast,
        NOPE=nope, NATIVE_FP8=native_fp8, LIVE=live is not None, HALF=half, DYN=dyn, FUSE=fuse,
        SKIP=pol.skip and decode and live is None, QNR=q_norm is not None, RSPLIT=rope_split(D, nope, block_d),
        num_warps=num_warps, num_stages=num_stages,
        **pdl.launch(q.device),
    )
    if split and not fuse:
        unroll, bh, dc = combine_shape(num_splits, block_d)
        _attn_combine[(T, triton.cdiv(H, bh), block_d // dc)](
            po, pm, sink, o, lv, cos, sin, H, num_splits, K, kps, o.stride(0), o.stride(1), s_cs,
            D=D, PD=block_d, BLOCK_DC=dc, BLOCK_H=bh, LIVE=live is not None, UNROLL=unroll, HALF=half,
            DYN=dyn, BLOCK_K=block_k, num_warps=4, **pdl.launch(q.device),
        )
    return o


def rope_split(D: int, nope: int, block_d: int) -> bool:
    """DS4F_ATTN_ROPE_SPLIT applies: split rows whose rope width D - nope is a power of two dividing nope and the
    tile's columns."""
    rd = D - nope
    return ROPE_SPLIT and nope > 0 and rd >= 16 and rd & (rd - 1) == 0 and nope % rd == 0 and block_d % rd == 0


def attn_bytes(T: int, H: int, D: int, K: int, row_bytes: float) -> float:
    """Fewest HBM bytes one call moves: q in, o out, K rows per token (rows shared by tokens counted per token)."""
    return T * (2 * H * D * 2 + K * (row_bytes + 4))


def attn_flops(T: int, H: int, D: int, K: int) -> float:
    return 4.0 * T * H * D * K


__all__ = ["HAS_TRITON", "attn_bytes", "attn_flops", "sm_count", "sparse_attn", "use_triton"]
