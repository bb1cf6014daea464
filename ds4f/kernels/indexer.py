"""⑥ kernels, lightning indexer: q_I [T, Hi, d] + weights + a flat index-key pool in, scores [T, L] / top-k out."""

from __future__ import annotations

import os

import torch

from ds4f.kernels import pdl, topk_radix
from ds4f.kernels.index_q import quant_heads_fp8 as quant_heads_fp8  # re-exported: callers and tests use it here
from ds4f.kernels.knobs import env_knobs
from ds4f.kernels.ref import indexer_scores_ref, topk_indices_ref
from ds4f.kernels.sparse_attn import sm_count, use_triton
from ds4f.kernels.topk_small import launch_small

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
    from ds4f.kernels.topk_radix import _topk_hist, _topk_select  # noqa: F401 (re-exported: builds, benches)
    from ds4f.kernels.topk_small import _sort_key
except ImportError:  # CPU-only installs: the wrappers fall back to the references
    triton = None

# DS4F_INDEXER_TB (default TB_DEFAULT) applies to calls of at least TB_MIN_T tokens (long prefill chunks). H200,
# 4096 tokens x 229,376 entries (a 1M prompt's last chunk on one TP=2 rank), e4m3 q: one token per program 69.7 ms,
# heads-major 2 tokens x 128 keys 55.2 ms, keys-major 32 tokens x 128 keys x 4 warps x 3 stages 26.2 ms, the best
# of 10 tiles (bench/results/indexer_tb.jsonl)
TB_MIN_T = 1024
TB_DEFAULT = "k,32,128,4,3"
# "bt", "bt,block_l,num_warps[,num_stages]", or "k," before either for the keys-major kernel; "1": one token per program
_TB = os.environ.get("DS4F_INDEXER_TB", TB_DEFAULT).split(",")
TB_KEYS_MAJOR = _TB[0] == "k"
try:
    TB_KNOBS = [int(v) for v in _TB[int(TB_KEYS_MAJOR):]]
    assert len(TB_KNOBS) in (1, 3, 4) and all(v > 0 for v in TB_KNOBS)
except (ValueError, AssertionError):
    raise ValueError(f"DS4F_INDEXER_TB={','.join(_TB)!r}: expected 'bt' or 'bt,block_l,num_warps[,num_stages]' "
                     f"(positive integers), optionally after 'k,'; e.g. {TB_DEFAULT!r}") from None

# calls of < TB_MIN_T tokens (decode): "block_l,n_inner,num_warps,num_stages" (n_inner 0 = auto); radix top-k:
# "block,programs per row" (programs 0 = ~2 per SM). H200, one token at 1M context (bench/sweep_decode_long.py,
# bench/results/decode_long.jsonl): indexer over 262,144 entries 25.2 us at 128 x 4 x 4 warps x 3 stages vs 54.4 at
# the former 64 x auto x 4 x 4 (session 18: still the best of 22 tiles, 24.8 us). Top-512 with the candidate pick
# (session 18): alone 26.0 us in 512-column tiles vs 32.4 in 2048, ~2 programs per SM each; in the full TP=2 decode
# step after a 1M prompt no gain (5.94 vs 5.91 ms per step, two runs), so 2048 stays
DECODE_KNOBS = env_knobs("DS4F_INDEXER_DECODE", 4, "128,4,4,3", minimum=0) or (128, 4, 4, 3)
if DECODE_KNOBS[2] < 4:  # session 18's sweep: 64 x 8 x 2 warps x 4 stages gave scores unlike every other tile's
    raise ValueError(f"DS4F_INDEXER_DECODE={','.join(map(str, DECODE_KNOBS))}: num_warps (the third value) must be "
                     ">= 4 (2-warp tiles gave wrong scores on an H200); e.g. '128,4,4,3'")
