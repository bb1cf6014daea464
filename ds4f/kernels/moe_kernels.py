"""⑥ kernels, routed MoE, the Triton side: expert-sorted picks + bf16 weights in, SwiGLU activations / weighted
per-pick rows out. Imported only where triton is; the wrapper and its torch fallback are in ds4f/kernels/moe.py.

Layout shared by the kernels: picks are flat ids p = t*k + j (p < M = T*k). A "block" is BLOCK_M consecutive slots of
sorted_ids, all of one expert (block_expert[b], -1 = unused); padding slots hold M. With PER_PICK, block b is pick b
alone (block_expert = topk_ids flattened, no sort). The programs run in grouped order: GROUP_M consecutive blocks
sweep all N tiles together, so an expert's weight tile is read from HBM once for all its blocks, and the blocks'
input rows stay in L2 for the whole N sweep (row-major order re-reads all inputs once per N tile). Decode variants of
the down GEMM: SPLIT_K (K over several programs, fp32 partial rows) and FUSE_SUM (a program sums one token's picks)."""

from __future__ import annotations

import triton
import triton.language as tl

from ds4f.kernels.pdl import enter as pdl_enter


@triton.jit
def _tile(pid, nb, n_tiles, GROUP_M: tl.constexpr):
    per_group = GROUP_M * n_tiles
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(nb - first, GROUP_M)
    r = pid % per_group
    return first + r % size, r // size


