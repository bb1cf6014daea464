"""⑥ kernels, block-FP8 GEMM microbenchmark: V4-Flash FP8 linear shapes x M in; one line and one JSON record per case
out (µs, GB/s, TFLOP/s, fractions of copy bandwidth and of torch's bf16 / fp8 matmul measured in the same run, and
the relative error against the dequantize-then-matmul reference).

`--warm I/N` only compiles (runs every I-th case once): N such processes in parallel fill Triton's on-disk cache so
that the timed run spends its time timing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings, run_meta, time_us  # noqa: E402
from ds4f.kernels.fp8_gemm import (  # noqa: E402
    Cfg,
    Opts,
    fp8_grouped_linear,
    fp8_linear,
    fp8_linear_a8_ref,
    fp8_linear_ref,
    quant_act,
)
from ds4f.model.quant import dequant_fp8_block, quant_fp8_block  # noqa: E402

# (name, N per group, K, groups): attention projections of one layer and the head (bf16 in the checkpoint; fp8 here)
SHAPES = [("wq_a", 1024, 4096, 1), ("wq_b", 32768, 1024, 1), ("wkv", 512, 4096, 1), ("wo_a", 1024, 4096, 8),
          ("wo_b", 4096, 8192, 1), ("head", 129280, 4096, 1)]
MS = [1, 4, 16, 8192]
DECODE_SWEEP = [Cfg(16, 32, 128, 4, 4), Cfg(16, 64, 128, 4, 3), Cfg(16, 64, 128, 4, 6), Cfg(16, 128, 128, 4, 4),
                Cfg(16, 128, 128, 8, 4), Cfg(16, 256, 128, 8, 3)]
PREFILL_SWEEP = [Cfg(64, 128, 128, 4, 4), Cfg(128, 128, 128, 8, 3), Cfg(128, 128, 128, 4, 3),
                 Cfg(128, 256, 128, 8, 3), Cfg(64, 256, 128, 4, 3), Cfg(128, 128, 128, 8, 4)]
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args, self.rows, self.t0 = args, [], time.time()
        self.meta = run_meta(args.command)
        self.copy_gbps = self.mm_tflops = self.fp8_tflops = 0.0

    def ceilings(self) -> None:
        self.copy_gbps, self.mm_tflops = measure_ceilings(iters=10)
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        try:
            x8 = x.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            t = time_us(lambda: torch._scaled_mm(x8, x8.t(), one, one, out_dtype=torch.bfloat16), 10, False, False)
            self.fp8_tflops = 2 * 8192**3 / t / 1e6
        except Exception as ex:  # older torch / arch without fp8 matmul
            print(f"# fp8 _scaled_mm ceiling unavailable: {str(ex)[:100]}")
        self.emit(dict(case="ceiling", variant="copy 4GiB d2d", gbps=round(self.copy_gbps, 1)))
        self.emit(dict(case="ceiling", variant="torch bf16 mm 8192^3", tflops=round(self.mm_tflops, 1)))
        self.emit(dict(case="ceiling", variant="torch fp8 _scaled_mm 8192^3", tflops=round(self.fp8_tflops, 1)))

    def emit(self, rec: dict) -> None:
        rec.update(self.meta)
        self.rows.append(rec)
        keys = ("case", "variant", "m", "time_us", "gbps", "frac_copy", "tflops", "frac_mm", "frac_fp8mm", "rel_err",
                "rel_err_vs_a8_ref", "rel_err_outlier_acts", "error", "ref_error")
        print("  ".join(f"{k}={rec[k]}" for k in keys if k in rec), flush=True)
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(self.args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def timed(self, name: str, n: int, k: int, g: int, m: int, variant: str, fn: Callable[[], object],
              wbytes: int, quant: bool = False, **extra: object) -> None:
        try:
            t = time_us(fn, iters=10 if m > 64 else 50)
        except Exception as ex:
            self.emit(dict(case=name, variant=variant, m=m, error=f"{type(ex).__name__}: {str(ex)[:300]}"))
            return
        nb = 3 * m * g * k if quant else wbytes + 2 * m * g * k + 2 * m * g * n  # quant: bf16 in, e4m3 out
        gbps, tflops = nb / t / 1e3, (0 if quant else 2 * m * g * n * k) / t / 1e6
        rec = dict(case=name, shape=f"M={m} N={g}x{n} K={k}", variant=variant, m=m, time_us=round(t, 2),
                   gbps=round(gbps, 1), tflops=round(tflops, 2), frac_copy=round(gbps / self.copy_gbps, 3),
                   frac_mm=round(tflops / self.mm_tflops, 3))
        if self.fp8_tflops:
            rec["frac_fp8mm"] = round(tflops / self.fp8_tflops, 3)
        rec.update(extra)
        self.emit(rec)


def _weights(n: int, k: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    return quant_fp8_block(torch.randn(g * n, k, device="cuda", generator=gen) * 0.02, "ue8m0")


def _acts(m: int, g: int, k: int, outliers: bool) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(m, g, k, device="cuda", generator=gen)
    if outliers:  # 1% of channels 30x larger, as in LLM hidden states
        x = x * torch.where(torch.rand(k, device="cuda", generator=gen) < 0.01, 30.0, 1.0)
    return x.bfloat16()


def shape_cases(run: Run, name: str, n: int, k: int, g: int, warm: bool) -> None:
    q, s = _weights(n, k, g)
    wbytes = q.numel() + 4 * s.numel()

    def gemm(x: torch.Tensor, opts: Opts | None = None) -> torch.Tensor:
        # x [M, G, K] -> [M, G, N]
        return fp8_linear(x, q, s, opts=opts) if g == 1 else fp8_grouped_linear(x, q, s, opts=opts)

    def ref(x: torch.Tensor, a8: bool) -> torch.Tensor:
        fn = fp8_linear_a8_ref if a8 else fp8_linear_ref
        return torch.stack([fn(x[:, i], q[i * n:(i + 1) * n], s[i * n // 128:(i + 1) * n // 128], torch.float32)
                            for i in range(g)], 1)

    wb = None if warm else dequant_fp8_block(q, s, torch.bfloat16).view(g, n, k)
    for m in run.args.ms:
        x = _acts(m, g, k, False)
        variants: list[tuple[str, Opts]] = [("auto", Opts())]
        if m <= 64:
            variants += [("serial", Opts(serial=True)), ("bits", Opts(native=False))]
            if m <= 4:
                variants += [("gemv", Opts("w8", gemv=True))]
            if m == 1 and name in ("wq_a", "wo_b", "head", "wq_b"):
                variants += [(f"cfg bn={c.bn} w={c.warps} st={c.stages}", Opts(cfg=c)) for c in DECODE_SWEEP]
        else:
            variants += [("w8 (sm_80 fallback)", Opts("w8", native=False))]
            if name in ("wo_b", "wq_b"):
                variants += [(f"cfg {c.bm}x{c.bn} w={c.warps} st={c.stages}", Opts("a8w8", c)) for c in PREFILL_SWEEP]
        for variant, opts in variants:
            if warm:
                try:
                    gemm(x, opts)
                except Exception as ex:
                    print(f"# warm {name} M={m} {variant}: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
                continue
            if time.time() - run.t0 > run.args.budget and variant not in ("auto", "serial"):
                continue
            extra: dict[str, object] = {}
            if variant in ("auto", "bits", "serial", "gemv") or variant.startswith("w8"):
                rows = slice(0, min(m, 256))
                try:
                    out = gemm(x[rows].contiguous(), opts).float()
                    extra["rel_err"] = round(_rel(out, ref(x[rows], False)), 5)
                    if m > 64 and variant == "auto":
                        extra["rel_err_vs_a8_ref"] = round(_rel(out, ref(x[rows], True)), 6)
                        xo = _acts(256, g, k, True)
                        extra["rel_err_outlier_acts"] = round(_rel(gemm(xo).float(), ref(xo, False)), 5)
                except Exception as ex:
                    extra["ref_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
            run.timed(name, n, k, g, m, variant, lambda x=x, opts=opts: gemm(x, opts), wbytes, **extra)
        if warm:
            if m > 64:
                quant_act(x.view(m, g * k))
            continue
        xt = x.transpose(0, 1)
        run.timed(name, n, k, g, m, "torch bf16 (dequantized weight)",
                  lambda x=x, xt=xt: F.linear(x[:, 0], wb[0]) if g == 1 else torch.bmm(xt, wb.transpose(1, 2)),
                  2 * g * n * k)
        if m > 64:
            xf = x.view(m, g * k)
            run.timed(name, n, k, g, m, "activation quant only", lambda xf=xf: quant_act(xf), 0, quant=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench/results/fp8_gemm.jsonl"))
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    p.add_argument("--budget", type=float, default=1e9, help="seconds; after it only the default variants run")
    p.add_argument("--warm", default=None, help="I/N: compile every N-th shape starting at I, time nothing")
    p.add_argument("--command", default="python3 bench/bench_fp8_gemm.py")
    args = p.parse_args()
    run = Run(args)
    shapes = [s for s in SHAPES if s[0] in args.shapes]
    if args.warm:
        i, nparts = (int(v) for v in args.warm.split("/"))
        for name, n, k, g in shapes[i::nparts]:
            shape_cases(run, name, n, k, g, warm=True)
        return
    run.ceilings()
    for name, n, k, g in shapes:
        shape_cases(run, name, n, k, g, warm=False)
        torch.cuda.empty_cache()
    print(f"# {len(run.rows)} records in {time.time() - run.t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
