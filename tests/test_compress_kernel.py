"""KV compressor step of the fast path on CPU: glue.compress_ref (ring + in-chunk gather, one batch of candidates) vs
the reference model's Compressor.project + compress over chunked prefill and decode of three sequences, and the
Triton kernel (ds4f.kernels.compress) under TRITON_INTERPRET=1 (tiny shapes, in a subprocess) vs compress_ref."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.cache import DenseCache
from ds4f.model.compressor import Compressor
from ds4f.model.layers import Rope
from ds4f.runner.gpu.glue import compress_ref

ROOT = Path(__file__).resolve().parents[1]
ARGS = ModelArgs.from_hf(tiny_config())
# (ratio, overlap, head_dim): CSA attention compressor, its indexer's compressor, HCA
KINDS = {"csa": (4, True, ARGS.head_dim), "index": (4, True, ARGS.index_head_dim), "hca": (16, False, ARGS.head_dim)}
# forwards of (sequence, start, tokens); sequence s lives in ring slot SLOTS[s]. Chunks cross window edges, so
# entries read both carry-ring rows (earlier chunks) and this chunk's rows; then decode steps and a mid-decode chunk.
SCHEDULE = [[(0, 0, 13), (1, 0, 21)], [(0, 13, 2), (1, 21, 17), (2, 0, 5)]]
SCHEDULE += [[(0, 15 + k, 1), (1, 38 + k, 1), (2, 5 + k, 1)] for k in range(6)]
SCHEDULE += [[(0, 21, 1), (2, 11, 9), (1, 44, 1)]]
SCHEDULE += [[(0, 22 + k, 1), (1, 45 + k, 1), (2, 20 + k, 1)] for k in range(12)]
SLOTS = [1, 2, 0]
EPS = ARGS.rms_norm_eps


@dataclass
class Case:
    m: int
    overlap: bool
    comp: Compressor
    cos: torch.Tensor
    sin: torch.Tensor
    tables: list[list[int]]  # block ids per sequence
    dest_base: int = 5
    fwds: list[dict] = field(default_factory=list)

    @property
    def R(self) -> int:
        return 2 * self.m if self.overlap else self.m

    @property
    def epb(self) -> int:
        return 2  # block_size = 2 * ratio: entries of one sequence span several blocks

    @property
    def dummy_block(self) -> int:
        return sum(len(t) for t in self.tables)


def make_case(kind: str, dtype: torch.dtype, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    m, overlap, hd = KINDS[kind]
    comp = Compressor(ARGS, m, hd, overlap, dtype)
    for lin in (comp.wkv, comp.wgate):
        lin.weight.data.copy_(torch.randn(lin.weight.shape, generator=g) * 2 / ARGS.hidden_size ** 0.5)
    comp.ape.data.copy_(torch.randn(comp.ape.shape, generator=g))
    comp.norm.weight.data.copy_(torch.rand(hd, generator=g) + 0.5)
    rope = Rope.compress(ARGS)
    cos, sin = rope.cos_sin(torch.arange(64))
    n_blk = -(-64 // (2 * m))
    perm = torch.randperm(3 * n_blk, generator=g).tolist()
    case = Case(m, overlap, comp, cos, sin, [perm[s * n_blk: (s + 1) * n_blk] for s in range(3)])
    for step, fwd in enumerate(SCHEDULE):
        pos, tok_seq, cs = [], [], []
        for s, start, n in fwd:
            pos += range(start, start + n)
            tok_seq += [s] * n
            cs += [start] * n
        p = torch.tensor(pos)
        if all(n == 1 for _, _, n in fwd):  # decode: every token is a candidate (FastCache.decode_buffers)
            et = torch.arange(len(pos))
        else:  # chunks: the completing tokens (FastCache.build_meta), a none and a token that completes nothing
            et = torch.tensor([t for t, q in enumerate(pos) if (q + 1) % m == 0] + [-1, step % len(pos)])
        x = torch.randn(len(pos), ARGS.hidden_size, generator=g).to(dtype)
        case.fwds.append(dict(fwd=fwd, x=x, kvz=torch.cat([comp.wkv(x), comp.wgate(x)], dim=1), p=p, et=et,
                              cs=torch.tensor(cs), slot=torch.tensor([SLOTS[s] for s in tok_seq]),
                              bt=torch.tensor([case.tables[s] for s in tok_seq])))
    return case


def drive(case: Case, fn: Callable[..., tuple[torch.Tensor, ...]]) -> list[dict]:
    """Run fn forward by forward as FastModel._compress does: entries -> pool rows dst, then rows -> carry ring."""
    cd2 = case.comp.state_width
    ring = torch.zeros((len(SLOTS) + 1) * case.R, cd2)
    out = []
    for f in case.fwds:
        rows, ent, dst = fn(f["kvz"], case.comp.ape, ring, case.comp.norm.weight, f["et"], f["p"], f["cs"],
                            f["slot"], f["bt"], case.cos, case.sin, case.m, case.R, case.overlap, EPS,
                            case.dest_base, case.dummy_block, case.epb)
        c1 = torch.tensor([s + n for _, s, n in f["fwd"] for _ in range(n)])
        last = f["p"] >= c1 - case.R  # the chunk's last R positions reach the ring; the rest its dummy slot
        ring.index_copy_(0, torch.where(last, f["slot"], len(SLOTS)) * case.R + f["p"] % case.R, rows)
        out.append(dict(rows=rows, ent=ent, dst=dst))
    return out


def drive_pool(case: Case, fn: Callable[..., tuple[torch.Tensor | None, ...]], in_place: bool,
               dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """As FastModel._compress: decode forwards with in_place pass ring_rows / pool (the kernel stores rows and
    entries itself), every other forward stores them after the call -> (ring, pool) after each forward."""
    cd2 = case.comp.state_width
    hd = case.comp.norm.weight.shape[0]
    ring = torch.zeros((len(SLOTS) + 1) * case.R, cd2)
    pool = torch.zeros(case.dest_base + (case.dummy_block + 1) * case.epb, hd, dtype=dtype)
    out = []
    for f in case.fwds:
        c1 = torch.tensor([s + n for _, s, n in f["fwd"] for _ in range(n)])
        rr = torch.where(f["p"] >= c1 - case.R, f["slot"], len(SLOTS)) * case.R + f["p"] % case.R
        decode = all(n == 1 for _, _, n in f["fwd"])
        kw = dict(ring_rows=rr, pool=pool) if in_place and decode else {}
        rows, ent, dst = fn(f["kvz"], case.comp.ape, ring, case.comp.norm.weight, f["et"], f["p"], f["cs"],
                            f["slot"], f["bt"], case.cos, case.sin, case.m, case.R, case.overlap, EPS,
                            case.dest_base, case.dummy_block, case.epb, **kw)
        if ent is not None:
            pool.index_copy_(0, dst, ent)
        if rows is not None:
            ring.index_copy_(0, rr, rows)
        assert (rows is None) == (ent is None) == bool(kw)
        out.append((ring.clone(), pool.clone()))
    return out


def drive_fp8(case: Case, in_place: bool) -> list[tuple[torch.Tensor, ...]]:
    """drive_pool over an fp8 pool (index keys for the index kind, fp8_ds_mla rows else): in_place decode forwards
    pass its parts (the kernel quantizes the entries into it), every other forward stores the entries after the call
    through fp8.store_key_rows / store_kv_rows' torch ops -> the pool's parts after each forward."""
    from ds4f.kernels.fp8 import FP8, kv_exp_bytes, store_key_rows, store_kv_rows
    from ds4f.runner.gpu import glue

    cd2 = case.comp.state_width
    hd = case.comp.norm.weight.shape[0]
    n = case.dest_base + (case.dummy_block + 1) * case.epb
    ring = torch.zeros((len(SLOTS) + 1) * case.R, cd2)
    dr = ARGS.qk_rope_head_dim
    parts: tuple[torch.Tensor, ...] = (
        (torch.zeros(n, hd, dtype=FP8), torch.ones(n)) if hd == ARGS.index_head_dim else
        (torch.zeros(n, hd - dr, dtype=FP8), torch.full((n, kv_exp_bytes(hd - dr)), 127, dtype=torch.uint8),
         torch.zeros(n, dr, dtype=torch.bfloat16)))
    out = []
    for f in case.fwds:
        c1 = torch.tensor([s + n for _, s, n in f["fwd"] for _ in range(n)])
        rr = torch.where(f["p"] >= c1 - case.R, f["slot"], len(SLOTS)) * case.R + f["p"] % case.R
        decode = all(n == 1 for _, _, n in f["fwd"])
        kw = dict(ring_rows=rr, fp8_pool=parts) if in_place and decode else {}
        rows, ent, dst = glue.compress(f["kvz"], case.comp.ape, ring, case.comp.norm.weight, f["et"], f["p"],
                                       f["cs"], f["slot"], f["bt"], case.cos, case.sin, case.m, case.R,
                                       case.overlap, EPS, case.dest_base, case.dummy_block, case.epb, **kw)
        if ent is not None:
            (store_key_rows if len(parts) == 2 else store_kv_rows)(*parts, dst, ent, fused=False)
        if rows is not None:
            ring.index_copy_(0, rr, rows)
        assert (rows is None) == (ent is None) == bool(kw)
        out.append(tuple(t.view(torch.uint8).clone() if t.dtype == FP8 else t.clone() for t in parts))
    return out


def test_compress_ref_matches_model_compressor() -> None:
    for kind in KINDS:
        case = make_case(kind, torch.bfloat16)
        comp, m = case.comp, case.m
        cache = DenseCache().bind([0, 1, 2])
        rope = Rope.compress(ARGS)
        got = drive(case, compress_ref)
        n_checked = 0
        for f, o in zip(case.fwds, got):
            assert torch.equal(o["rows"], comp.project(f["x"], f["p"]))
            assert o["ent"].dtype == torch.bfloat16 and o["dst"].dtype == torch.int64
            t0 = 0
            for s, start, n in f["fwd"]:
                want = comp.compress(comp.project(f["x"][t0: t0 + n], f["p"][t0: t0 + n]), start, 0, s, "attn",
                                     cache, rope, torch.bfloat16)
                t0 += n
                for j, w in enumerate(range(start // m, (start + n) // m)):  # each completed entry, at its pool row
                    row = case.dest_base + case.tables[s][w // case.epb] * case.epb + w % case.epb
                    hit = (o["dst"] == row).nonzero().flatten()
                    assert hit.numel() == 1, (kind, s, w)
                    assert torch.equal(o["ent"][hit[0]], want[j]), (kind, s, w)
                    n_checked += 1
            dummy = case.dest_base + case.dummy_block * case.epb
            assert int((o["dst"] != dummy).sum()) == sum((s + n) // m - s // m for _, s, n in f["fwd"])
        assert n_checked >= (3 if m == 16 else 20), (kind, n_checked)


# ---- the Triton kernel under the interpreter (a subprocess: TRITON_INTERPRET is read when kernels are defined) ----
def _interpret_checks() -> None:
    from ds4f.kernels import compress as ck
    from ds4f.runner.gpu import glue

    assert ck.triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
    # fp32 kvz: fp32 rounding apart (online vs two-pass softmax); bf16: the interpreter rounds fp32 -> bf16 by
    # truncation (hardware: to nearest), so entries may differ by a bf16 ulp
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2**-7)):
        for kind in KINDS:
            case = make_case(kind, dtype, seed=1)
            want = drive(case, compress_ref)
            fns = [glue.compress] + ([lambda *a: ck.compress_fused(*a, block_s=4)] if dtype == torch.float32 else [])
            for fn in fns:  # glue.compress dispatches to the kernel; block_s=4: several online-softmax steps
                got = drive(case, fn)
                for g, w in zip(got, want):
                    assert torch.equal(g["rows"], w["rows"]) and torch.equal(g["dst"], w["dst"])
                    assert g["ent"].dtype == w["ent"].dtype == dtype
                    valid = g["dst"] != case.dest_base + case.dummy_block * case.epb
                    assert (g["ent"][~valid] == 0).all()
                    a, b = g["ent"][valid].float(), w["ent"][valid].float()
                    err = ((a - b).abs() / (b.abs() + 1)).max().item() if valid.any() else 0.0
                    assert err <= tol, (kind, dtype, err)
            # decode forwards storing rows / entries inside the kernel: the same ring and pool as storing after
            live_ring = slice(0, len(SLOTS) * case.R)
            live_pool = slice(0, case.dest_base + case.dummy_block * case.epb)
            for (r0, p0), (r1, p1) in zip(drive_pool(case, glue.compress, False, dtype),
                                          drive_pool(case, glue.compress, True, dtype)):
                assert torch.equal(r0[live_ring], r1[live_ring]), (kind, dtype)
                assert torch.equal(p0[live_pool], p1[live_pool]), (kind, dtype)
            if dtype == torch.bfloat16:  # entries quantized into an fp8 pool inside the kernel: the store's bits
                for a, b in zip(drive_fp8(case, False), drive_fp8(case, True)):
                    for x, y in zip(a, b):
                        assert torch.equal(x, y), kind
    print("interpret ok")


def test_compress_kernel_interpreted() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", DS4F_COMPRESS_KERNEL="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0 and "interpret ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


if __name__ == "__main__":
    torch.set_num_threads(1)
    _interpret_checks()
