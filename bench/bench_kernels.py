"""⑥ kernels, microbenchmarks: V4-Flash shapes in, one fixed-format line per kernel/shape + JSON records out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import append_jsonl, graph_of, measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels import fused_moe, indexer_scores, quantize_rows, sparse_attn, topk_indices  # noqa: E402
from ds4f.kernels.indexer import indexer_bytes, indexer_flops  # noqa: E402
from ds4f.kernels.moe import moe_bytes, moe_flops  # noqa: E402
from ds4f.kernels.sparse_attn import attn_bytes, attn_flops  # noqa: E402


class Recorder:
    def __init__(self, out: Path, command: str):
        self.out, self.rows = out, []
        self.meta = run_meta(command)
        self.copy_gbps = self.mm_tflops = 0.0

    def ceilings(self) -> None:
        self.copy_gbps, self.mm_tflops = measure_ceilings(iters=20)
        self.emit("ceiling_copy", "4GiB d2d", t_us=0.0, gbps=self.copy_gbps)
        one = torch.zeros(1, device="cuda")
        self.emit("floor_one_kernel", "1-element add, graph, after flush", t_us=time_us(lambda: one.add_(1)))
        self.emit("floor_5_kernels", "5 x 1-element add, graph", t_us=time_us(lambda: [one.add_(1) for _ in range(5)]))
        self.emit("ceiling_mm_bf16", "8192^3", t_us=0.0, tflops=self.mm_tflops)

    def emit(self, case: str, shape: str, t_us: float, gbps: float | None = None, tflops: float | None = None,
             **extra: object) -> None:
        rec: dict[str, object] = dict(case=case, shape=shape, time_us=round(t_us, 2))
        parts = [f"{case:<30} {shape:<44} {t_us:>10.1f} us"]
        if gbps is not None:
            frac = gbps / self.copy_gbps if self.copy_gbps else 0.0
            rec.update(gbps=round(gbps, 1), ceiling=f"copy {self.copy_gbps:.0f} GB/s", frac=round(frac, 3))
            parts.append(f"{gbps:>8.0f} GB/s  frac {frac:5.2f} of copy")
        if tflops is not None:
            frac = tflops / self.mm_tflops if self.mm_tflops else 0.0
            rec.update(tflops=round(tflops, 1), ceiling=f"mm {self.mm_tflops:.0f} TFLOP/s", frac=round(frac, 3))
            parts.append(f"{tflops:>8.1f} TFLOP/s  frac {frac:5.2f} of mm")
        rec.update(extra)
        rec.update(self.meta)
        print("  ".join(parts), flush=True)
        self.rows.append(rec)

    def save(self) -> None:
        append_jsonl(self.out, self.rows)


def bench_attn(r: Recorder, quick: bool) -> None:
    H, D, N = 64, 512, 1_000_000
    pool = torch.randn(N, D, device="cuda").bfloat16()
    pool8, sc8 = quantize_rows(pool, 64)
    sink = torch.randn(H, device="cuda")
    row8 = D + 4 * (D // 64)

    def case(T: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(T, H, D, device="cuda").bfloat16(), torch.randint(0, N, (T, K), device="cuda").int()

    for T, K in [(1, 640), (1, 192), (32, 640), (128, 640), (1024, 640), (4096, 640)]:
        q, idx = case(T, K)
        for name, p, s, rb in [("bf16", pool, None, 2 * D), ("fp8", pool8, sc8, row8)]:
            t = time_us(lambda q=q, idx=idx, p=p, s=s: sparse_attn(q, p, idx, sink, D**-0.5, s))
            shape = f"T={T} H={H} D={D} K={K} kv={name}"
            r.emit("attn", shape, t, gbps=attn_bytes(T, H, D, K, rb) / t / 1e3,
                   tflops=attn_flops(T, H, D, K) / t / 1e6)
    # decode sweep: head block x key split (default: auto)
    q, idx = case(1, 640)
    for bh, bk, ns_, nw in [(64, 64, 10, 8), (16, 64, 10, 4), (16, 64, 5, 4), (16, 128, 5, 4)]:
        kw = dict(block_h=bh, block_k=bk, num_splits=ns_, num_warps=nw)
        t = time_us(lambda kw=kw: sparse_attn(q, pool, idx, sink, D**-0.5, **kw))
        r.emit("attn_decode_cfg", f"T=1 K=640 bh={bh} bk={bk} splits={ns_} nw={nw}", t,
               gbps=attn_bytes(1, H, D, 640, 2 * D) / t / 1e3)
    small = pool[:4096].clone()
    idx_small = torch.randint(0, 4096, (1, 640), device="cuda").int()
    t = time_us(lambda: sparse_attn(q, small, idx_small, sink, D**-0.5))
    r.emit("attn_decode_smallpool", "T=1 K=640 N=4096", t, gbps=attn_bytes(1, H, D, 640, 2 * D) / t / 1e3)
    pool1, sc1 = quantize_rows(pool, D)
    for T in (128, 4096):
        q, idx = case(T, 640)
        for name, p, s, bk, rb in [("fp8 g64 bk=32", pool8, sc8, 32, row8), ("fp8 g64 bk=64", pool8, sc8, 64, row8),
                                   ("fp8 row bk=64", pool1, sc1, 64, D + 4)]:
            t = time_us(lambda q=q, idx=idx, p=p, s=s, bk=bk: sparse_attn(q, p, idx, sink, D**-0.5, s, block_k=bk))
            r.emit("attn_fp8", f"T={T} K=640 kv={name}", t, gbps=attn_bytes(T, H, D, 640, rb) / t / 1e3,
                   tflops=attn_flops(T, H, D, 640) / t / 1e6)
    del pool1, sc1
    # one decode step's attention: 43 layers (21 CSA 128+512, 20 HCA 128+64 at 8K, 2 SWA 128), one CUDA graph
    ks = [640] * 21 + [192] * 20 + [128] * 2
    for name, p, s, rb in [("bf16", pool, None, 2 * D), ("fp8", pool8, sc8, row8)]:
        qs = [torch.randn(1, H, D, device="cuda").bfloat16() for _ in ks]
        ids = [torch.randperm(N, device="cuda")[:k].int().view(1, k) for k in ks]

        def step(qs=qs, ids=ids, p=p, s=s) -> None:
            for qq, ii in zip(qs, ids):
                sparse_attn(qq, p, ii, sink, D**-0.5, s)

        t = time_us(graph_of(step), graph=False)
        r.emit("attn_decode_step_graph", f"43 layers keys={sum(ks)} kv={name}", t,
               gbps=sum(attn_bytes(1, H, D, k, rb) for k in ks) / t / 1e3)


def bench_indexer(r: Recorder, quick: bool) -> None:
    HI, DI = 64, 128
    for T, L, prefill in [(1, 2048, False), (1, 65_536, False), (1, 262_144, False), (32, 65_536, False),
                          (2048, 32_768, True)]:
        N = max(4 * L, 1 << 20)
        kp = torch.randn(N, DI, device="cuda").bfloat16()
        kq, ks = quantize_rows(kp, DI)
        q = torch.randn(T, HI, DI, device="cuda").bfloat16()
        w = torch.randn(T, HI, device="cuda")
        S = 1 if prefill else T
        slots = torch.randint(0, N, (S, L), device="cuda").int()
        seq_of = torch.zeros(T, device="cuda").int() if prefill else torch.arange(T, device="cuda").int()
        if prefill:  # the last T tokens of a 4L-token prompt: causal counts (pos + 1) // 4
            vlen = ((4 * L - T + torch.arange(T, device="cuda") + 1) // 4).int()
        else:
            vlen = torch.full((T,), L, device="cuda").int()
        distinct = L * S
        for name, kk, sc, kb in [("bf16", kp, None, 2 * DI), ("fp8", kq, ks.view(-1), DI + 4)]:
            args = (q, w, kk, slots, seq_of, vlen)
            t = time_us(lambda args=args, sc=sc: indexer_scores(*args, k_scale=sc))
            shape = f"T={T} Hi={HI} d={DI} L={L} k={name}"
            r.emit("indexer", shape, t, gbps=indexer_bytes(T, HI, DI, L, kb, distinct) / t / 1e3,
                   tflops=indexer_flops(T, HI, DI, L) / t / 1e6)
        if L == 262_144 or prefill:
            for bl, ni, nw, ns in [(64, 16, 4, 4), (128, 8, 8, 3)]:
                kw = dict(block_l=bl, n_inner=ni, num_warps=nw, num_stages=ns)
                base = (q, w, kp, slots, seq_of, vlen)
                t = time_us(lambda kw=kw, base=base: indexer_scores(*base, **kw))
                r.emit("indexer_cfg", f"T={T} L={L} bl={bl} ni={ni} nw={nw} ns={ns}", t,
                       gbps=indexer_bytes(T, HI, DI, L, 2 * DI, distinct) / t / 1e3,
                       tflops=indexer_flops(T, HI, DI, L) / t / 1e6)
        s = indexer_scores(q, w, kp, slots, seq_of, vlen)
        for be in ("torch", "radix"):
            t = time_us(lambda s=s, be=be: topk_indices(s, 512, backend=be))
            r.emit(f"topk_{be}", f"T={T} L={L} k=512", t, gbps=T * L * 4 / t / 1e3)
        del kp, kq, ks


def bench_moe(r: Recorder, quick: bool) -> None:
    E, k, D, I = 256, 6, 4096, 2048
    w13 = (torch.randn(E, 2 * I, D, device="cuda") * D**-0.5).bfloat16()
    w2 = (torch.randn(E, D, I, device="cuda") * I**-0.5).bfloat16()
    for T in [1, 8, 64, 512, 2048, 8192]:
        x = torch.randn(T, D, device="cuda").bfloat16()
        ids = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.int()
        wt = torch.rand(T, k, device="cuda")
        t = time_us(lambda x=x, ids=ids, wt=wt: fused_moe(x, w13, w2, ids, wt, 10.0), iters=20 if T > 512 else 50)
        r.emit("moe", f"T={T} E={E} k={k} D={D} I={I}", t, gbps=moe_bytes(T, k, E, D, I) / t / 1e3,
               tflops=moe_flops(T, k, D, I) / t / 1e6)
    for T, cfgs in [
        (8, [(16, 32, 128, 4, 3, 1), (16, 32, 128, 4, 3, 0)]),
        (2048, [(64, 128, 64, 4, 4, 0), (128, 256, 64, 8, 3, 0)]),
    ]:
        x = torch.randn(T, D, device="cuda").bfloat16()
        ids = torch.rand(T, E, device="cuda").topk(k, dim=1).indices.int()
        wt = torch.rand(T, k, device="cuda")
        for bm, bn, bk, nw, ns, pp in cfgs:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, PER_PICK=pp)
            try:
                t = time_us(lambda x=x, ids=ids, wt=wt, cfg=cfg: fused_moe(x, w13, w2, ids, wt, 10.0, config=cfg),
                          iters=20 if T > 512 else 50)
            except Exception as ex:  # a config that does not fit: report, keep going
                print(f"moe_cfg {cfg} failed: {str(ex)[:160]}")
                continue
            r.emit("moe_cfg", f"T={T} bm={bm} bn={bn} bk={bk} nw={nw} ns={ns} per_pick={pp}", t,
                   gbps=moe_bytes(T, k, E, D, I) / t / 1e3, tflops=moe_flops(T, k, D, I) / t / 1e6)


def diag() -> None:
    """Registers, spills and shared memory of every kernel compiled in this run."""
    # ds4f.kernels.sparse_attn is the function (re-exported); the module is in sys.modules
    sa, indexer, moe = (sys.modules[f"ds4f.kernels.{m}"] for m in ("sparse_attn", "indexer", "moe"))

    for fn in (sa._attn_fwd, sa._attn_combine, indexer._indexer_fwd, indexer._topk_hist, indexer._topk_select,
               moe._moe_up, moe._moe_down):
        for cache in fn.device_caches.values():
            for key, k in cache[0].items():
                const = getattr(k, "src", None)
                const = getattr(const, "constants", {}) if const is not None else {}
                print(f"diag {fn.__name__:<14} regs {k.n_regs:>3} spills {k.n_spills:>4} smem {k.metadata.shared:>6} "
                      f"warps {k.metadata.num_warps} stages {k.metadata.num_stages} {dict(const) or str(key)[:150]}")


def ncu_workload() -> None:
    """A few decode-shaped launches for `ncu` to profile (sparse attention T=1 K=640, indexer L=262144, top-k)."""
    H, D, N = 64, 512, 1_000_000
    pool = torch.randn(N, D, device="cuda").bfloat16()
    q, idx = torch.randn(1, H, D, device="cuda").bfloat16(), torch.randint(0, N, (1, 640), device="cuda").int()
    sink = torch.randn(H, device="cuda")
    kp = torch.randn(N, 128, device="cuda").bfloat16()
    qi, w = torch.randn(1, 64, 128, device="cuda").bfloat16(), torch.randn(1, 64, device="cuda")
    slots = torch.randint(0, N, (1, 262_144), device="cuda").int()
    one = torch.zeros(1, device="cuda").int()
    for _ in range(3):
        sparse_attn(q, pool, idx, sink, D**-0.5)
        s = indexer_scores(qi, w, kp, slots, one, one + 262_144)
        topk_indices(s, 512)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="attn,indexer,moe")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.jsonl"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.only == "ncu":
        ncu_workload()
        return
    r = Recorder(Path(a.out), " ".join(sys.argv))
    t0 = time.time()
    r.ceilings()
    for name in a.only.split(","):
        {"attn": bench_attn, "indexer": bench_indexer, "moe": bench_moe}[name](r, a.quick)
        print(f"# {name} done at {time.time() - t0:.0f}s", flush=True)
    r.save()
    try:
        diag()
    except Exception as ex:  # diagnostics only
        print(f"diag failed: {ex!r}")


if __name__ == "__main__":
    main()