# decode calls (< TB_MIN_T tokens) through _indexer_fwd's keys-major form (_index_sum KEYS_MAJOR):
# "block_l,n_inner,num_warps,num_stages" (n_inner 0 = auto, capped as DS4F_INDEXER_DECODE's; block_l 0: the
# heads-major _indexer_fwd with DS4F_INDEXER_DECODE's tile). H200, 262,144 entries, 16 calls back to back over 4 key
# pools (bench/sweep_indexer_dk.py, session 20): one token 13.3 us at 128 x 4 x 4 warps x 3 stages vs 18.8
# heads-major (0.64 vs 0.45 of copy); four tokens 34.7 vs 59.2 (32.5 at n_inner 8)
DECODE_KM = env_knobs("DS4F_INDEXER_DECODE_KM", 4, "128,4,4,3", minimum=0) or (128, 4, 4, 3)
# DS4F_INDEXER_HIST=N: decode calls of at most N tokens (and <= RADIX_MAX_ROWS) over rows past the small top-k's
# lanes: the indexer adds the radix top-k's first-digit histogram of the scores it writes (indexer_scores hist=), so
# the top-k skips its first digit pass (a read of the whole row) and the small kernel's zeroing (the buffer comes
# zeroed, by index_q's launch in FastModel); 0: off. H200, 262,144 entries, scores + top-512 back to back (session
# 20): one token, keys-major, 33.6 vs 34.8 us (heads-major: 40.3 either way, as session 15's 49.2 vs 49.3 with the
# former kernels); four tokens 72.4 vs 68.7 (slower), so the default is one token
INDEXER_HIST = (env_knobs("DS4F_INDEXER_HIST", 1, "1", minimum=0) or (1,))[0]
TOPK_KNOBS = env_knobs("DS4F_TOPK_DECODE", 2, "2048,0", minimum=0) or (2048, 0)
# rows of <= "lanes" valid entries: one program each (ds4f.kernels.topk_small), "lanes,num_warps"; lanes 0: off;
# num_warps 0: small_warps (H200, bench/sweep_topk_small.py, one row, rows written: 2048 entries 8.2 us at 8 warps
# vs 8.6 at 16, 8192 entries 21.4 us at 16 vs 30.4 at 8 and 27.8 at 32; 2026-11-29)
SMALL_KNOBS = env_knobs("DS4F_TOPK_SMALL", 2, "8192,8", minimum=0) or (8192, 0)
# longer rows (ds4f.kernels.topk_radix): "lanes,cap", the candidates the per-row pick holds in registers and the
# buffer's entries per row (powers of two, cap >= lanes); lanes 0: the four digit passes and the compaction (the
# former path)
TOPK_CAND = env_knobs("DS4F_TOPK_CAND", 2, "512,8192", minimum=0) or (512, 8192)
if TOPK_CAND[0] & (TOPK_CAND[0] - 1) or TOPK_CAND[0] >= 1 << 15 or (TOPK_CAND[0] and TOPK_CAND[1] < TOPK_CAND[0]):
    raise ValueError(f"DS4F_TOPK_CAND={','.join(map(str, TOPK_CAND))}: lanes a power of two below 32768 (or 0) and "
                     "cap >= lanes, e.g. '512,8192'; '0,0' for the four digit passes")


def small_warps(lanes: int) -> int:
    return SMALL_KNOBS[1] or (16 if lanes >= 8192 else 8)

