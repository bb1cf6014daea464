"""⑥ kernels, MoE router: normed input xn [T, D] + gate weight [E, D] in, expert ids [T, k(+1)] int32 and weights
[T, k(+1)] fp32 out; = model.moe.Gate.forward, plus the shared expert as pick id shared_id with weight 1.

scores = sqrt(softplus(xn . W^T)) in fp32; learned layers pick the top-k of scores + bias (lowest id among ties, picks
in descending order), hash layers take tid2eid[token]; weights = the picked scores, renormalized if norm, times scaling.
For a few tokens (decode) one Triton launch: learned layers split the scores over (expert block, channel chunk)
programs (the weight read by many programs), hash layers only the K hashed rows of each token over channel chunks;
each program writes its partial logits, then bumps a per-device int32 counter (barrier, acq_rel atomic) and the program
that arrives last sums the partials and does the pick for all tokens, then zeroes the counter (CUDA-graph safe; calls
on one device must not overlap on two streams). DS4F_ROUTER_FUSED_MAX_T=0 keeps the old two kernels (scores, then
one program per token for the pick). Many tokens: the torch reference (one GEMM). Triton on CUDA only.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ds4f.kernels import arrival, pdl
from ds4f.kernels.knobs import env_knobs
from ds4f.kernels.sparse_attn import use_triton

try:
    import triton
    import triton.language as tl

    from ds4f.kernels.pdl import enter as pdl_enter
except ImportError:  # CPU-only installs: the torch reference below
    triton = None

MAX_TOKENS = 16  # above this the scores go through one GEMM
# the one launch up to FUSED_MAX_T tokens (0: the old two kernels always); its all-scores tile: weight elements per
# program (16 KB of bf16), warps, channel chunks at T = 1 (fused_config)
FUSED_MAX_T = (env_knobs("DS4F_ROUTER_FUSED_MAX_T", 1, "16", minimum=0) or (MAX_TOKENS,))[0]
TILE = env_knobs("DS4F_ROUTER_TILE", 3, "8192,4,16") or (8192, 4, 16)
# PREWAIT: the all-scores launch reads its gate weight tile before the PDL wait (_router_fused PRE), so those 2 MB per
# layer overlap the mHC step before it. On by default since session 22's TP=2 run on two H200s (with DS4F_SHARED_AT_AR:
# b1 replay 4.671 vs 4.799 ms); DS4F_ROUTER_PREWAIT=0: after the wait
PREWAIT = os.environ.get("DS4F_ROUTER_PREWAIT", "1") == "1"
HASH_CHUNK = 256  # channels per hash-layer program: the K hashed rows x 256 (16 programs per token at D = 4096)


def route_ref(xn: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
              ids: torch.Tensor, k: int, norm: bool, scaling: float,
              shared_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See route."""
    scores = F.softplus(F.linear(xn.float(), w.float())).sqrt()
    if tid2eid is not None:
        eid = tid2eid[ids].long()
    else:
        eid = torch.topk(scores + bias, k, dim=-1, sorted=False).indices
    wt = scores.gather(1, eid)
    if norm:
        wt = wt / (wt.sum(dim=-1, keepdim=True) + 1e-20)
    wt = wt * scaling
    if shared_id >= 0:
        eid = torch.cat([eid, torch.full_like(eid[:, :1], shared_id)], dim=1)
        wt = torch.cat([wt, torch.ones_like(wt[:, :1])], dim=1)
    return eid.to(torch.int32), wt.contiguous()


