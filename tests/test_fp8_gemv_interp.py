"""⑥ kernels, the swap-AB FP8 decode GEMV (ds4f/kernels/fp8_gemv.py) under TRITON_INTERPRET=1 at tiny shapes against
fp8_gemm.fp8_linear_ref: fp32 and UE8M0 scales, e4m3 native and through fp16 bit patterns, T = 1 / 3 / 16, K split
on and off (the last-arriving reduce re-arms its counters), N and K off the tile grid, the grouped wo_a form, and
fp8_gemm's dispatch to it; plus the config rules on CPU."""

from __future__ import annotations

import pytest
import torch
from interp import run_interpreted

TOL = 1e-5  # fp32 outputs: summation order only


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def check_gemv() -> None:
    from ds4f.kernels import arrival, fp8_gemv
    from ds4f.kernels.fp8_gemm import Opts, _scale_arg, fp8_grouped_linear, fp8_linear, fp8_linear_ref
    from ds4f.model.quant import quant_fp8_block

    g = torch.Generator().manual_seed(0)

    def weights(n: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(n, k, generator=g) * 0.05 * torch.logspace(-2, 2, n)[:, None]  # scales differ per block
        return quant_fp8_block(w, fmt)

    def run(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, groups: int, native: bool, cfg: tuple) -> torch.Tensor:
        ws, e8m0 = _scale_arg(s)
        out = torch.empty(x.shape[0], groups, q.shape[0] // groups, dtype=torch.float32)
        fp8_gemv.launch(x, q if native else q.view(torch.uint8), ws, e8m0, out, groups, native, cfg)
        return out

    # (T, N, K, scale fmt, native, (BLOCK_N, BLOCK_K, SPLIT, warps, stages)); N % BLOCK_N != 0 in most
    cases = [
        (1, 160, 256, "ue8m0", True, (32, 128, 1, 4, 2)),
        (3, 200, 384, "float32", True, (64, 128, 3, 4, 2)),
        (16, 96, 300, "ue8m0", False, (32, 128, 2, 4, 2)),
        (3, 130, 512, "float32", False, (16, 256, 2, 4, 2)),
        (1, 72, 200, "float32", True, (128, 256, 1, 4, 2)),
        (4, 64, 640, "ue8m0", True, (32, 128, 2, 4, 2)),  # K whole, the last split one BLOCK_K step short
    ]
    for t, n, k, fmt, native, cfg in cases:
        q, s = weights(n, k, fmt)
        x = (torch.randn(t, k, generator=g) * 3).bfloat16()
        ref = fp8_linear_ref(x, q, s, torch.float32)
        for _ in range(2):  # the second call finds the split counters re-armed
            got = run(x.view(t, 1, k), q, s, 1, native, cfg)[:, 0]
            assert _rel(got, ref) < TOL, (t, n, k, fmt, native, cfg, _rel(got, ref))
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv"))

    # norm=(g, eps): RMSNorm'd rows (the decode q_norm) inside the GEMV, a strided x, N and K off the grid, a config
    # with a K split (run whole: the rows' squares stay in one program); against the reference norm's bf16 rows
    from ds4f.kernels.gemv import rms_norm_ref

    for t, n, k, fmt, native, cfg in [(1, 160, 256, "ue8m0", True, (32, 128, 1, 4, 2)),
                                       (3, 200, 300, "float32", False, (64, 128, 2, 4, 2))]:
        q, s = weights(n, k, fmt)
        xs = (torch.randn(t, k + 40, generator=g) * 3).bfloat16()[:, 20: 20 + k]
        gw = 1 + torch.randn(k, generator=g) / 4
        ws, e8m0 = _scale_arg(s)
        out = torch.empty(t, 1, n, dtype=torch.float32)
        fp8_gemv.launch(xs.view(t, 1, k), q if native else q.view(torch.uint8), ws, e8m0, out, 1, native, cfg,
                        norm=(gw, 1e-6))
        want = fp8_linear_ref(rms_norm_ref(xs, gw, 1e-6), q, s, torch.float32)
        assert _rel(out[:, 0], want) < 8e-3, (t, n, k, fmt, native, cfg, _rel(out[:, 0], want))

    # grouped: x [T, G, K], W [G*N, K]; group g's rows read x[:, g] (a strided x view, as wo_a's caller passes)
    for t, fmt, native, cfg in [(3, "ue8m0", True, (32, 128, 2, 4, 2)), (16, "float32", False, (64, 256, 1, 4, 2))]:
        q, s = weights(3 * 128, 256, fmt)
        xs = (torch.randn(t, 3, 2 * 256, generator=g)).bfloat16()[:, :, 128:384]
        want = torch.stack([fp8_linear_ref(xs[:, i], q[128 * i:128 * (i + 1)], s[i:i + 1], torch.float32)
                            for i in range(3)], 1)
        got = run(xs, q, s, 3, native, cfg)
        assert _rel(got, want) < TOL, ("grouped", t, fmt, native, cfg, _rel(got, want))

    # every e4m3 byte widened exactly (both widenings): W[r, c] = byte (r + c) % 256, token t one-hot at column c_t
    b = ((torch.arange(256)[:, None] + torch.arange(256)[None, :]) % 256).to(torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0  # NaN
    qb = b.view(torch.float8_e4m3fn)
    cols = (torch.arange(16) * 37) % 256
    x = torch.zeros(16, 1, 256).bfloat16()
    x[torch.arange(16), 0, cols] = 1.0
    for native in (True, False):
        got = run(x, qb, torch.full((2, 2), 127, dtype=torch.uint8), 1, native, (32, 128, 2, 4, 2))
        assert torch.equal(got[:, 0], qb.float()[:, cols].t()), native

    # through fp8_gemm: Opts(gemv=True) forces the GEMV off CUDA (table config or the generic rule, split override)
    q, s = weights(256, 512, "ue8m0")
    x = torch.randn(4, 512, generator=g).bfloat16()
    for split in (None, 2):
        got = fp8_linear(x, q, s, torch.float32, Opts("w8", split=split, gemv=True))
        assert _rel(got, fp8_linear_ref(x, q, s, torch.float32)) < TOL, split
    xg = torch.randn(2, 2, 512, generator=g).bfloat16()
    got = fp8_grouped_linear(xg, q, s, torch.float32, Opts("w8", gemv=True))
    want = torch.stack([fp8_linear_ref(xg[:, i], q[128 * i:128 * (i + 1)], s[i:i + 1], torch.float32)
                        for i in range(2)], 1)
    assert _rel(got, want) < TOL
    print("ok")


def check_gemv_a8() -> None:
    """a8=True: x quantized per token per 128 columns (pow2 scales) and the e4m3 x e4m3 dot, against
    fp8_linear_a8_ref (the same quantization: equal up to fp32 summation order); the one-block quantization grid by
    a one-hot x; with norm, (g * x) quantized and 1 / rms applied after the dot."""
    from ds4f.kernels import arrival, fp8_gemv
    from ds4f.kernels.fp8_gemm import _scale_arg, fp8_linear_a8_ref, quant_act_ref
    from ds4f.model.quant import quant_fp8_block

    g = torch.Generator().manual_seed(1)

    def weights(n: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(n, k, generator=g) * 0.05 * torch.logspace(-2, 2, n)[:, None]
        return quant_fp8_block(w, fmt)

    def run(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, groups: int, cfg: tuple, **kw: object) -> torch.Tensor:
        ws, e8m0 = _scale_arg(s)
        out = torch.empty(x.shape[0], groups, q.shape[0] // groups, dtype=torch.float32)
        fp8_gemv.launch(x, q, ws, e8m0, out, groups, True, cfg, a8=True, **kw)
        return out

    for t, n, k, fmt, cfg in [(1, 160, 256, "ue8m0", (32, 128, 1, 4, 2)), (3, 200, 384, "float32", (64, 128, 3, 4, 2)),
                              (16, 96, 300, "ue8m0", (32, 128, 2, 4, 2)), (4, 64, 640, "ue8m0", (32, 256, 2, 4, 2))]:
        q, s = weights(n, k, fmt)
        # column blocks of very different magnitude: each 128-column block has its own scale
        x = (torch.randn(t, k, generator=g) * torch.logspace(-3, 3, k)[None, :]).bfloat16()
        want = fp8_linear_a8_ref(x, q, s, torch.float32)
        for _ in range(2):
            got = run(x.view(t, 1, k), q, s, 1, cfg)[:, 0]
            assert _rel(got, want) < TOL, (t, n, k, fmt, cfg, _rel(got, want))
    assert all(int(b.abs().sum()) == 0 for b in arrival.buffers("fp8_gemv"))

    # the quantization itself: W = identity blocks, so out = x's dequantized e4m3 rows (quant_act_ref's, exactly)
    eye = torch.eye(128).repeat(2, 2)[:128].to(torch.float8_e4m3fn)  # [128, 256]: out[c] = x[c] + x[c + 128]
    x = (torch.randn(5, 256, generator=g) * 40).bfloat16()
    x[:, 128:] = 0
    qx, sx = quant_act_ref(x)
    got = run(x.view(5, 1, 256), eye, torch.ones(1, 2), 1, (32, 128, 1, 4, 2))[:, 0]
    assert torch.equal(got, qx.float()[:, :128] * sx[:, :1]), "a8 quantization grid"

    # norm: r * ((g * x) quantized @ W^T), r = 1 / rms of x's rows
    q, s = weights(160, 256, "ue8m0")
    xs = (torch.randn(3, 256, generator=g) * 3).bfloat16()
    gw = 1 + torch.randn(256, generator=g) / 4
    got = run(xs.view(3, 1, 256), q, s, 1, (32, 128, 1, 4, 2), norm=(gw, 1e-6))[:, 0]
    xf = xs.float()
    r = torch.rsqrt(xf.pow(2).mean(1) + 1e-6)
    want = fp8_linear_a8_ref(xf * gw, q, s, torch.float32) * r[:, None]
    assert _rel(got, want) < 1e-4, _rel(got, want)
    print("ok")


def check_linear_act() -> None:
    """linear_act: the SwiGLU of h = [gate | up] inside the GEMV's x loads, against the GEMV on glue.swiglu_act(h)
    (the activation rounded to bf16 first), in the a8 and the widening form, T = 1 / 3 / 16, a K split, clamped
    gates and ups."""
    from ds4f.kernels import fp8_gemv
    from ds4f.kernels.fp8_gemm import _scale_arg
    from ds4f.model.quant import quant_fp8_block
    from ds4f.runner.gpu.glue import swiglu_act

    g = torch.Generator().manual_seed(3)
    for t, n, k, cfg, a8 in [(1, 256, 256, (32, 128, 1, 4, 2), True), (3, 128, 384, (64, 128, 3, 4, 2), True),
                             (16, 128, 256, (32, 128, 2, 4, 2), False)]:
        q, s = quant_fp8_block(torch.randn(n, k, generator=g) * 0.05, "ue8m0")
        ws, e8m0 = _scale_arg(s)
        h = (torch.randn(t, 2 * k, generator=g) * 6).bfloat16()  # |x| > 10 on some: the clamps act
        want = torch.empty(t, 1, n, dtype=torch.float32)
        fp8_gemv.launch(swiglu_act(h, 10.0)[:, None], q, ws, e8m0, want, 1, True, cfg, a8=a8)
        got = torch.empty(t, 1, n, dtype=torch.float32)
        fp8_gemv.launch(h[:, None, :k], q, ws, e8m0, got, 1, True, cfg, a8=a8, act=10.0)
        # the activation may round differently by one bf16 step where silu's fp32 forms differ in the last bit
        assert _rel(got, want) < 1e-3, (t, n, k, cfg, a8, _rel(got, want))
        assert (got == want).float().mean() > 0.9, (t, n, k, cfg, a8)
    print("ok")


def test_linear_act_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_fp8_gemv_interp", "check_linear_act").strip().endswith("ok")


def test_fp8_gemv_a8_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_fp8_gemv_interp", "check_gemv_a8").strip().endswith("ok")


def test_fp8_gemv_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    assert run_interpreted("test_fp8_gemv_interp", "check_gemv").strip().endswith("ok")


def test_config_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from ds4f.kernels import fp8_gemv

    cpu = torch.device("cpu")
    for name, ((nt, k, groups), cfg) in fp8_gemv.CONFIGS.items():
        a8 = fp8_gemv.CONFIGS_A8.get(name)
        for c in (cfg, a8):
            if c is not None:
                assert fp8_gemv.valid(c, nt, groups), (nt, k, groups, c)
        assert fp8_gemv.pick(nt, k, groups, cpu) == (a8 or cfg), name  # default "table"
        assert fp8_gemv.use_a8(nt, k, groups) == (a8 is not None), name
        monkeypatch.setattr(fp8_gemv, "A8", "0")  # the widening form everywhere, with CONFIGS' tiles
        assert fp8_gemv.pick(nt, k, groups, cpu) == cfg and not fp8_gemv.use_a8(nt, k, groups)
        monkeypatch.setattr(fp8_gemv, "A8", "1")
        assert fp8_gemv.use_a8(nt, k, groups)
        monkeypatch.setattr(fp8_gemv, "A8", "table")
    assert set(fp8_gemv.CONFIGS_A8) <= set(fp8_gemv.CONFIGS)  # every a8 entry names a shape of CONFIGS
    for nt, k, groups in [(1024, 4096, 1), (640, 384, 5), (100, 200, 1), (129280, 4096, 1)]:  # not in CONFIGS
        cfg = fp8_gemv.generic_config(nt, k, groups, 132)
        assert fp8_gemv.valid(cfg, nt, groups) and fp8_gemv.pick(nt, k, groups, cpu) == cfg
    name = next(iter(fp8_gemv.CONFIGS))
    (nt, k, groups), _ = fp8_gemv.CONFIGS[name]
    for val, want in (("0", None), ("64,128,2,8,5", (64, 128, 2, 8, 5))):
        fp8_gemv._env_config.cache_clear()
        monkeypatch.setenv(f"DS4F_FP8_GEMV_{name}", val)
        assert fp8_gemv.pick(nt, k, groups, cpu) == want
    fp8_gemv._env_config.cache_clear()
    monkeypatch.setenv(f"DS4F_FP8_GEMV_{name}", "64,128")
    with pytest.raises(ValueError, match=f"DS4F_FP8_GEMV_{name}"):
        fp8_gemv.pick(nt, k, groups, cpu)
    fp8_gemv._env_config.cache_clear()


def test_linear_act_launches_without_pdl(monkeypatch) -> None:
    """linear_act runs on the shared expert's side stream: a plain launch even where PDL is on (launched early its
    programs would hold SM slots beside the routed up kernel), while the other entries keep PDL."""
    pytest.importorskip("triton")
    from ds4f.kernels import fp8_gemv, pdl
    from ds4f.kernels.fp8_gemm import _scale_arg
    from ds4f.model.quant import quant_fp8_block

    seen: list[dict] = []

    class Grid:
        def __getitem__(self, grid: tuple) -> object:
            return lambda *a, **kw: seen.append(kw)

    monkeypatch.setattr(fp8_gemv, "_fp8_gemv", Grid())
    monkeypatch.setattr(pdl, "launch", lambda dev: {"PDL": True, "launch_pdl": True})
    q, s = quant_fp8_block(torch.randn(256, 128) * 0.05, "ue8m0")
    ws, e8m0 = _scale_arg(s)
    fp8_gemv.linear_act(torch.randn(1, 256).bfloat16(), 10.0, q, ws, e8m0, True)
    fp8_gemv.linear_norm(torch.randn(1, 128).bfloat16(), torch.ones(128), 1e-6, q, ws, e8m0, True)
    assert [(kw["PDL"], kw["launch_pdl"], kw["ACT"]) for kw in seen] == [(False, False, True), (True, True, False)]