if triton is not None:

    @triton.jit
    def _index_sum(q, w, keys, KSCALE: tl.constexpr, QFP8: tl.constexpr, KEYS_MAJOR: tl.constexpr = False):
        # one block's head-weighted ReLU sum [BLOCK_L] before its row scales. Heads-major: q [Hi, d] is the MMA's M,
        # the head sum runs across the accumulator's rows (across warps, through shared memory); KEYS_MAJOR: the key
        # tile is M and q^T the N, so the head sum runs within a thread's columns and a few lanes
        if not QFP8:  # (QFP8: e4m3 q, its per-head scale folded into w, x e4m3 keys: the fp8 MMA, fp32 sums)
            if KSCALE:  # e4m3 -> bf16 is exact; through fp32, which measured faster than the direct convert
                keys = keys.to(tl.float32)
            keys = keys.to(tl.bfloat16)
        if KEYS_MAJOR:
            s = tl.dot(keys, tl.trans(q))  # [BLOCK_L, Hi]
            return tl.sum(tl.maximum(s, 0.0) * w[None, :], 1)
        s = tl.dot(q, tl.trans(keys))  # [Hi, BLOCK_L]
        return tl.sum(tl.maximum(s, 0.0) * w[:, None], 0)

    @triton.jit
    def _index_finish(sc, ksv, offs_l, vlen, KSCALE: tl.constexpr, ZERO_RANK: tl.constexpr):
        if KSCALE:  # a positive per-row scale commutes with ReLU: applied to the reduced score
            sc = sc * ksv
        if ZERO_RANK:  # exact zeros -> -(l + 1) * 1e-30: among tied zeros the lower id ranks higher
            sc = tl.where(sc == 0.0, -(offs_l + 1).to(tl.float32) * 1e-30, sc)
        return tl.where(offs_l < vlen, sc, float("-inf"))

    @triton.jit
    def _indexer_fwd(
        q_ptr, w_ptr, k_ptr, ks_ptr, slots_ptr, seq_ptr, vlen_ptr, out_ptr, hist_ptr,
        HI, L, scale, s_qt, s_qh, s_wt, s_kn, s_ss, s_ot,
        DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_L: tl.constexpr, N_INNER: tl.constexpr,
        KSCALE: tl.constexpr, QFP8: tl.constexpr, ZERO_RANK: tl.constexpr, STRIDED: tl.constexpr = True,
        PDL: tl.constexpr = False, HIST: tl.constexpr = False, KEYS_MAJOR: tl.constexpr = False,
    ):
        # program = (token t, N_INNER blocks of BLOCK_L candidates); STRIDED: the blocks P = grid dim 1 blocks apart,
        # so a short valid length over a long L still spreads its blocks over programs (else adjacent blocks);
        # q[t] [Hi, d] is the M x K operand of every block. int64: at 1M context a prefill chunk's score matrix is
        # [8192, 262144] = 2^31 elements
        pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        t = tl.program_id(0).to(tl.int64)
        l0 = tl.program_id(1) * (BLOCK_L if STRIDED else BLOCK_L * N_INNER)
        step = tl.num_programs(1) * BLOCK_L if STRIDED else BLOCK_L
        vlen = tl.minimum(tl.load(vlen_ptr + t), L)
        seq = tl.load(seq_ptr + t).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_HI)
        offs_d = tl.arange(0, DI)
        hmask = offs_h < HI
        if l0 >= vlen:  # nothing visible in this program's columns (short context, long max_ctx): -inf only
            for j in range(N_INNER):
                offs_l = l0 + j * step + tl.arange(0, BLOCK_L)
                tl.store(out_ptr + t * s_ot + offs_l, tl.full([BLOCK_L], float("-inf"), tl.float32),
                         mask=offs_l < L)
            return
        q = tl.load(q_ptr + t * s_qt + offs_h[:, None] * s_qh + offs_d[None, :], mask=hmask[:, None], other=0.0)
        w = tl.load(w_ptr + t * s_wt + offs_h, mask=hmask, other=0.0) * scale
        acc = tl.zeros([256], tl.int32)  # HIST: the top 8 bits of the written scores' sort keys
        for j in range(N_INNER):
            offs_l = l0 + j * step + tl.arange(0, BLOCK_L)
            valid = offs_l < vlen
            slot = tl.load(slots_ptr + seq * s_ss + offs_l, mask=valid, other=0).to(tl.int64)
            keys = tl.load(k_ptr + slot[:, None] * s_kn + offs_d[None, :], mask=valid[:, None], other=0.0)
            sc = _index_sum(q, w, keys, KSCALE, QFP8, KEYS_MAJOR)
            ksv = tl.load(ks_ptr + slot, mask=valid, other=0.0) if KSCALE else sc  # loaded after the dot (faster)
            sc = _index_finish(sc, ksv, offs_l, vlen, KSCALE, ZERO_RANK)
            tl.store(out_ptr + t * s_ot + offs_l, sc, mask=offs_l < L)
            if HIST:  # as topk_radix's first digit pass counts them: finite scores (-inf, past vlen, keys 0)
                u = _sort_key(sc)
                acc += tl.histogram((u >> 24).to(tl.int32), 256, mask=u != 0)
        if HIST:
            # only the nonzero bins: a program's scores fill a few of the 256 (DS4F_TOPK_SPARSE_ADD's reason)
            tl.atomic_add(hist_ptr + t * 256 + tl.arange(0, 256), acc, mask=acc != 0, sem="relaxed")

