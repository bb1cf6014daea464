"""The decode GEMV (ds4f/kernels/gemv.py) on CPU: the Triton kernel under TRITON_INTERPRET=1 on tiny shapes (ragged
N / K tails, T = 1, 3, 16, K splits with the last-arriving reduction, the grouped wo_a form) against fp32 torch
math, the references against plain torch, and the CPU fallbacks of linear / grouped_linear."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import arrival, gemv


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check_gemv_interpreted() -> None:
    """Run in a TRITON_INTERPRET=1 subprocess (tests/interp.py): every case against fp32 math, bf16-rounding close."""
    g = torch.Generator().manual_seed(0)
    cases = [  # T, N, K, cfg (BLOCK_N, BLOCK_K, SPLIT, num_warps, num_stages)
        (1, 48, 64, (16, 32, 1, 4, 2)),
        (3, 37, 100, (16, 32, 1, 4, 2)),  # ragged N and K
        (16, 40, 96, (32, 32, 3, 4, 2)),  # K split 3, ragged N
        (3, 33, 70, (16, 32, 2, 4, 2)),  # K split with a ragged last slice
        (1, 16, 160, (16, 32, 8, 4, 2)),  # split 8 of 5 chunks -> 5 slices
    ]
    for t, n, k, cfg in cases:
        x = torch.randn(t, k, generator=g).bfloat16()
        w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
        out = torch.full((t, n), float("nan"), dtype=torch.bfloat16)
        for rep in range(2):  # the second call checks that the split counters were left at zero
            gemv.launch(x, w, out, cfg)
            want = x.float() @ w.float().t()
            err = _rel(out.float(), want)
            assert err < 8e-3, (t, n, k, cfg, rep, err)
        if cfg[2] > 1:
            assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("gemv")), "tile counters not reset"
    # a strided x (rows of a wider buffer) and a strided w (a row block of a stacked matrix)
    xb = torch.randn(4, 200, generator=g).bfloat16()
    wb = (torch.randn(50, 100, generator=g) / 10).bfloat16()
    x, w = xb[:, 50:130], wb[5:45, 10:90]
    out = torch.empty(4, 40, dtype=torch.bfloat16)
    gemv.launch(x, w, out, (16, 32, 2, 4, 2))
    assert _rel(out.float(), x.float() @ w.float().t()) < 8e-3
    # grouped wo_a: G=3 groups of r=32 rows over Kg=48 columns each, T = 1 and 5
    for t, cfg in ((1, (16, 32, 1, 4, 2)), (5, (32, 16, 2, 4, 2))):
        o = torch.randn(t, 3 * 48, generator=g).bfloat16()
        wa = (torch.randn(3, 32, 48, generator=g) / 7).bfloat16()
        out = torch.empty(t, 3 * 32, dtype=torch.bfloat16)
        gemv.launch(o, wa.view(3 * 32, 48), out, cfg, gn=32, s_xg=48)
        want = torch.einsum("tgk,grk->tgr", o.view(t, 3, 48).float(), wa.float()).reshape(t, -1)
        assert _rel(out.float(), want) < 8e-3, (t, cfg)
    # norm=(g, eps): the rows RMSNorm'd inside the kernel (the model's q_norm before wq_b), a strided x, a K split
    # with a ragged tail; against the reference norm (bf16-rounded rows) then fp32 math
    xb = (3 * torch.randn(3, 150, generator=g)).bfloat16()
    x = xb[:, 10:110]
    gw = (1 + torch.randn(100, generator=g) / 4).bfloat16()
    w = (torch.randn(40, 100, generator=g) / 10).bfloat16()
    for cfg in ((16, 32, 1, 4, 2), (16, 32, 2, 4, 2)):
        out = torch.empty(3, 40, dtype=torch.bfloat16)
        gemv.launch(x, w, out, cfg, norm=(gw, 1e-6))
        want = gemv.rms_norm_ref(x, gw, 1e-6).float() @ w.float().t()
        assert _rel(out.float(), want) < 8e-3, cfg
    print("GEMV_OK")


def test_gemv_interpreted() -> None:
    pytest.importorskip("triton")
    from interp import run_interpreted

    assert "GEMV_OK" in run_interpreted("test_gemv", "check_gemv_interpreted")


def test_refs_and_cpu_fallbacks_match_torch() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=g).bfloat16()
    w = torch.randn(40, 64, generator=g).bfloat16()
    want = torch.nn.functional.linear(x.float(), w.float())
    assert _rel(gemv.linear_ref(x, w).float(), want) < 8e-3
    assert torch.equal(gemv.linear(x, w), torch.nn.functional.linear(x, w))  # CPU: F.linear itself
    o = torch.randn(3, 4, 32, generator=g).bfloat16()  # [T, H, hd] as glue.grouped_out gets it: G=2, Kg=64
    wa = torch.randn(2, 24, 64, generator=g).bfloat16()
    ref = gemv.grouped_ref(o, wa).float()
    manual = torch.cat([o.reshape(3, 2, 64)[:, i].float() @ wa[i].float().t() for i in range(2)], dim=1)
    assert _rel(ref, manual) < 8e-3
    assert _rel(gemv.grouped_linear(o, wa).float(), manual) < 8e-3
    # linear_norm's CPU fallback and rms_norm_ref = the model's RMSNorm module
    from ds4f.model.layers import RMSNorm

    norm = RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64, generator=g) / 4)
    assert torch.equal(gemv.rms_norm_ref(x, norm.weight, 1e-6), norm(x))
    assert torch.equal(gemv.linear_norm(x, norm.weight, 1e-6, w), torch.nn.functional.linear(norm(x), w))


def test_pick_table_env_and_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    (n, k, g), cfg = gemv.CONFIGS["WO_B"]
    assert gemv.pick(n, k, g, cpu) == cfg
    assert gemv.pick(*gemv.CONFIGS["HEAD"][0], cpu) is None
    gemv._env_config.cache_clear()
    monkeypatch.setenv("DS4F_GEMV_WO_B", "64,128,4,8,3")
    assert gemv.pick(n, k, g, cpu) == (64, 128, 4, 8, 3)
    gemv._env_config.cache_clear()
    monkeypatch.setenv("DS4F_GEMV_WO_B", "0")
    assert gemv.pick(n, k, g, cpu) is None
    gemv._env_config.cache_clear()
    monkeypatch.setenv("DS4F_GEMV_WO_B", "1,2")
    with pytest.raises(ValueError, match="DS4F_GEMV_WO_B"):
        gemv.pick(n, k, g, cpu)
    gemv._env_config.cache_clear()
    for n, k in ((1000, 700), (50000, 4096), (24, 16)):
        bn, bk, split, nw, ns = gemv.generic_config(n, k, 132)
        tiles = -(-n // bn)
        assert bk >= 16 and split <= -(-k // bk) and (tiles * split >= 132 or split == min(8, -(-k // bk)))
    # shared memory cap: a 99 KB device gets fewer stages, never fewer than 2
    assert gemv._fit((64, 256, 1, 4, 5), 99 * 1024, 2)[4] == 2
    assert gemv._fit((32, 128, 1, 4, 4), 99 * 1024, 2) == (32, 128, 1, 4, 4)



@pytest.mark.parametrize("arch", [80, 90, 121])
def test_gemv_builds_for_sm80_sm90(arch: int) -> None:
    """The table's configs (and a split one) compile offline (MLIR passes + ptxas) with the 16-divisible pointers
    and strides a real launch specializes on: the weight loads are cp.async-pipelined, the shared memory is what
    gemv._fit budgets, a split tile counts with one acq_rel atomic."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = gemv._gemv
    types = dict(x_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32", g_ptr="*fp32",
                 eps="fp32")
    div16 = [*types, "K", "s_xt", "s_wn", "s_ot", "k_per", "N", "s_xg", "GN"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    cfgs = {(c, False) for _, c in gemv.CONFIGS.values() if c is not None} | {((64, 128, 2, 8, 3), False)}
    cfgs |= {(gemv.generic_config(*gemv.CONFIGS["WQ_B"][0][:2], 132), True)}  # linear_norm's wq_b
    from test_kernels_build import SMEM

    smem = SMEM[arch]
    fitted = {(gemv._fit(c, smem, 2, arch >= 90), norm) for c, norm in cfgs}  # the launch's stage fit there
    for (bn, bk, split, nw, ns), norm in sorted(fitted):
        consts = dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=gemv.BLOCK_T, SPLIT_K=split > 1, EVEN_K=True, PDL=arch >= 90,
                      NORM=norm)
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        try:
            k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=nw, num_stages=ns))
        except RuntimeError as ex:  # no ptxas on this machine
            if "ptxas" in str(ex).lower() and "not found" in str(ex).lower():
                pytest.skip(str(ex))
            raise
        ptx = k.asm["ptx"]
        assert "cp.async" in ptx, (bn, bk, split, nw, ns)
        assert k.metadata.shared <= min((ns + (arch >= 90)) * (bn + gemv.BLOCK_T) * bk * 2 + 8192, smem)
        assert ptx.count("atom.global.gpu.acq_rel.add") == (split > 1)
        # sm_90: the first W tile is loaded before griddepcontrol.wait (ds4f.kernels.pdl), on sm_80 no PDL
        assert ("griddepcontrol.wait" in ptx) == (arch >= 90)
        if arch >= 90:
            assert ptx.index("ld.global") < ptx.index("griddepcontrol.wait") < ptx.index("griddepcontrol.launch")
