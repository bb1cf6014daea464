"""Decode router microbenchmark: the old two launches (route_two: scores, then the pick) vs the one launch (route_fused)
at V4-Flash widths (E = 256, D = 4096, top-6 + the shared id), learned and hash layers, T = 1, 4, 16.
Out: one line per case, µs per route call from a CUDA graph of N calls on N distinct gate-weight copies (L2 flushed
before each replay), so launch gaps count as in the decode graph. Hash layers also time fused_allsc (all scores
read, as learned layers, instead of the hashed rows). --sweep adds learned-layer fused tiles (weight elements per
program x warps x channel chunks at T = 1; the default is ds4f.kernels.router.TILE)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import time_us  # noqa: E402
from ds4f.kernels import router as r  # noqa: E402

E, D, K, VOCAB = 256, 4096, 6, 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20, help="route calls per graph, each on its own weight copy")
    ap.add_argument("--tokens", default="1,4,16")
    ap.add_argument("--sweep", action="store_true",
                    help="also fused tiles (4096, 8192, 16384) x warps (2, 4, 8) x splits (8, 16, 32)")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(E, D, device="cuda", generator=g) / D**0.5).bfloat16() for _ in range(a.calls)]
    bias = torch.randn(E, device="cuda", generator=g) * 0.1
    tid = torch.rand(VOCAB, E, device="cuda", generator=g).argsort(dim=1)[:, :K]
    variants = [("two", r.route_two, {}), ("fused", r.route_fused, {})]
    if a.sweep:
        variants += [(f"fused{el}x{nw}s{sp}", r.route_fused, dict(elems=el, num_warps=nw, splits=sp))
                     for el in (4096, 8192, 16384) for nw in (2, 4, 8) for sp in (8, 16, 32)]
    print(f"# E={E} D={D} top-{K} + shared, {a.calls} calls per graph, default fused tile {r.TILE}", flush=True)
    for t in (int(v) for v in a.tokens.split(",")):
        x = torch.randn(t, D, device="cuda", generator=g).bfloat16()
        ids = torch.randint(0, VOCAB, (t,), device="cuda", generator=g)
        for layer, b, h in (("learned", bias, None), ("hash", None, tid)):
            want = r.route_ref(x, ws[0], b, h, ids, K, True, 2.5, E)
            base = None
            # hash layers: the tile sweep does not apply to the hashed-rows path
            mine = variants if h is None else variants[:2] + [("fused_allsc", r.route_fused, dict(hash_rows=False))]
            for name, fn, kw in mine:
                gi, _ = fn(x, ws[0], b, h, ids, K, True, 2.5, E, **kw)
                ok = torch.equal(gi.long().sort(1).values, want[0].long().sort(1).values)

                def calls(fn=fn, kw=kw, x=x, b=b, h=h, ids=ids) -> None:
                    for w in ws:
                        fn(x, w, b, h, ids, K, True, 2.5, E, **kw)

                us = time_us(calls, iters=30, flush=True, graph=True) / a.calls
                base = base or us
                print(f"T={t:<3} {layer:<8} {name:<14} {us:7.2f} us/call  x{base / us:4.2f} vs two  ids_ok={ok}",
                      flush=True)


if __name__ == "__main__":
    main()