def indexer_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    k_pool: torch.Tensor,
    slots: torch.Tensor,
    seq_of: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    *,
    block_l: int = 64,
    n_inner: int | None = None,
    num_warps: int = 4,
    num_stages: int = 4,
    token_block: int | None = None,
    keys_major: bool = False,
    zero_rank: bool = False,
    strided: bool = True,
    hist: torch.Tensor | None = None,
    decode_km: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """scores [T, L] fp32 = scale * Σ_h w[t,h] ReLU(q[t,h]·k[slots[seq_of[t], l]]), -inf at l >= valid_len[t].

    q [T, Hi, d] bf16 (d a power of two, last dim dense), or e4m3 with e4m3 keys (quant_heads_fp8: its per-head
    scales folded into w, which ReLU commutes with); w [T, Hi] fp32; k_pool [N, d] bf16, or e4m3 with
    k_scale [N] fp32 (one scale per row, the 132 B/entry format); slots [S, L] int32 flat slot ids per sequence;
    seq_of [T] int32 (row of slots per token); valid_len [T] int32 (causal count (t+1)//ratio, clipped to L).
    Slots at l >= valid_len are never read. scale defaults to d^-0.5. token_block > 1: that many tokens per program
    (ds4f.kernels.indexer_tb, each key tile shared by them); None: DS4F_INDEXER_TB ("bt" or
    "bt,block_l,num_warps[,num_stages]"; 1 = one token per program; default TB_DEFAULT; "k,..." the keys-major
    kernel) for calls of >= TB_MIN_T tokens.
    keys_major (with token_block): the keys-major kernel of ds4f.kernels.indexer_tb. zero_rank: an exact-zero score
    (every head's ReLU at 0) at column l becomes -(l + 1) * 1e-30, below 0 and above any negative score a bf16
    product gives, so among tied zeros the lower id ranks higher (what the reference's selection keeps).
    strided (one token per program): a program's n_inner key blocks lie a grid apart (else adjacent; the scores are
    the same); decode calls take n_inner down to leave ~2 programs per SM at a short L. hist (decode calls of one
    token per program, Triton only; from decode_hist_buffer): int32, zeroed; row t's first 256 entries get the
    histogram of the top 8 bits of its finite scores' radix sort keys (topk_indices' hist_buf). decode_km
    (block_l, n_inner, num_warps, num_stages; default DS4F_INDEXER_DECODE_KM; () or block_l 0: off): calls of
    < TB_MIN_T tokens without a token_block or n_inner take _indexer_fwd's keys-major form (KEYS_MAJOR) at that tile."""
    assert q.dim() == 3 and q.stride(-1) == 1, "q must be [T, Hi, d] with its last dim dense"
    assert q.dtype == torch.bfloat16 or (q.dtype == torch.float8_e4m3fn and k_pool.dtype == torch.float8_e4m3fn), \
        "q must be bf16, or e4m3 over e4m3 keys"
    T, HI, DI = q.shape
    assert DI & (DI - 1) == 0 and DI >= 16, f"d={DI} must be a power of two >= 16"
    assert w.shape == (T, HI) and w.dtype == torch.float32 and w.stride(-1) == 1
    assert k_pool.dim() == 2 and k_pool.shape[1] == DI and k_pool.stride(-1) == 1
    assert slots.dim() == 2 and slots.dtype == torch.int32 and slots.stride(-1) == 1
    assert seq_of.shape == (T,) and seq_of.dtype == torch.int32 and seq_of.is_contiguous()
    assert valid_len.shape == (T,) and valid_len.dtype == torch.int32 and valid_len.is_contiguous()
    if k_pool.dtype == torch.float8_e4m3fn:
        assert k_scale is not None and k_scale.dtype == torch.float32 and k_scale.numel() == k_pool.shape[0]
        k_scale = k_scale.reshape(-1)
        assert k_scale.is_contiguous()
    else:
        assert k_pool.dtype == torch.bfloat16 and k_scale is None, "k_pool must be bf16 (or fp8 + k_scale)"
    scale = DI**-0.5 if scale is None else scale
    if not use_triton(q):
        ks = None if k_scale is None else k_scale[:, None]
        ref = indexer_scores_ref(q, w, k_pool, slots, seq_of, valid_len, scale, ks)
        if zero_rank:
            ranks = -(torch.arange(ref.shape[1], device=ref.device, dtype=torch.float32) + 1) * 1e-30
            for r in range(0, ref.shape[0], 1024):  # in place, rows at a time: no second [T, L] buffer
                part = ref[r: r + 1024]
                torch.where(part == 0, ranks, part, out=part)
        return ref
    L = slots.shape[1]
    out = torch.empty(T, L, dtype=torch.float32, device=q.device)
    if T == 0 or L == 0:
        return out
    if token_block is None and T >= TB_MIN_T:  # DS4F_INDEXER_TB
        token_block, keys_major = TB_KNOBS[0], TB_KEYS_MAJOR
        if len(TB_KNOBS) >= 3:
            block_l, num_warps = TB_KNOBS[1], TB_KNOBS[2]
        if len(TB_KNOBS) == 4:
            num_stages = TB_KNOBS[3]
    km = DECODE_KM if decode_km is None else decode_km
    dec_km = bool(km and km[0]) and token_block is None and T < TB_MIN_T and n_inner is None
    if token_block is None and T < TB_MIN_T and n_inner is None:
        block_l, n_inner, num_warps, num_stages = km if dec_km else DECODE_KNOBS
        if n_inner:  # a short L (static): fewer blocks per program while that leaves under ~2 programs per SM
            n_inner = min(n_inner, max(1, triton.cdiv(T * L, block_l * 2 * sm_count(q.device))))
        n_inner = n_inner or None
    token_block = token_block or 1
    assert hist is None or (token_block == 1 and not keys_major and hist.dtype == torch.int32
                            and hist.is_contiguous() and hist.numel() >= T * 256), \
        "hist: int32, >= T * 256 entries, for the one-token-per-program kernel"
    if n_inner is None:  # up to 8 blocks per program, fewer while that leaves under ~2 programs per SM
        n_inner = max(1, min(8, triton.cdiv(triton.cdiv(T, token_block) * L, block_l * 2 * sm_count(q.device))))
    if token_block > 1 or keys_major:
        from ds4f.kernels.indexer_tb import launch

        return launch(q, w, k_pool, k_scale, slots, seq_of, valid_len, scale, out, token_block, keys_major, block_l,
                      n_inner, num_warps, num_stages, zero_rank)
    grid = (T, triton.cdiv(L, block_l * n_inner))
    _indexer_fwd[grid](
        q, w, k_pool, k_scale if k_scale is not None else w, slots, seq_of, valid_len, out,
        hist if hist is not None else out, HI, L, scale, q.stride(0), q.stride(1), w.stride(0), k_pool.stride(0),
        slots.stride(0), out.stride(0),
        DI=DI, BLOCK_HI=max(16, triton.next_power_of_2(HI)), BLOCK_L=block_l, N_INNER=n_inner,
        KSCALE=k_scale is not None, QFP8=q.dtype == torch.float8_e4m3fn, ZERO_RANK=zero_rank, STRIDED=strided,
        num_warps=num_warps, num_stages=num_stages, HIST=hist is not None, KEYS_MAJOR=dec_km,
        **pdl.launch(q.device),
    )
    return out


