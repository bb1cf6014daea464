"""⑦ the push one-shot all-reduce (ds4f/kernels/push_allreduce.py) without a GPU: it compiles for sm_80 and sm_90 (W =
2 and 4) with 16-byte peer stores, a system-scope release flag, a system-scope acquire spin, the %globaltimer bound
and the trap; under TRITON_INTERPRET=1, W ranks as forked processes over one shared mapping (the "NVLink") run a
sequence of calls of changing sizes with random skew and equal push_all_reduce_ref bit for bit on every rank, the
per-program epochs count each program's calls; a rank whose peer never comes records the epoch and returns (the
GPU traps). The 2-GPU test: tests/gpu/test_symm_allreduce.py."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels.push_allreduce import push_all_reduce_ref


def test_ref_two_ranks_is_one_bf16_add() -> None:
    # two ranks: the rank-order fp32 sum rounded once is the bf16 sum (NCCL's for two ranks), in either order
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(4096, generator=g) * torch.logspace(-6, 6, 4096)).bfloat16()
    b = (torch.randn(4096, generator=g) * torch.logspace(6, -6, 4096)).bfloat16()
    assert torch.equal(push_all_reduce_ref([a, b]), a + b)
    assert torch.equal(push_all_reduce_ref([b, a]), a + b)


def _build(world: int, arch: int, block: int, warps: int, add: bool = False) -> str:
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from ds4f.kernels import push_allreduce as pa

    fn = pa._push_ar
    types = dict(x_ptr="*fp32" if add else "*bf16", out_ptr="*bf16", addr_ptr="*i64", epoch_ptr="*i32",
                 err_ptr="*i32", n="i32", rank="i32", timeout="i64", extra_ptr="*bf16")
    cap = 262144
    consts = dict(W=world, CAP=cap, MAXB=cap // block, BLOCK=block, TIMER=True, TRAP=True, SW_ROUND=False, ADD=add)
    if not add:
        consts["extra_ptr"] = None
    sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("x_ptr", "out_ptr", "addr_ptr", "n")}
    try:
        k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                    options=dict(num_warps=warps))
    except RuntimeError as ex:  # no ptxas / backend on this machine
        if "ptxas" in str(ex).lower() and "not found" in str(ex).lower():
            pytest.skip(str(ex))
        raise
    return k.asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90, 121])
@pytest.mark.parametrize(("world", "block", "warps"), [(2, 2048, 4), (2, 1024, 4), (4, 4096, 8)])
def test_push_kernel_builds(arch: int, world: int, block: int, warps: int) -> None:
    ptx = _build(world, arch, block, warps)
    assert "st.global.v4.b32" in ptx  # the NVLink pushes: 16-byte stores through the int64 address table
    assert "ld.global.cg.v4.b32" in ptx  # the received slots: L2 reads, vectorized
    assert ptx.count("atom.global.sys.release.exch.b32") == world - 1  # one flag per peer
    assert "sys.acquire" in ptx  # the spin (ld.acquire or atom.acquire at system scope)
    assert "%globaltimer" in ptx and "trap;" in ptx
    assert ptx.count("bar.sync") >= 2  # the pushes before the flag, the wait before the reads


@pytest.mark.parametrize("arch", [90, 121])
def test_push_kernel_builds_with_the_added_term(arch: int) -> None:
    """ADD: x read as fp32 with the bf16 term beside it, rounded to bf16 before the pushes; pushes and flags as in the
    plain form."""
    ptx, plain = _build(2, arch, 1024, 4, add=True), _build(2, arch, 1024, 4)
    assert "st.global.v4.b32" in ptx and ptx.count("atom.global.sys.release.exch.b32") == 1
    # the term's loads and its rounding on top of the plain form's
    assert ptx.count("ld.global") > plain.count("ld.global")
    assert ptx.count("cvt.rn.bf16") > plain.count("cvt.rn.bf16")


def check_ranks() -> None:
    """Fork W ranks (2, then 3) over one shared anonymous mapping; each runs the same call sequence and checks its
    output against the oracle (every other call the ADD form: fp32 x plus a bf16 term, one rounding, interleaved
    with plain calls on the same programs' epochs); then a lone rank times out."""
    import mmap
    import random
    import time

    from forked import run_ranks

    from ds4f.kernels import push_allreduce as pa

    cap, block = 512, 64
    sizes = [64, 200, 512, 1, 130, 512, 64, 448, 3]
    for world in (2, 3):
        def body(rank: int, addrs: list[int], world: int = world) -> None:
            ar = pa.PushAllReduce(addrs, rank, world, cap, torch.device("cpu"), block=block, warps=1,
                                  spin_iters=1 << 22)
            rng = random.Random(rank)
            counts = torch.zeros(cap // block, dtype=torch.int32)
            for i, n in enumerate(sizes):
                x32 = [torch.randn(n, generator=torch.Generator().manual_seed(1000 * i + q)) * (q + 1)
                       for q in range(world)]
                ex = [torch.randn(n, generator=torch.Generator().manual_seed(7 + 1000 * i + q)).bfloat16()
                      for q in range(world)]
                time.sleep(rng.random() * 0.05)  # skew: the ranks enter each call at different times
                if i % 2:  # ADD: fp32 x plus a bf16 term, rounded once, then summed over the ranks
                    got = ar(x32[rank].clone(), ex[rank].clone())
                    want = pa.push_all_reduce_ref([(a + b.float()).bfloat16() for a, b in zip(x32, ex)])
                else:
                    got = ar(x32[rank].bfloat16())
                    want = pa.push_all_reduce_ref([a.bfloat16() for a in x32])
                assert got.dtype == torch.bfloat16 and torch.equal(got, want), (world, rank, i, n)
                counts[: (n + block - 1) // block] += 1
            assert torch.equal(ar.epoch, counts), (ar.epoch, counts)  # each program counts its own calls
            assert ar.error() == 0

        run_ranks(world, pa.region_numel(world, cap, block), body)
        print(f"world {world}: {len(sizes)} calls equal the reference on every rank")
    # a lone rank: its peer never flags; the bounded spin records the epoch and gives up
    numel = pa.region_numel(2, cap, block)
    mm = mmap.mmap(-1, 2 * numel * 2)
    whole = torch.frombuffer(mm, dtype=torch.bfloat16)
    ar = pa.PushAllReduce([whole.data_ptr(), whole[numel:].data_ptr()], 0, 2, cap, torch.device("cpu"), block=block,
                          warps=1, spin_iters=20)
    ar(torch.ones(64, dtype=torch.bfloat16))
    assert ar.error() == 1
    print("lone rank: error epoch 1")


def test_push_ranks_interpreted() -> None:
    pytest.importorskip("triton")
    from interp import run_interpreted

    out = run_interpreted("test_push_allreduce_build", "check_ranks", timeout=600)
    assert "world 3:" in out and "lone rank" in out, out