if triton is not None:

    @triton.jit
    def _router_scores(x_ptr, w_ptr, s_ptr, T, E, D, s_xt, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
        # program = (BLOCK_E experts, CHUNK channels) for every token (T <= BLOCK_T): partial logits
        # s [D / CHUNK, T, E] fp32 (the weight read by many programs)
        e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        em = e < E
        ds = tl.program_id(1)
        t = tl.arange(0, BLOCK_T)
        tm = t < T
        acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        for i in tl.static_range(CHUNK // BLOCK_D):
            d = ds * CHUNK + i * BLOCK_D + tl.arange(0, BLOCK_D)
            dm = d < D
            x = tl.load(x_ptr + t[:, None].to(tl.int64) * s_xt + d[None, :], mask=tm[:, None] & dm[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e[:, None].to(tl.int64) * D + d[None, :], mask=em[:, None] & dm[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], 2)
        tl.store(s_ptr + (ds * T + t[:, None]) * E + e[None, :], acc, mask=tm[:, None] & em[None, :])

    @triton.jit
    def _router_pick(s_ptr, bias_ptr, hash_ptr, tok_ptr, ids_ptr, w_ptr, T, E, NDS, scaling, shared_id,
                     K: tl.constexpr, KO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_DS: tl.constexpr, HASH: tl.constexpr, NORM: tl.constexpr):
        # program = one token: partial logits -> scores; top-K of scores + bias by K rounds of argmax (or the hashed
        # ids), weights
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        em = e < E
        q = tl.arange(0, BLOCK_DS)
        lg = tl.sum(tl.load(s_ptr + (q[:, None] * T + t) * E + e[None, :], mask=(q < NDS)[:, None] & em[None, :],
                            other=0.0), 0)
        # softplus as torch computes it: log1p(exp(x)), x itself above 20; log1p(u) = log(1+u) * u / ((1+u) - 1)
        u = tl.exp(tl.minimum(lg, 20.0))
        v = 1.0 + u
        s = tl.sqrt(tl.where(lg > 20.0, lg, tl.where(v == 1.0, u, tl.log(v) * u / (v - 1.0))))
        kk = tl.arange(0, BLOCK_K)
        if HASH:
            tok = tl.load(tok_ptr + t).to(tl.int64)
            ids = tl.load(hash_ptr + tok * K + kk, mask=kk < K, other=0).to(tl.int32)
            wk = tl.zeros([BLOCK_K], tl.float32)
            for i in tl.static_range(K):  # gather from the register row: scores of the hashed ids
                wk = tl.where(kk == i, tl.sum(tl.where(e == tl.sum(tl.where(kk == i, ids, 0), 0), s, 0.0), 0), wk)
        else:
            sel = tl.where(em, s + tl.load(bias_ptr + e, mask=em, other=0.0), float("-inf"))
            ids = tl.zeros([BLOCK_K], tl.int32)
            wk = tl.zeros([BLOCK_K], tl.float32)
            for i in tl.static_range(K):
                best = tl.max(sel, 0)
                arg = tl.min(tl.where(sel == best, e, BLOCK_E), 0)  # lowest id among ties
                ids = tl.where(kk == i, arg, ids)
                wk = tl.where(kk == i, tl.sum(tl.where(e == arg, s, 0.0), 0), wk)
                sel = tl.where(e == arg, float("-inf"), sel)
        if NORM:
            wk = wk / (tl.sum(tl.where(kk < K, wk, 0.0), 0) + 1e-20)
        wk = wk * scaling
        ids = tl.where(kk == K, shared_id, ids)
        wk = tl.where(kk == K, 1.0, wk)
        tl.store(ids_ptr + t * KO + kk, ids, mask=kk < KO)
        tl.store(w_ptr + t * KO + kk, wk, mask=kk < KO)

    @triton.jit
    def _softplus_sqrt(lg):
        # softplus as torch computes it: log1p(exp(x)), x itself above 20; log1p(u) = log(1+u) * u / ((1+u) - 1)
        u = tl.exp(tl.minimum(lg, 20.0))
        v = 1.0 + u
        return tl.sqrt(tl.where(lg > 20.0, lg, tl.where(v == 1.0, u, tl.log(v) * u / (v - 1.0))))

    @triton.jit
    def _router_fused(x_ptr, w_ptr, part_ptr, cnt_ptr, bias_ptr, hash_ptr, tok_ptr, ids_ptr, wo_ptr, T, E, D, s_xt,
                      scaling, shared_id, K: tl.constexpr, KO: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EA: tl.constexpr, CHUNK: tl.constexpr,
                      NDS: tl.constexpr, HASH: tl.constexpr, ROWS: tl.constexpr, NORM: tl.constexpr,
                      PDL: tl.constexpr = False, PRE: tl.constexpr = False):
        # all scores (learned, or hash with ROWS off): program (expert block, channel chunk) -> partial logits
        # part [NDS, T, E] for every token; ROWS (hash only): program (token, channel chunk) -> part [NDS, T, BLOCK_K]
        # of the token's hashed rows. The last program to arrive sums the partials and picks for all tokens.
        # PRE (all scores): the gate weight tile and the bias are read before the PDL wait (constants: their HBM
        # latency overlaps the kernel before, ds4f.kernels.pdl); else everything after it
        if not PRE:
            pdl_enter(PDL)  # ds4f.kernels.pdl: before any read of an earlier kernel's output
        d = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        dm = d < D
        kk = tl.arange(0, BLOCK_K)
        t = tl.arange(0, BLOCK_T)
        tm = t < T
        ea = tl.arange(0, BLOCK_EA)
        if not HASH:
            bias = tl.load(bias_ptr + ea, mask=ea < E, other=0.0)
        if not ROWS:
            e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
            em = e < E
            wt = tl.load(w_ptr + e[:, None].to(tl.int64) * D + d[None, :], mask=em[:, None] & dm[None, :],
                         other=0.0).to(tl.float32)
        if PRE:
            pdl_enter(PDL)
        # the last program's inputs: loaded by all (the token ids are an earlier kernel's output: after the wait)
        if HASH:
            tk = tl.load(tok_ptr + t, mask=tm, other=0).to(tl.int64)
            hid = tl.load(hash_ptr + tk[:, None] * K + kk[None, :], mask=tm[:, None] & (kk < K)[None, :],
                          other=0).to(tl.int32)
        if ROWS:
            t0 = tl.program_id(0)
            tok = tl.load(tok_ptr + t0).to(tl.int64)
            eid = tl.load(hash_ptr + tok * K + kk, mask=kk < K, other=0).to(tl.int64)
            rows = tl.load(w_ptr + eid[:, None] * D + d[None, :], mask=(kk < K)[:, None] & dm[None, :],
                           other=0.0).to(tl.float32)
            x = tl.load(x_ptr + t0.to(tl.int64) * s_xt + d, mask=dm, other=0.0).to(tl.float32)
            tl.store(part_ptr + (tl.program_id(1) * T + t0) * BLOCK_K + kk, tl.sum(rows * x[None, :], 1))
        else:
            for i in tl.static_range(BLOCK_T):  # the weight tile stays in registers across the tokens
                x = tl.load(x_ptr + i * s_xt + d, mask=dm & (i < T), other=0.0).to(tl.float32)
                tl.store(part_ptr + (tl.program_id(1) * T + i) * E + e, tl.sum(wt * x[None, :], 1),
                         mask=em & (i < T))
        # every thread's stores, then one release: the barrier orders them before thread 0's atomic
        tl.debug_barrier()
        n = tl.num_programs(0) * tl.num_programs(1)
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1:
            if ROWS:
                lg = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
                for q in tl.static_range(NDS):
                    lg += tl.load(part_ptr + (q * T + t[:, None]) * BLOCK_K + kk[None, :], mask=tm[:, None],
                                  other=0.0, cache_modifier=".cg")
                wk = _softplus_sqrt(lg)
                ids = hid
            else:
                m2 = tm[:, None] & (ea < E)[None, :]
                lg = tl.zeros([BLOCK_T, BLOCK_EA], tl.float32)
                for q in tl.static_range(NDS):
                    lg += tl.load(part_ptr + (q * T + t[:, None]) * E + ea[None, :], mask=m2, other=0.0,
                                  cache_modifier=".cg")
                s = _softplus_sqrt(lg)
                if HASH:
                    ids = hid
                else:
                    sel = tl.where(m2, s + bias[None, :], float("-inf"))
                    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
                    for i in tl.static_range(K):  # K rounds of argmax, lowest id among ties
                        arg = tl.argmax(sel, 1, tie_break_left=True).to(tl.int32)
                        ids = tl.where(kk[None, :] == i, arg[:, None], ids)
                        sel = tl.where(ea[None, :] == arg[:, None], float("-inf"), sel)
                wk = tl.gather(s, tl.where((kk < K)[None, :], ids, 0), 1)
            if NORM:
                wk = wk / (tl.sum(tl.where((kk < K)[None, :], wk, 0.0), 1)[:, None] + 1e-20)
            wk = wk * scaling
            ids = tl.where(kk[None, :] == K, shared_id, ids)
            wk = tl.where(kk[None, :] == K, 1.0, wk)
            om = tm[:, None] & (kk < KO)[None, :]
            tl.store(ids_ptr + t[:, None] * KO + kk[None, :], ids, mask=om)
            tl.store(wo_ptr + t[:, None] * KO + kk[None, :], wk, mask=om)
            tl.store(cnt_ptr, 0)  # every program has arrived: the next launch starts from 0


def _counter(dev: torch.device) -> torch.Tensor:
    return arrival.counters(dev, 1, "router")


def fused_config(t: int, n_exp: int, dim: int, elems: int, splits: int) -> tuple[int, int, int]:
    """All-scores fused launch for t tokens -> (experts per program, channels per program, channel chunks): about
    `elems` weight elements per program; splits // t chunks (at least 2): the partials the last program sums shrink
    as t grows while the x rows each program reads grow."""
    chunk = min(triton.next_power_of_2(dim),
                max(64, triton.next_power_of_2(triton.cdiv(dim, max(2, splits // triton.next_power_of_2(t))))))
    be = max(1, min(triton.next_power_of_2(n_exp), elems // chunk))
    return be, chunk, triton.cdiv(dim, chunk)


def route_fused(xn: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
                ids: torch.Tensor, k: int, norm: bool, scaling: float, shared_id: int, elems: int = TILE[0],
                num_warps: int = TILE[1], splits: int = TILE[2], hash_rows: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """route's one-launch path (CUDA or the interpreter), 1 <= T <= MAX_TOKENS; hash_rows: hash layers read only
    the hashed weight rows (else all scores, as learned layers)."""
    t, dim = xn.shape
    n_exp = w.shape[0]
    assert 1 <= t <= MAX_TOKENS and xn.stride(1) == 1 and w.is_contiguous()
    ko, bk, bt = k + (shared_id >= 0), triton.next_power_of_2(k + 1), triton.next_power_of_2(t)
    out = torch.empty(t, ko, dtype=torch.int32, device=xn.device)
    wts = torch.empty(t, ko, dtype=torch.float32, device=xn.device)
    rows = tid2eid is not None and hash_rows
    if rows:
        be, chunk = 1, min(HASH_CHUNK, triton.next_power_of_2(dim))
        nds = triton.cdiv(dim, chunk)
        part = torch.empty(nds, t, bk, dtype=torch.float32, device=xn.device)
        grid = (t, nds)
    else:
        be, chunk, nds = fused_config(t, n_exp, dim, elems, splits)
        part = torch.empty(nds, t, n_exp, dtype=torch.float32, device=xn.device)
        grid = (triton.cdiv(n_exp, be), nds)
    hsh = tid2eid.contiguous() if tid2eid is not None else out
    _router_fused[grid](xn, w, part, _counter(xn.device), bias if bias is not None else part, hsh, ids, out, wts, t,
                        n_exp, dim, xn.stride(0), float(scaling), int(shared_id), K=k, KO=ko, BLOCK_K=bk,
                        BLOCK_T=bt, BLOCK_E=be, BLOCK_EA=triton.next_power_of_2(n_exp), CHUNK=chunk, NDS=nds,
                        HASH=tid2eid is not None, ROWS=rows, NORM=norm, PRE=PREWAIT and not rows, num_warps=num_warps,
                        **pdl.launch(xn.device))
    return out, wts


def route_two(xn: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
              ids: torch.Tensor, k: int, norm: bool, scaling: float,
              shared_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """route's old two-launch path (scores, then one program per token for the pick), 1 <= T <= MAX_TOKENS."""
    t, dim = xn.shape
    n_exp = w.shape[0]
    assert 1 <= t <= MAX_TOKENS and xn.stride(1) == 1 and w.is_contiguous()
    ko = k + (shared_id >= 0)
    be, bt, chunk = (16 if t <= 4 else 4), max(2, triton.next_power_of_2(t)), min(256, triton.next_power_of_2(dim))
    bd = min(chunk, max(16, 4096 // (bt * be)))
    nds = triton.cdiv(dim, chunk)
    part = torch.empty(nds, t, n_exp, dtype=torch.float32, device=xn.device)
    _router_scores[(triton.cdiv(n_exp, be), nds)](xn, w, part, t, n_exp, dim, xn.stride(0), BLOCK_T=bt, BLOCK_E=be,
                                                  CHUNK=chunk, BLOCK_D=bd, num_warps=4)
    out = torch.empty(t, ko, dtype=torch.int32, device=xn.device)
    wts = torch.empty(t, ko, dtype=torch.float32, device=xn.device)
    hsh = tid2eid.contiguous() if tid2eid is not None else out
    _router_pick[(t,)](part, bias if bias is not None else part, hsh, ids, out, wts, t, n_exp, nds, float(scaling),
                       int(shared_id), K=k, KO=ko, BLOCK_K=triton.next_power_of_2(ko + 1),
                       BLOCK_E=triton.next_power_of_2(n_exp), BLOCK_DS=triton.next_power_of_2(nds),
                       HASH=tid2eid is not None, NORM=norm, num_warps=4)
    return out, wts


def route(xn: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
          ids: torch.Tensor, k: int, norm: bool, scaling: float, shared_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """xn [T, D], w [E, D] (any float dtype, fp32 math); learned layers: bias [E] fp32, tid2eid None; hash layers:
    tid2eid [vocab, k], bias None; ids [T] token ids; shared_id < 0: no shared pick.
    -> expert ids [T, k(+1)] int32, weights [T, k(+1)] fp32."""
    t, dim = xn.shape
    n_exp = w.shape[0]
    assert w.shape == (n_exp, dim) and (tid2eid is None) != (bias is None) and ids.shape == (t,)
    assert tid2eid is None or tid2eid.shape[1] == k
    if not use_triton(xn) or t > MAX_TOKENS or t == 0:
        return route_ref(xn, w, bias, tid2eid, ids, k, norm, scaling, shared_id)
    fn = route_fused if t <= FUSED_MAX_T else route_two
    return fn(xn, w, bias, tid2eid, ids, k, norm, scaling, shared_id)
