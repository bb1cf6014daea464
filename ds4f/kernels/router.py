"""⑥ kernels, MoE router: normed input xn [T, D] + gate weight [E, D] in, expert ids [T, k(+1)] int32 and weights
[T, k(+1)] fp32 out; = model.moe.Gate.forward, plus the shared expert as pick id shared_id with weight 1.

scores = sqrt(softplus(xn . W^T)) in fp32; learned layers pick the top-k of scores + bias (lowest id among ties),
hash layers take tid2eid[token]; weights = the picked scores, renormalized if norm, times scaling. For a few tokens
(decode) two Triton kernels: the scores split over expert blocks (the weight read by many programs), then one
program per token for the pick. Many tokens: the torch reference (one GEMM). Triton on CUDA only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds4f.kernels.sparse_attn import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference below
    triton = None

MAX_TOKENS = 16  # above this the scores go through one GEMM


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
    assert xn.stride(1) == 1 and w.is_contiguous()
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