@triton.jit
def _mm(a, b, acc, F32_DOT: tl.constexpr):
    # acc += a @ bᵀ; F32_DOT: the CPU interpreter (triton 3.6 + numpy 2.4) multiplies bf16 tiles wrongly
    if F32_DOT:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc)
    return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _picks(sid_ptr, pid_m, M, BLOCK_M: tl.constexpr, PER_PICK: tl.constexpr):
    # pick ids [BLOCK_M] of block pid_m (M = padding)
    if PER_PICK:
        sid = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, M)
    else:
        sid = tl.load(sid_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return sid


@triton.jit
def _moe_up(
    x_ptr, w_ptr, sid_ptr, be_ptr, a_ptr, M, nb, limit, s_xt, s_we, s_wn, s_at,
    I: tl.constexpr, DM: tl.constexpr, TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PER_PICK: tl.constexpr, F32_DOT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    # program = (block of BLOCK_M picks of one expert, BLOCK_N columns of gate and the same columns of up);
    # a[slot] = swiglu_clamp(x[tok] @ [gate | up]ᵀ) for the block's real slots (padding slots are left unwritten)
    pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
    pid_m, pid_n = _tile(tl.program_id(0), nb, tl.cdiv(I, BLOCK_N), GROUP_M)
    e = tl.load(be_ptr + pid_m)
    if e >= 0:
        sid = _picks(sid_ptr, pid_m, M, BLOCK_M, PER_PICK)
        rmask = sid < M
        tok = (tl.where(rmask, sid, 0) // TOPK).to(tl.int64)  # padding rows: masked loads, never stored
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_nc = tl.minimum(offs_n, I - 1).to(tl.int64)  # a ragged N tile re-reads the last row, not stored
        offs_k = tl.arange(0, BLOCK_K)
        xp = x_ptr + tok[:, None] * s_xt + offs_k[None, :]
        gp = w_ptr + e.to(tl.int64) * s_we + offs_nc[:, None] * s_wn + offs_k[None, :]
        up = gp + I * s_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, DM, BLOCK_K):
            # padding rows are masked (no load): with one pick per block they are 15 of the 16 x rows
            if DM % BLOCK_K == 0:
                xa = tl.load(xp, mask=rmask[:, None], other=0.0)
                wg = tl.load(gp)
                wu = tl.load(up)
            else:
                km = (k0 + offs_k) < DM
                xa = tl.load(xp, mask=rmask[:, None] & km[None, :], other=0.0)
                wg = tl.load(gp, mask=km[None, :], other=0.0)
                wu = tl.load(up, mask=km[None, :], other=0.0)
            acc_g = _mm(xa, wg, acc_g, F32_DOT)
            acc_u = _mm(xa, wu, acc_u, F32_DOT)
            xp += BLOCK_K
            gp += BLOCK_K
            up += BLOCK_K
        # V4 SwiGLU: silu(min(gate, limit)) * clamp(up, -limit, limit)
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        act = g / (1.0 + tl.exp(-g)) * u
        rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        tl.store(a_ptr + rows[:, None] * s_at + offs_n[None, :], act.to(tl.bfloat16),
                 mask=rmask[:, None] & (offs_n < I)[None, :])


@triton.jit
def _moe_down(
    a_ptr, w_ptr, sid_ptr, be_ptr, tw_ptr, ids_ptr, out_ptr, M, nb, s_at, s_we, s_wn, s_ot,
    DM: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PER_PICK: tl.constexpr, F32_DOT: tl.constexpr, TOPK: tl.constexpr = 1,
    KP: tl.constexpr = 1, SPLIT_K: tl.constexpr = 1, FUSE_SUM: tl.constexpr = False, fin_ptr=None, cnt_ptr=None,
    SERIAL: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # program = (block, BLOCK_N output columns[, K split]); out[pick] = topk_weight[pick] * (a[slot] @ w2[e]ᵀ), one
    # row per pick (no atomics: the caller sums a token's k rows). Unwritten padding rows of a only reach unstored
    # rows. SPLIT_K > 1: program s covers I / SPLIT_K of K and writes fp32 row pick*SPLIT_K + s (summed after).
    # FUSE_SUM (PER_PICK only; a's row for pick p is p*BLOCK_M): program = (BLOCK_N columns, token t[, K split])
    # covering all TOPK picks of t, out row t*SPLIT_K + s = Σ_j topk_weight[t,j] * (a[p] @ w2[e_j]ᵀ) in fp32 (bf16
    # when SPLIT_K == 1: the final output, no sum launch). Token-minor order: programs of one N tile run together,
    # so an expert picked by several tokens is read from L2 after the first.
    pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
    KS: tl.constexpr = I // SPLIT_K
    NKS: tl.constexpr = (KS + BLOCK_K - 1) // BLOCK_K
    pid = tl.program_id(0)
    s = pid % SPLIT_K
    offs_k = tl.arange(0, BLOCK_K)
    if FUSE_SUM:
        t = (pid // SPLIT_K) % nb  # nb = tokens here
        pid_n = pid // (SPLIT_K * nb)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_nc = tl.minimum(offs_n, DM - 1).to(tl.int64)
        jj = tl.arange(0, KP)
        es = tl.load(ids_ptr + t * TOPK + jj, mask=jj < TOPK, other=0).to(tl.int64)
        tws = tl.load(tw_ptr + t * TOPK + jj, mask=jj < TOPK, other=0.0)
        r0 = tl.arange(0, BLOCK_M) == 0  # the one real row of each pick's activation block
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for it in range(0, TOPK * NKS):  # one flat loop over (pick, K tile): the load pipeline never drains
            j = it // NKS
            kk = s * KS + (it % NKS) * BLOCK_K + offs_k
            e = tl.sum(tl.where(jj == j, es, 0), 0)
            tw = tl.sum(tl.where(jj == j, tws, 0.0), 0)
            km = kk < s * KS + KS
            p = (t * TOPK + j).to(tl.int64) * BLOCK_M
            aa = tl.load(a_ptr + (p + tl.arange(0, BLOCK_M))[:, None] * s_at + kk[None, :],
                         mask=r0[:, None] & km[None, :], other=0.0)
            wd = tl.load(w_ptr + e * s_we + offs_nc[:, None] * s_wn + kk[None, :], mask=km[None, :], other=0.0)
            acc += _mm(aa, wd, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), F32_DOT) * tw
        orow = (t * SPLIT_K + s).to(tl.int64)
        optr = out_ptr + orow * s_ot + tl.arange(0, BLOCK_M)[:, None] * 0 + offs_n[None, :]
        omask = r0[:, None] & (offs_n < DM)[None, :]
        if SPLIT_K == 1:
            tl.store(optr, acc.to(tl.bfloat16), mask=omask)
        else:
            tl.store(optr, acc, mask=omask)
            if SERIAL:  # the last split of (token, N tile) to arrive sums the partials in split order (moe_sum's
                # fp32 order) into fin [T, DM] bf16 and re-arms the count: no sum launch
                tile = t * tl.cdiv(DM, BLOCK_N) + pid_n
                tl.debug_barrier()  # every thread's partial is stored before the release below
                if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
                    tot = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                    for sp in range(SPLIT_K):
                        tot += tl.load(optr + (sp - s) * s_ot, mask=omask, other=0.0, cache_modifier=".cg")
                    tl.store(fin_ptr + t.to(tl.int64) * DM + tl.arange(0, BLOCK_M)[:, None] * 0 + offs_n[None, :],
                             tot.to(tl.bfloat16), mask=omask)
                    tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        pid_m, pid_n = _tile(pid // SPLIT_K, nb, tl.cdiv(DM, BLOCK_N), GROUP_M)
        e = tl.load(be_ptr + pid_m)
        if e >= 0:
            sid = _picks(sid_ptr, pid_m, M, BLOCK_M, PER_PICK)
            rmask = sid < M
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_nc = tl.minimum(offs_n, DM - 1).to(tl.int64)
            rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            ap = a_ptr + rows[:, None] * s_at + s * KS + offs_k[None, :]
            wp = w_ptr + e.to(tl.int64) * s_we + offs_nc[:, None] * s_wn + s * KS + offs_k[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, KS, BLOCK_K):
                if KS % BLOCK_K == 0:
                    aa = tl.load(ap, mask=rmask[:, None], other=0.0)
                    wd = tl.load(wp)
                else:
                    km = (k0 + offs_k) < KS
                    aa = tl.load(ap, mask=rmask[:, None] & km[None, :], other=0.0)
                    wd = tl.load(wp, mask=km[None, :], other=0.0)
                acc = _mm(aa, wd, acc, F32_DOT)
                ap += BLOCK_K
                wp += BLOCK_K
            tw = tl.load(tw_ptr + sid, mask=rmask, other=0.0)
            orow = sid.to(tl.int64) * SPLIT_K + s
            omask = rmask[:, None] & (offs_n < DM)[None, :]
            if SPLIT_K == 1:
                tl.store(out_ptr + orow[:, None] * s_ot + offs_n[None, :], (acc * tw[:, None]).to(tl.bfloat16),
                         mask=omask)
            else:
                tl.store(out_ptr + orow[:, None] * s_ot + offs_n[None, :], acc * tw[:, None], mask=omask)


@triton.jit
def _scatter_chunk(e, j, rank0, rows1, start1, start2, pick0, sid1_ptr, be1_ptr, sid2_ptr, be2_ptr, E,
                   BM1: tl.constexpr, BM2: tl.constexpr, CH: tl.constexpr, EP: tl.constexpr):
    # picks pick0 + j (j < CH) with experts e (E = none) -> sorted slots. Sort keys e*CH + j keep flat order inside
    # an expert; rank = rank0[e] (its picks in earlier chunks) + rank among this chunk's picks of e. Ranks below
    # rows1[e] go to tier 1 at start1[e] + rank, the rest (BM2 > 0: the expert's last <= BM2 picks) to tier 2 at
    # start2[e] + rank - rows1[e]. Runs start block-aligned, so each used block's first slot names its expert.
    s = tl.sort(e * CH + j)
    se = s // CH
    cnt = tl.histogram(e, EP)  # [EP]; bin E counts the padding picks
    rank = tl.gather(rank0, se, 0) + j - tl.gather(tl.cumsum(cnt, 0) - cnt, se, 0)
    real = se < E  # padding keys sort last
    pick = pick0 + s % CH
    r1 = tl.gather(rows1, se, 0)
    t1 = real & (rank < r1)
    d1 = tl.gather(start1, se, 0) + rank
    tl.store(sid1_ptr + d1, pick, mask=t1)
    tl.store(be1_ptr + d1 // BM1, se, mask=t1 & (d1 % BM1 == 0))
    if BM2 > 0:
        t2 = real & (rank >= r1)
        d2 = tl.gather(start2, se, 0) + rank - r1
        tl.store(sid2_ptr + d2, pick, mask=t2)
        tl.store(be2_ptr + d2 // BM2, se, mask=t2 & (d2 % BM2 == 0))


@triton.jit
def _tiers(tot, ex, E, BM1: tl.constexpr, BM2: tl.constexpr):
    # per-expert pick counts [EP] -> (rows1, start1, start2, tier-1 blocks, tier-2 blocks). One tier: runs padded to
    # BM1. Two: the remainder of a run past its last full BM1 block goes to one BM2 block when it fits (else one more
    # BM1 block), so padding is < BM2 rows per expert instead of < BM1.
    if BM2 > 0:
        n1 = tot // BM1 + (tot % BM1 > BM2).to(tl.int32)
    else:
        n1 = (tot + BM1 - 1) // BM1
    n1 = tl.where(ex < E, n1, 0)
    rows1 = tl.minimum(tot, n1 * BM1)
    has2 = ((tot > rows1) & (ex < E)).to(tl.int32)
    p1 = n1 * BM1
    p2 = has2 * BM2
    return rows1, tl.cumsum(p1, 0) - p1, tl.cumsum(p2, 0) - p2, tl.sum(n1, 0), tl.sum(has2, 0)


@triton.jit
def _fill_unused(be_ptr, used, nb, NBP: tl.constexpr):
    for b0 in range(0, NBP, 1024):
        b = b0 + tl.arange(0, 1024)
        tl.store(be_ptr + b, tl.full([1024], -1, tl.int32), mask=(b >= used) & (b < nb))


@triton.jit
def _align_small(ids_ptr, sid_ptr, be_ptr, M, nb, E, BLOCK_M: tl.constexpr, MP: tl.constexpr, EP: tl.constexpr,
                 PP: tl.constexpr, NBP: tl.constexpr):
    # one program, one tier: moe_align for M <= MP picks (E < EP experts) in registers
    i = tl.arange(0, MP)
    e = tl.load(ids_ptr + i, mask=i < M, other=E)
    ex = tl.arange(0, EP)
    rows1, start1, start2, used, _ = _tiers(tl.histogram(e, EP), ex, E, BLOCK_M, 0)
    j = tl.arange(0, PP)
    tl.store(sid_ptr + j, tl.full([PP], 0, tl.int32) + M, mask=j < nb * BLOCK_M)
    _fill_unused(be_ptr, used, nb, NBP)
    tl.debug_barrier()  # the padding fill lands before the picks that overwrite it
    _scatter_chunk(e, i, ex * 0, rows1, start1, start2, 0, sid_ptr, be_ptr, sid_ptr, be_ptr, E, BLOCK_M, 0, MP, EP)


@triton.jit
def _align_count(ids_ptr, hist_ptr, M, E, CH: tl.constexpr, EP: tl.constexpr):
    # large M, pass 1 of 3: hist[c, e] = picks of expert e in chunk c (CH picks per program)
    i = tl.program_id(0) * CH + tl.arange(0, CH)
    e = tl.load(ids_ptr + i, mask=i < M, other=E)
    tl.store(hist_ptr + tl.program_id(0) * EP + tl.arange(0, EP), tl.histogram(e, EP))


@triton.jit
def _align_offsets(hist_ptr, rank0_ptr, meta_ptr, be1_ptr, be2_ptr, n_chunks, nb1, nb2, E, BM1: tl.constexpr,
                   BM2: tl.constexpr, EP: tl.constexpr, MAXC: tl.constexpr, NBP1: tl.constexpr,
                   NBP2: tl.constexpr):
    # pass 2, one program: rank0[c, e] = picks of e in chunks before c; meta = (rows1, start1, start2) [3, EP];
    # unused blocks -1. Loops run to power-of-two bounds (a runtime range bound breaks the CPU interpreter).
    ex = tl.arange(0, EP)
    tot = tl.zeros([EP], tl.int32)
    for c in range(MAXC):
        tot += tl.load(hist_ptr + c * EP + ex, mask=(ex < EP) & (c < n_chunks), other=0)
    rows1, start1, start2, used1, used2 = _tiers(tot, ex, E, BM1, BM2)
    tl.store(meta_ptr + ex, rows1)
    tl.store(meta_ptr + EP + ex, start1)
    tl.store(meta_ptr + 2 * EP + ex, start2)
    run = ex * 0
    for c in range(MAXC):
        ok = (ex < EP) & (c < n_chunks)
        tl.store(rank0_ptr + c * EP + ex, run, mask=ok)
        run += tl.load(hist_ptr + c * EP + ex, mask=ok, other=0)
    _fill_unused(be1_ptr, used1, nb1, NBP1)
    if BM2 > 0:
        _fill_unused(be2_ptr, used2, nb2, NBP2)


@triton.jit
def _align_scatter(ids_ptr, rank0_ptr, meta_ptr, sid1_ptr, be1_ptr, sid2_ptr, be2_ptr, M, E, BM1: tl.constexpr,
                   BM2: tl.constexpr, CH: tl.constexpr, EP: tl.constexpr):
    # pass 3: each chunk's picks to their slots (the sorted_ids were filled with M before)
    c = tl.program_id(0)
    j = tl.arange(0, CH)
    ex = tl.arange(0, EP)
    e = tl.load(ids_ptr + c * CH + j, mask=c * CH + j < M, other=E)
    _scatter_chunk(e, j, tl.load(rank0_ptr + c * EP + ex), tl.load(meta_ptr + ex), tl.load(meta_ptr + EP + ex),
                   tl.load(meta_ptr + 2 * EP + ex), c * CH, sid1_ptr, be1_ptr, sid2_ptr, be2_ptr, E, BM1, BM2, CH,
                   EP)


@triton.jit
def _moe_sum(rows_ptr, sh_ptr, out_ptr, T, K: tl.constexpr, D: tl.constexpr, HAS_SH: tl.constexpr,
             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr):
    # out[t] = Σ_j rows[t*K + j] (+ sh[t]) in fp32, in pick order, stored bf16 (rows bf16 or fp32)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (t < T)[:, None] & (d < D)[None, :]
    p = rows_ptr + (t * K * D)[:, None] + d[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(p + j * D, mask=m, other=0.0).to(tl.float32)
    if HAS_SH:
        acc += tl.load(sh_ptr + (t * D)[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
    if F32:  # the interpreter truncates fp32 -> bf16: round to nearest even by hand, as the GPU does
        b = acc.to(tl.int32, bitcast=True)
        acc = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    tl.store(out_ptr + (t * D)[:, None] + d[None, :], acc.to(tl.bfloat16), mask=m)