def decode_hist_buffer(q: torch.Tensor, n_cols: int, k: int, zeroed: bool = True) -> torch.Tensor | None:
    """DS4F_INDEXER_HIST: a zeroed buffer for indexer_scores(hist=) + topk_indices(hist_buf=) where a decode call
    of T = q.shape[0] tokens (0 < T <= DS4F_INDEXER_HIST, T <= RADIX_MAX_ROWS) over n_cols columns takes the radix
    top-k (Triton, n_cols past the small lanes, k <= n_cols); else None (the caller runs both as before).
    zeroed=False: uninitialized, for index_q(zero=) to clear in its launch."""
    T = q.shape[0]
    if not use_triton(q) or not 0 < T <= min(INDEXER_HIST, RADIX_MAX_ROWS):
        return None
    small = SMALL_KNOBS[0]
    if not small or n_cols <= small or k > n_cols:
        return None
    return (torch.zeros if zeroed else torch.empty)(4 * T * 256 + 2 * T, dtype=torch.int32, device=q.device)


def _one_launch(scores: torch.Tensor, valid_len: torch.Tensor | None, out: torch.Tensor, k: int,
                rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> None:
    """Every row of scores [T, L <= the small lanes] selected by topk_small's kernel alone (ids, or rows)."""
    lanes = max(16, triton.next_power_of_2(scores.shape[1]))
    launch_small(scores, valid_len, out, None, None, k, lanes, 0, small_warps(lanes), rows=rows)


RADIX_MAX_ROWS = 32  # measured on H200: radix 49 vs 98 us at T=1, L=262144; even at T=32; 2x slower at T=2048


def topk_indices(scores: torch.Tensor, k: int, *, block: int | None = None, backend: str = "auto",
                 valid_len: torch.Tensor | None = None, programs: int | None = None,
                 small: int | None = None, cand: tuple[int, int] | None = None,
                 hist_buf: torch.Tensor | None = None,
                 rows: tuple[torch.Tensor, torch.Tensor, int, int] | None = None) -> torch.Tensor:
    """scores [T, L] fp32 (-inf = not selectable) -> [T, k] int32 entry ids of the k largest, -1 where fewer are
    valid. The order inside a row is unspecified (callers use the set); among equal scores at the k-th place an
    arbitrary subset is taken. backend "radix": a radix select (8 bits at a time of the order-preserving key), each
    digit pass a grid of row chunks adding into per-row histograms, then the picks (ds4f.kernels.topk_radix; cand
    below); no host sync; it beats torch.topk on H200 for few rows (decode), torch.topk wins for many (prefill), so
    "auto" takes radix for T <= RADIX_MAX_ROWS. backend "torch": torch.topk. valid_len [T] int32 (optional): row t's
    columns at or past valid_len[t] are -inf (as indexer_scores writes them) and the radix passes skip them, so
    decode at a short context over a long max_ctx costs what the context costs. block / programs (per row): the
    radix passes' tile and grid (default DS4F_TOPK_DECODE, else 2048 and ~2 programs per SM). small (a power of
    two, 0 = off; default DS4F_TOPK_SMALL's lanes): rows of at most that many valid entries (decided on the
    device) are selected by one program each (ds4f.kernels.topk_small), which also writes the -1 padding and
    zeroes the passes' histograms, so the passes skip those rows and no fill kernel runs; at L <= small that one
    launch is all. cand (default DS4F_TOPK_CAND): (lanes, cap) of the longer rows' candidate pick (two digit
    passes, a gather, one program per row; ds4f.kernels.topk_radix); lanes 0: four digit passes + a compaction (the
    former path), with which a row that fits one chunk gets the small kernel's ids in its order (the keys above the
    k-th in ascending id, then the lowest ids equal to it, then -1). hist_buf (radix path): the passes' histograms
    and counters [4 * T * 256 + 2 * T] int32, zeroed, the first digit's histogram filled by indexer_scores(hist=)
    from these scores: the first digit pass and the zeroing are skipped. rows (topk_pool_rows_long's): the
    attention index list [T, W + k] comes back instead of ids, written by the small kernel and the gather launch."""
    assert scores.dim() == 2 and scores.dtype == torch.float32 and scores.stride(-1) == 1
    assert k > 0
    T, L = scores.shape
    if backend == "auto":
        backend = "radix" if T <= RADIX_MAX_ROWS else "torch"
    if backend == "torch" or not use_triton(scores):
        return topk_indices_ref(scores, k)
    small = SMALL_KNOBS[0] if small is None else small
    assert small & (small - 1) == 0, f"small={small} must be a power of two (or 0)"
    if T == 0 or L == 0 or not small:
        out = torch.full((T, k), -1, dtype=torch.int32, device=scores.device)
        if T == 0 or L == 0:
            return out
    else:
        out = torch.empty((T, k), dtype=torch.int32, device=scores.device)
    if valid_len is not None:
        assert valid_len.shape == (T,) and valid_len.dtype == torch.int32 and valid_len.is_contiguous()
    nb = 256
    if small >= L:  # every row fits the one-program select (static): one launch
        _one_launch(scores, valid_len, out, k)
        return out
    lanes, cap = TOPK_CAND if cand is None else cand
    assert lanes & (lanes - 1) == 0 and lanes < 1 << 15 and (not lanes or cap >= lanes), \
        f"cand={(lanes, cap)}: lanes a power of two below 2^15 (or 0), cap >= lanes"
    if hist_buf is not None:
        assert hist_buf.dtype == torch.int32 and hist_buf.numel() == 4 * T * nb + 2 * T and hist_buf.is_contiguous()
        buf = hist_buf
    else:
        buf = (torch.empty if small else torch.zeros)(4 * T * nb + 2 * T, dtype=torch.int32, device=scores.device)
    hist, cnt = buf[: 4 * T * nb], buf[4 * T * nb:]
    cbuf = torch.empty(T * 2 * cap, dtype=torch.int32, device=scores.device) if lanes else None
    dst = None
    if rows is not None:
        assert small and lanes and topk_radix.FUSED_FINAL, "rows: the small kernel and the fused candidate pick"
        dst = torch.empty((T, rows[1].shape[1] + k), dtype=torch.int32, device=scores.device)
    if small:
        zero = hist_buf is None
        launch_small(scores, valid_len, out if dst is None else dst, hist if zero else None,
                     cnt if zero else None, k, small, T * nb, small_warps(small), rows=rows)
    if block is None:
        block, programs = TOPK_KNOBS[0], TOPK_KNOBS[1] or programs
    programs = programs or triton.cdiv(2 * sm_count(scores.device), T)
    n_chunks = max(1, min(triton.cdiv(L, block), programs))
    chunk = triton.cdiv(triton.cdiv(L, n_chunks), block) * block
    topk_radix.launch_passes(scores, valid_len, hist, cnt, out, k, block, chunk, small, cbuf, lanes, cap,
                             first_level=int(hist_buf is not None), rows=None if dst is None else (dst, rows))
    return out if dst is None else dst


def topk_pool_rows_long(scores: torch.Tensor, k: int, valid_len: torch.Tensor | None, hist_buf: torch.Tensor | None,
                        bt_tok: torch.Tensor, win: torch.Tensor, comp_base: int, epb: int) -> torch.Tensor | None:
    """topk_pool_rows for rows past the small lanes: topk_indices' radix passes with the rows written by the small
    kernel (short rows) and the gather launch's per-row pick (DS4F_TOPK_FUSED_FINAL), no torch mapping launch;
    None where that does not apply (the caller maps ids: see topk_pool_rows)."""
    T, L = scores.shape
    small, W = SMALL_KNOBS[0], win.shape[1]
    if not use_triton(scores) or not 0 < T <= RADIX_MAX_ROWS or not 0 < small < L or W < 1 or W & (W - 1) \
            or not TOPK_CAND[0] or not topk_radix.FUSED_FINAL:
        return None
    return topk_indices(scores, k, valid_len=valid_len, hist_buf=hist_buf, rows=(bt_tok, win, comp_base, epb))


def topk_pool_rows(scores: torch.Tensor, k: int, valid_len: torch.Tensor | None, bt_tok: torch.Tensor,
                   win: torch.Tensor, comp_base: int, epb: int) -> torch.Tensor | None:
    """Decode's top-k straight to the attention index list [T, W + k] int32 (window rows, then the picks' pool rows
    comp_base + bt_tok[t, id // epb] * epb + id % epb, -1 = none; the picks in topk_indices' order) in the one
    small-kernel launch, which replaces topk_indices + the torch mapping (glue.topk_rows) and its launch; None where
    that launch does not apply (no Triton / CPU, more than RADIX_MAX_ROWS rows, L past DS4F_TOPK_SMALL's lanes, W
    not a power of two). The multi-pass select writing rows as well measured slower at 1M (H200 8-layer step 2.147
    vs 2.114 ms, 2026-11-29), so long pools keep ids + the mapping."""
    T, L = scores.shape
    small, W = SMALL_KNOBS[0], win.shape[1]
    if not use_triton(scores) or not 0 < T <= RADIX_MAX_ROWS or not 0 < L <= small or W < 1 or W & (W - 1):
        return None
    out = torch.empty((T, W + k), dtype=torch.int32, device=scores.device)
    _one_launch(scores, valid_len, out, k, (bt_tok, win, comp_base, epb))
    return out


def indexer_bytes(T: int, HI: int, DI: int, L: int, key_bytes: float, distinct_keys: int | None = None) -> float:
    """Fewest HBM bytes: q, w, score writes per token, and each distinct key (+slot id) read once."""
    nk = L if distinct_keys is None else distinct_keys
    return T * (HI * DI * 2 + HI * 4 + L * 4) + nk * (key_bytes + 4)


def indexer_flops(T: int, HI: int, DI: int, L: int) -> float:
    return 2.0 * T * HI * DI * L
