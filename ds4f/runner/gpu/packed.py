"""⑤ runner GPU fast path, packed weights: Linears of a model loaded with keep_dequantized=False in, the fast path's
projections and routed-expert stacks on the checkpoint's packed tensors out (ds4f.model.loader, ds4f.model.linear).

A Linear is packed when its `weight` is a meta tensor and `packed_weight` / `packed_scale` hold the tensors as
shipped: fp8 = e4m3 [N, K] + block scales [ceil(N/128), ceil(K/128)] (UE8M0 bytes or fp32); fp4 = MXFP4 nibbles
[N, K/2] uint8 + UE8M0 [N, K/32]. Any other Linear (bf16, or dequantized at load) takes the unchanged bf16 path.
- linear(lin, x): fp8_linear on a packed fp8 Linear, lin(x) otherwise.
- InProj: the linears that read one input, stacked in runs of consecutive linears: dense ones as one bf16 matrix,
  packed fp8 ones whose row counts are multiples of 128 (the scale block) as one e4m3 matrix + one scale grid; any
  other packed linear runs alone. x [T, K] -> [T, sum(out)] in the linears' order (one cat when there are runs).
- grouped_out: wo_a per group: fp8_grouped_linear when the group's rows are a multiple of 128, else every group
  through the whole fp8_linear keeping its own columns (G times the work; only tiny test configs are off the grid).
- stack_mx: MXFP4 routed experts -> MxMoE in fused_moe_mxfp4's layouts. The shared expert goes in as bf16 (the only
  form fused_moe_mxfp4 takes): dequantized once when fp8, 3 * Is * D * 2 bytes per layer (48 MiB at Flash width,
  ~2 GiB over its 43 layers, beside the packed copy the module keeps).
- dense_weight(lin): the compute-dtype weight, dequantized when packed: how FP8 routed experts (Flash-Base), which
  fused_moe_mxfp4 cannot run, reach the bf16 expert stack.
- stack_inputs / stack_experts: FastModel's per-layer stacks (the input projections, the experts + shared expert).
Stacking copies each part once into the new tensor and points the module's tensor at its view (no extra memory
past one stack's transient).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ds4f.kernels import fp8_gemv, gemv
from ds4f.kernels.fp8_gemm import _scale_arg, fp8_grouped_linear, fp8_linear, fp8_native
from ds4f.model.deepseek_v4 import Block
from ds4f.model.linear import Linear
from ds4f.model.moe import MoE
from ds4f.model.quant import FP8_BLOCK, dequantize
from ds4f.runner.gpu import glue

# an FP8 shared expert runs on its packed weights (fp8_linear) instead of a bf16 copy through fused_moe (~1 GiB per
# rank at TP=2); GPU-tested (test_shared_expert_on_packed_fp8_gpu); DS4F_SHARED_FP8=0 keeps the bf16 copy
SHARED_FP8 = os.environ.get("DS4F_SHARED_FP8", "1") == "1"
# decode: the shared expert's SwiGLU inside its w2 GEMV (fp8_gemv.linear_act) instead of a launch between its GEMVs:
# the chain on the side stream, which the routed down kernel waits for, one kernel shorter. Opt-in
# (DS4F_SHARED_ACT_FUSED=1): in the 12-layer TP=2 rank step on an H200 (session 17, bench/results/full.jsonl) replay
# 1.471 / 2.039 ms at one / four tokens against 1.469 / 2.065 without, but in the full TP=2 run (session 17) the
# fused w2 GEMV, launched with PDL right behind the w13 GEMV, holds SM slots while it waits, and the routed up
# kernel beside it took 19.7 vs 14.3 us at one token, 42.8 vs 38.4 at four (MoE sublayer 43.1 vs 39.9 us at one);
# linear_act now launches without PDL (not yet timed)
SHARED_ACT_FUSED = os.environ.get("DS4F_SHARED_ACT_FUSED", "0") == "1"


def shared_fp8_out(shared: tuple[InProj, Linear], x: torch.Tensor, limit: float) -> torch.Tensor:
    """The shared expert on packed FP8: x [T, D] -> w2(swiglu_clamp([w1; w3] x)) [T, D] bf16 (the activation
    rounded to x's dtype between the GEMMs, as fused_moe stores it)."""
    w13, w2 = shared
    h = w13(x)
    if SHARED_ACT_FUSED and is_packed(w2) and _fp8_gemv_takes(w2, h):
        return fp8_gemv.linear_act(h, limit, *_gemv_args(w2, h))
    return linear(w2, glue.swiglu_act(h, limit))


def _fp8_gemv_takes(lin: Linear, x: torch.Tensor) -> bool:
    """Whether fp8_gemv's one-launch entries (linear_norm, linear_act) run lin (packed) on x: FP8, CUDA, T <= its
    MAX_T, unit inner stride."""
    return lin.fmt == "fp8" and x.is_cuda and fp8_gemv.USE_GEMV and x.shape[0] <= fp8_gemv.MAX_T and x.stride(-1) == 1


def _gemv_args(lin: Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """(w, scales, e8m0, native) of a packed FP8 lin as fp8_gemv's entries take them."""
    w, s = _pk(lin)
    ws, e8m0 = _scale_arg(s)
    return w.contiguous(), ws, e8m0, fp8_native(x.device)


def is_packed(lin: Linear) -> bool:
    return lin.weight.is_meta and lin.packed_weight is not None and lin.packed_scale is not None


def _pk(lin: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    assert lin.packed_weight is not None and lin.packed_scale is not None
    return lin.packed_weight, lin.packed_scale


def dense_weight(lin: Linear, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] weight in `dtype` (the parameter itself when not packed)."""
    if not is_packed(lin):
        return lin.weight
    return dequantize(lin.fmt, *_pk(lin), dtype)


def linear(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    if not is_packed(lin):  # decode-sized bf16 inputs through the Triton GEMV (its fallback: F.linear)
        return gemv.linear(x.to(lin.weight.dtype), lin.weight)
    if lin.fmt != "fp8":
        raise NotImplementedError(f"packed {lin.fmt} linear outside the routed experts")
    return fp8_linear(x, *_pk(lin), x.dtype)


def linear_norm(lin: Linear, x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """lin(RMSNorm_g(x)) with the norm inside the decode GEMV: bf16 (gemv.linear_norm) or FP8 (fp8_gemv.linear_norm,
    CUDA, T <= its MAX_T); elsewhere the reference norm, then linear."""
    if not is_packed(lin):
        return gemv.linear_norm(x.to(lin.weight.dtype), g, eps, lin.weight)
    if _fp8_gemv_takes(lin, x):
        return fp8_gemv.linear_norm(x, g, eps, *_gemv_args(lin, x))
    return linear(lin, gemv.rms_norm_ref(x, g, eps))


def norm_in_gemv(lin: Linear, x: torch.Tensor) -> bool:
    """Whether linear_norm(lin, x, ...) runs the norm inside the CUDA-core FP8 GEMV (one launch, split K kept)."""
    from ds4f.kernels import fp8_gemv_cc

    return (fp8_gemv_cc.NORM and is_packed(lin) and _fp8_gemv_takes(lin, x)
            and fp8_gemv_cc.norm_takes(x, *_pk(lin)[0].shape))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _stack(parts: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """parts[e] = tensors with equal trailing dims, concatenated along dim 0 into out[e] -> (out [len(parts), rows,
    ...] in parts[0][0]'s dtype, the view of out that holds each part). 1-byte dtypes (e4m3, e8m0) copy as bytes."""
    first = parts[0][0]
    rows = sum(t.shape[0] for t in parts[0])
    out = torch.empty(len(parts), rows, *first.shape[1:], dtype=first.dtype, device=first.device)
    raw = _bytes(out)
    views: list[list[torch.Tensor]] = []
    for e, ts in enumerate(parts):
        o, vs = 0, []
        for t in ts:
            raw[e, o: o + t.shape[0]].copy_(_bytes(t))
            vs.append(out[e, o: o + t.shape[0]])
            o += t.shape[0]
        views.append(vs)
    return out, views


@dataclass
class _Run:
    w: torch.Tensor  # [n, K] bf16 (dense) or e4m3 (fp8)
    s: torch.Tensor | None  # fp8 block scales [n/128, ceil(K/128)]; None: dense


class InProj:
    """Linears reading one input -> x [T, K] @ [W_0; W_1; ...]^T = [T, sum(out)] (see the module docstring)."""

    dense_linear = staticmethod(gemv.linear)  # the dense runs' GEMV (bench/whatif.py swaps it: timing only)

    def __init__(self, lins: list[Linear]) -> None:
        self.sizes = [lin.out_features for lin in lins]
        groups: list[tuple[str, list[Linear]]] = []
        for lin in lins:
            kind = "dense" if not is_packed(lin) else "fp8" if self._stackable(lin) else "alone"
            if groups and kind != "alone" and groups[-1][0] == kind:
                groups[-1][1].append(lin)
            else:
                groups.append((kind, [lin]))
        self.runs: list[_Run] = []
        with torch.no_grad():
            for kind, g in groups:
                self.runs.append(self._dense(g) if kind == "dense" else self._fp8(g))
        # both dense and FP8 runs (the packed checkpoint's attention inputs: wq_a | wkv FP8, compressors bf16)
        self.mixed = len({r.s is None for r in self.runs}) == 2

    @staticmethod
    def _stackable(lin: Linear) -> bool:
        return lin.fmt == "fp8" and lin.out_features % FP8_BLOCK == 0

    @staticmethod
    def _dense(g: list[Linear]) -> _Run:
        w, views = _stack([[lin.weight for lin in g]])
        for lin, v in zip(g, views[0]):
            lin.weight.data = v
        return _Run(w[0], None)

    @staticmethod
    def _fp8(g: list[Linear]) -> _Run:
        pk = [_pk(lin) for lin in g]
        if len(g) == 1:
            return _Run(*pk[0])
        assert len({s.dtype for _, s in pk}) == 1, "fp8 linears of one layer with different scale dtypes"
        w, wv = _stack([[w for w, _ in pk]])
        s, sv = _stack([[s for _, s in pk]])
        for lin, a, b in zip(g, wv[0], sv[0]):
            lin.packed_weight, lin.packed_scale = a, b
        return _Run(w[0], s[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ys = self.run_outputs(x)
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def run_outputs(self, x: torch.Tensor, dense: torch.cuda.Stream | None = None) -> list[torch.Tensor]:
        """x [T, K] -> one [T, n_run] output per run (dense runs through the decode GEMV, which falls back to
        F.linear off its conditions). dense: the dense (bf16) runs go on that stream (forked from the current one,
        enqueued first so they run beside the FP8 runs; the caller orders its readers after them)."""
        ys: list[torch.Tensor | None] = [None] * len(self.runs)
        if dense is not None:
            dense.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(dense):
                for j, r in enumerate(self.runs):
                    if r.s is None:
                        ys[j] = self.dense_linear(x, r.w)
        for j, r in enumerate(self.runs):
            if ys[j] is None:
                ys[j] = self.dense_linear(x, r.w) if r.s is None else fp8_linear(x, r.w, r.s, x.dtype)
        return [y for y in ys if y is not None]

    def cols(self, x: torch.Tensor, dense: torch.cuda.Stream | None = None) -> Cols:
        """x [T, K] -> the stacked output's columns as views of the runs' outputs (no concatenation)."""
        return Cols(self.run_outputs(x, dense))


class Cols:
    """Columns of a stacked projection's output held as consecutive runs [T, n_0], [T, n_1], ...: `cols(lo, hi)`
    is the view of columns [lo, hi), which must lie inside one run."""

    def __init__(self, ys: list[torch.Tensor]) -> None:
        self.ys = ys
        self.starts = [0]
        for y in ys:
            self.starts.append(self.starts[-1] + y.shape[1])

    def cols(self, lo: int, hi: int) -> torch.Tensor:
        for y, s, e in zip(self.ys, self.starts, self.starts[1:]):
            if s <= lo and hi <= e:
                return y[:, lo - s: hi - s]
        raise ValueError(f"columns [{lo}, {hi}) straddle the runs starting at {self.starts}")

    def split(self, sizes: list[int]) -> list[torch.Tensor]:
        offs = [0]
        for n in sizes:
            offs.append(offs[-1] + n)
        return [self.cols(a, b) for a, b in zip(offs, offs[1:])]


def grouped_out(wo_a: Linear, o: torch.Tensor, groups: int) -> torch.Tensor:
    """o [T, H, hd] (inverse-roped) -> [T, G*r]: group g's H*hd/G columns through wo_a's rows g*r..(g+1)*r-1."""
    if not is_packed(wo_a):
        return gemv.grouped_linear(o, wo_a.weight.view(groups, -1, wo_a.in_features))
    w, s = _pk(wo_a)
    assert wo_a.fmt == "fp8"
    t, r = o.shape[0], wo_a.out_features // groups
    x = o.view(t, groups, -1)
    if r % FP8_BLOCK == 0:
        return fp8_grouped_linear(x, w, s, o.dtype).reshape(t, groups * r)  # the CPU fallback: strided
    return torch.cat([fp8_linear(x[:, g], w, s, o.dtype)[:, g * r: (g + 1) * r] for g in range(groups)], dim=1)


@dataclass
class MxMoE:
    """One layer's experts as fused_moe_mxfp4 takes them (its docstring has the layouts)."""
    w13_q: torch.Tensor  # [E, 2I, D/2] uint8: w1 (gate) rows then w3 (up) rows
    w13_s: torch.Tensor  # [E, 2I, D/32] UE8M0
    w2_q: torch.Tensor  # [E, D, I/2] uint8
    w2_s: torch.Tensor  # [E, D, I/32] UE8M0
    shared: tuple[torch.Tensor, torch.Tensor] | None  # bf16 (w13 [2Is, D], w2 [D, Is])
    shared_fp8: tuple[InProj, Linear] | None = None  # DS4F_SHARED_FP8=1: [w1; w3] stacked e4m3, w2 packed

    def nbytes(self) -> int:
        """Bytes of the routed stacks (the packed bytes, nothing dequantized)."""
        return sum(t.numel() * t.element_size() for t in (self.w13_q, self.w13_s, self.w2_q, self.w2_s))


@torch.no_grad()
def stack_mx(ffn: MoE, dtype: torch.dtype) -> MxMoE | None:
    """MXFP4-packed routed experts -> MxMoE (the experts' packed tensors become views of it); None when they are
    not all packed fp4 (the caller stacks dense / dequantized bf16 instead)."""
    ex = list(ffn.experts)
    if not all(e.w1.fmt == "fp4" and all(is_packed(lin) for lin in (e.w1, e.w2, e.w3)) for e in ex):
        return None
    p1, p3, p2 = ([_pk(getattr(e, n)) for e in ex] for n in ("w1", "w3", "w2"))
    w13_q, qv = _stack([[a[0], b[0]] for a, b in zip(p1, p3)])
    w13_s, sv = _stack([[a[1], b[1]] for a, b in zip(p1, p3)])
    w2_q, q2 = _stack([[a[0]] for a in p2])
    w2_s, s2 = _stack([[a[1]] for a in p2])
    for e, (q1, q3), (s1, s3), (qd,), (sd,) in zip(ex, qv, sv, q2, s2):
        e.w1.packed_weight, e.w3.packed_weight, e.w2.packed_weight = q1, q3, qd
        e.w1.packed_scale, e.w3.packed_scale, e.w2.packed_scale = s1, s3, sd
    shared = None
    if ffn.shared_experts is not None and SHARED_FP8 and all(
            lin.fmt == "fp8" and is_packed(lin) for lin in (ffn.shared_experts.w1, ffn.shared_experts.w3,
                                                            ffn.shared_experts.w2)):
        sh = ffn.shared_experts
        return MxMoE(w13_q, w13_s, w2_q, w2_s, None, (InProj([sh.w1, sh.w3]), sh.w2))
    if ffn.shared_experts is not None:
        sh = ffn.shared_experts
        w13 = torch.cat([dense_weight(sh.w1, dtype), dense_weight(sh.w3, dtype)]).to(dtype)
        w2 = dense_weight(sh.w2, dtype).to(dtype).contiguous()
        if not is_packed(sh.w1):  # bf16: the module reads the stacked copy (no second one)
            i = sh.w1.out_features
            sh.w1.weight.data, sh.w3.weight.data, sh.w2.weight.data = w13[:i], w13[i:], w2
        shared = (w13, w2)
    return MxMoE(w13_q, w13_s, w2_q, w2_s, shared)


def in_linears(blk: Block) -> list[Linear]:
    """The projections of a block that read the attention input x_n, in the stacked input's column order."""
    att = blk.attn
    lins = [att.wq_a, att.wkv]
    if att.compressor is not None:
        lins += [att.compressor.wkv, att.compressor.wgate]
    if att.indexer is not None:
        ic = att.indexer.compressor
        lins += [ic.wkv, ic.wgate, att.indexer.weights_proj]
    return lins


@torch.no_grad()
def stack_inputs(blk: Block, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | InProj, list[int]]:
    """-> (one [sum(out), D] matrix whose row blocks the modules' weights become, or with packed fp8 linears an
    InProj of stacked runs; the linears' output sizes)."""
    lins = in_linears(blk)
    sizes = [lin.out_features for lin in lins]
    if any(is_packed(lin) for lin in lins):
        return InProj(lins), sizes
    w = torch.empty(sum(sizes), lins[0].in_features, dtype=dtype, device=device)
    o = 0
    for lin, n in zip(lins, sizes):
        w[o: o + n].copy_(lin.weight)
        lin.weight.data = w[o: o + n]
        o += n
    return w, sizes


@torch.no_grad()
def stack_experts(ffn: MoE, dtype: torch.dtype, device: torch.device
                  ) -> tuple[MxMoE | None, torch.Tensor | None, torch.Tensor | None]:
    """-> (stack_mx's MxMoE for MXFP4-packed routed experts, None, None), or (None, w13 [E+1, 2I, D], w2 [E+1, D, I])
    in dtype with the shared expert as expert E (packed fp8 experts, Flash-Base, dequantized into it; the bf16
    modules' weights become views of the stacks)."""
    mx = stack_mx(ffn, dtype)
    if mx is not None:
        return mx, None, None
    experts = list(ffn.experts) + ([ffn.shared_experts] if ffn.shared_experts is not None else [])
    inter, d = experts[0].w1.out_features, experts[0].w1.in_features
    w13 = torch.empty(len(experts), 2 * inter, d, dtype=dtype, device=device)
    w2 = torch.empty(len(experts), d, inter, dtype=dtype, device=device)
    for e, ex in enumerate(experts):
        w13[e, :inter].copy_(dense_weight(ex.w1, dtype))
        w13[e, inter:].copy_(dense_weight(ex.w3, dtype))
        w2[e].copy_(dense_weight(ex.w2, dtype))
        for lin, v in ((ex.w1, w13[e, :inter]), (ex.w3, w13[e, inter:]), (ex.w2, w2[e])):
            if not is_packed(lin):  # a packed one keeps its meta weight and packed tensors
                lin.weight.data = v
    return None, w13, w2
