"""Session-12 diagnosis: moe_mxfp4_a8 end to end against its oracle per tile (64-row tiles: wgmma, 32-row: mma.sync),
scale spread and x outliers (its ACC loop measured tl.dot's fp32 promotion, since removed from the kernels)."""
import sys

import torch

sys.path.insert(0, ".")
from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4
from ds4f.kernels.moe_mxfp4_a8 import fused_moe_mxfp4_a8_ref


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(E, D, I, T, k, seed, s_lo, s_hi, outlier):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13q = torch.randint(0, 256, (E, 2 * I, D // 2), dtype=torch.uint8, device="cuda", generator=g)
    w13s = torch.randint(s_lo, s_hi, (E, 2 * I, D // 32), dtype=torch.uint8, device="cuda", generator=g)
    w2q = torch.randint(0, 256, (E, D, I // 2), dtype=torch.uint8, device="cuda", generator=g)
    w2s = torch.randint(s_lo, s_hi, (E, D, I // 32), dtype=torch.uint8, device="cuda", generator=g)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    if outlier:
        x[0, :6] = torch.tensor([3e4, -2e4, 1e-30, 0.5, 7.0, -9.0], device="cuda")
    ids = torch.rand(T, E, device="cuda", generator=g).topk(k, dim=1).indices.int()
    wts = torch.softmax(torch.randn(T, k, device="cuda", generator=g), 1)
    return x, w13q, w13s, w2q, w2s, ids, wts


TILES = [(64, 512, 2, 4, 3, 64, 512, 1, 4, 3), (64, 256, 4, 4, 4, 64, 256, 4, 4, 4),
         (32, 256, 4, 4, 4, 32, 256, 2, 4, 4)]
for (E, D, I, T, k) in [(32, 4096, 1024, 1, 6), (32, 4096, 1024, 4, 6), (32, 4096, 2048, 4, 6)]:
    for s_lo, s_hi, outlier in [(119, 122, False), (110, 131, False), (110, 131, True)]:
        c = case(E, D, I, T, k, 7, s_lo, s_hi, outlier)
        ref = fused_moe_mxfp4_a8_ref(*c, 10.0)
        errs = []
        for tiles in TILES:
            out = fused_moe_mxfp4(*c, 10.0, config=dict(DEC=tiles, A8=1))
            errs.append(f"{tiles[0]}x{tiles[1]}:{rel(out, ref):.1e}")
        print(f"I={I} T={T} s={s_lo}-{s_hi} {'outlier' if outlier else 'plain':7s} " + " ".join(errs), flush=True)
