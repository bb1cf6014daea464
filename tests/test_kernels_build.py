"""The kernels changed since their last GPU run compile for sm_80 and sm_90 without a GPU (Triton's MLIR passes +
ptxas, as tests/test_moe_mxfp4.py does for the MXFP4 tiles): the sparse attention live bound and its combine, the
indexer's early exit, the radix top-k with valid lengths, the FP8 GEMV and the MoE pick sum. Numerics are the
interpreter tests' and the GPU tests' business; this catches what only the compiler sees (types, layouts,
shared memory). Also the fp8-query indexer (fp8 MMA, sm_90)."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytest.importorskip("triton")


# opt-in shared memory per block (bytes): A100, H100 / H200, and GB10 (DGX Spark, sm_121; sm_120 the same)
SMEM = {80: 166912, 90: 232448, 121: 101376}


def build(fn: Any, types: dict[str, str], consts: dict[str, Any], arch: int, nw: int = 4, ns: int = 2,
          div16: tuple[str, ...] = ()) -> dict:
    """div16: arguments the launch specializes as multiples of 16 (aligned pointers, sizes), as the runtime does.
    Every build must fit the arch's shared memory per block (SMEM): what a launch picks there must load."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    if "PDL" in fn.arg_names and "PDL" not in consts:  # as pdl.launch picks it: sm_90+ only
        consts = dict(consts, PDL=arch >= 90)
    # constexpr parameters not given take their defaults (as a launch that omits them does)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty},
              **consts}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    try:
        k = compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                    options=dict(num_warps=nw, num_stages=ns))
    except RuntimeError as ex:  # no ptxas / backend on this machine
        if "ptxas" in str(ex).lower() and "not found" in str(ex).lower():
            pytest.skip(str(ex))
        raise
    assert k.metadata.shared <= SMEM.get(arch, SMEM[90]), (fn, consts, k.metadata.shared, arch)
    return dict(shared=k.metadata.shared, ptx=k.asm["ptx"], cubin=k.asm.get("cubin"))


def registers(built: dict) -> int | None:
    """Registers per thread of a build's cubin (cuobjdump -res-usage from Triton's CUDA tools), None without it."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not built.get("cubin") or not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(built["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", out)
    return int(m.group(1)) if m else None


ARCHS = [80, 90, 121]  # Ampere, Hopper, and the DGX Spark's GB10 (99 KB of shared memory per block)


# (live, split, DYN, FUSE, SKIP, HALF): the decode policies' kernels (sparse_attn.DecodePolicy)
ATTN_MODES = [(False, False, False, 0, True, 0), (True, False, False, 0, False, 32), (False, True, False, 8, True, 32),
              (True, True, True, 0, False, 0), (True, True, True, 4, False, 32)]
# _attn_fwd's pointer / float argument types (the rest default to i32), and the arguments a launch from the pools
# specializes as multiples of 16 (aligned pointers, row strides): what decides whether its loads pipeline
ATTN_TYPES = dict(q_ptr="*bf16", kv_ptr="*u8", kvs_ptr="*u8", rope_ptr="*bf16", idx_ptr="*i32", sink_ptr="*fp32",
                  o_ptr="*bf16", po_ptr="*fp32", pm_ptr="*fp32", live_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
                  cnt_ptr="*i32", qk_scale="fp32", q_eps="fp32")
ATTN_DIV16 = ("q_ptr", "kv_ptr", "kvs_ptr", "rope_ptr", "idx_ptr", "po_ptr", "pm_ptr", "o_ptr", "s_qt", "s_qh", "s_kvn",
              "s_kvsn", "s_rn", "s_it", "s_ot", "s_oh")


def decode_consts(bh: int, bk: int, **kw: Any) -> dict[str, Any]:
    """_attn_fwd's constexprs as a decode call over one TP=2 rank's fp8 rows launches it (split keys, live bound,
    DYN splits, q normed in the prologue, inverse-RoPE epilogue), with kw on top."""
    return dict(D=512, BLOCK_D=512, BLOCK_H=bh, BLOCK_K=bk, NG=0, SPLIT=True, SCALE_BCAST=True, NOPE=448,
                NATIVE_FP8=True, LIVE=True, HALF=32, DYN=True, FUSE=0, SKIP=False, QNR=True) | kw


def test_decode_attn_tiles_fit_h200_as_launched() -> None:
    # the decode tiles sparse_attn picks for fp8 rows build within the H200's shared memory with the arguments
    # specialized as a launch from the pools specializes them (16-byte aligned pointers and row strides), so no
    # launch there fails and shrinks (a 64-key tile at 2 stages needs ~246 KB: the defaults say 1)
    import importlib

    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    for bh, bk, nw, ns in (sa.SHORT_KNOBS, sa.MID_KNOBS, sa.LONG_FP8_KNOBS):
        build(sa._attn_fwd, ATTN_TYPES, decode_consts(bh, bk), 90, nw, ns, div16=ATTN_DIV16)  # asserts the fit
    with pytest.raises(AssertionError):  # the same tile pipelined does not fit
        build(sa._attn_fwd, ATTN_TYPES, decode_consts(16, 64), 90, 8, 2, div16=ATTN_DIV16)


@pytest.mark.parametrize(("arch", "bk", "nw", "ns"), [(90, 64, 8, 2), (90, 128, 8, 2), (90, 32, 4, 3),
                                                      (121, 64, 8, 2), (80, 32, 4, 2)])
def test_sparse_attn_rope_split_pipelines(arch: int, bk: int, nw: int, ns: int) -> None:
    # DS4F_ATTN_ROPE_SPLIT: with the rope columns a [keys, 64] tile of their own, the 64-key decode tile builds
    # pipelined (cp.async stages) within the H200's and GB10's shared memory, where the masked full-width tile
    # needs ~246 KB (test_decode_attn_tiles_fit_h200_as_launched); as the decode calls launch it (with live, so no
    # SKIP branch around the loads; 16-byte aligned pointers and strides)
    import importlib

    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    for qnr in (False, True):
        k = build(sa._attn_fwd, ATTN_TYPES, decode_consts(16, bk, NATIVE_FP8=arch >= 89, QNR=qnr, RSPLIT=True), arch,
                  nw, ns, div16=ATTN_DIV16)
        assert "cp.async" in k["ptx"], (arch, bk, qnr)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ATTN_MODES)
def test_sparse_attn_builds(arch: int, mode: tuple[bool, bool, bool, int, bool, int]) -> None:
    import importlib

    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    live, split, dyn, fuse, skip, half = mode
    k = build(sa._attn_fwd, ATTN_TYPES, dict(D=512, BLOCK_D=512, BLOCK_H=16, BLOCK_K=32, NG=0, SPLIT=split,
                                        SCALE_BCAST=True, NOPE=448, NATIVE_FP8=arch >= 89, LIVE=live, HALF=half,
                                        DYN=dyn, FUSE=fuse, SKIP=skip, QNR=bool(half)),  # q_norm: with inv_rope
              arch, 4, 2)
    assert k["shared"] <= 160 * 1024
    if fuse:
        assert "atom" in k["ptx"]  # the arrival count
    if split and not fuse:
        build(sa._attn_combine, dict(po_ptr="*fp32", pm_ptr="*fp32", sink_ptr="*fp32", o_ptr="*bf16",
                                     live_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32"),
              dict(D=512, PD=512, BLOCK_DC=64, BLOCK_H=16, LIVE=live, UNROLL=4, HALF=half, DYN=dyn, BLOCK_K=32), arch)
        for unroll, bh in ((64, 2), (128, 1)):  # sparse_attn.combine_shape's one-round tiles
            build(sa._attn_combine, dict(po_ptr="*fp32", pm_ptr="*fp32", sink_ptr="*fp32", o_ptr="*bf16",
                                         live_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32"),
                  dict(D=512, PD=512, BLOCK_DC=64, BLOCK_H=bh, LIVE=live, UNROLL=unroll, HALF=half, DYN=dyn,
                       BLOCK_K=32), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("vlen", [False, True])
def test_indexer_and_topk_build(arch: int, vlen: bool) -> None:
    from ds4f.kernels import indexer as ix

    fp8 = arch >= 89
    for qfp8 in (False, True) if fp8 else (False,):  # e4m3 queries: the fp8 MMA (sm_89+)
        build(ix._indexer_fwd, dict(q_ptr="*fp8e4nv" if qfp8 else "*bf16", w_ptr="*fp32",
                                    k_ptr="*fp8e4nv" if fp8 else "*bf16", ks_ptr="*fp32", slots_ptr="*i32",
                                    seq_ptr="*i32", vlen_ptr="*i32", out_ptr="*fp32", scale="fp32"),
              dict(DI=128, BLOCK_HI=64, BLOCK_L=64, N_INNER=8, KSCALE=fp8, QFP8=qfp8, ZERO_RANK=True), arch, 4, 4)
        build(ix._indexer_fwd, dict(q_ptr="*fp8e4nv" if qfp8 else "*bf16", w_ptr="*fp32",  # DS4F_INDEXER_HIST
                                    k_ptr="*fp8e4nv" if fp8 else "*bf16", ks_ptr="*fp32", slots_ptr="*i32",
                                    seq_ptr="*i32", vlen_ptr="*i32", out_ptr="*fp32", hist_ptr="*i32",
                                    scale="fp32"),
              dict(DI=128, BLOCK_HI=64, BLOCK_L=128, N_INNER=4, KSCALE=fp8, QFP8=qfp8, ZERO_RANK=True,
                   HIST=True), arch, 4, 3)
    t = dict(s_ptr="*fp32", vlen_ptr="*i32", hist_ptr="*i32", cnt_ptr="*i32", out_ptr="*i32")
    for level in range(4):
        build(ix._topk_hist, t, dict(LEVEL=level, NB=256, BLOCK=1024, VLEN=vlen), arch)
    build(ix._topk_select, t, dict(NB=256, BLOCK=1024, VLEN=vlen), arch)
    from ds4f.kernels import topk_radix as tr

    k = build(tr._topk_gather, dict(t, cand_ptr="*i32"), dict(NB=256, BLOCK=2048, VLEN=vlen), arch)
    assert "atom.global.gpu.acq_rel" not in k["ptx"] and "red." in k["ptx"]  # relaxed: the launches order the passes
    build(tr._topk_final, dict(t, cand_ptr="*i32"), dict(NB=256, NC=512, BLOCK=2048, VLEN=vlen), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", [(32, 256, 3, 4, 4), (64, 256, 1, 4, 5), (128, 128, 2, 8, 4)])
def test_fp8_gemv_builds(arch: int, cfg: tuple[int, int, int, int, int]) -> None:
    # the swap-AB FP8 decode GEMV at the V4 shapes' specializations: the e4m3 tiles stream through cp.async (the
    # software pipeline), fitting sm_80's shared memory after fp8_gemv.fit
    from ds4f.kernels import fp8_gemv as fg

    native = arch >= 89
    bn, bk, split, nw, ns = fg.fit(cfg, SMEM[arch])
    div = ("x_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "NT", "K", "GN", "s_xt", "s_xg", "s_ot",
           "k_per")
    # (UE8M0 scales, K a multiple of BLOCK_K, bf16 out, e4m3 widened by the integer-op PTX) and the other choices
    # (+ the q_norm form: NORM, no K split)
    for e8m0, even, out, bits, norm in ((True, True, "*bf16", True, False), (False, False, "*fp32", False, False),
                                        (False, True, "*bf16", False, False), (True, True, "*bf16", True, True)):
        k = build(fg._fp8_gemv, dict(x_ptr="*bf16", w_ptr="*fp8e4nv" if native else "*u8",
                                     ws_ptr="*u8" if e8m0 else "*fp32", out_ptr=out, part_ptr="*fp32",
                                     lock_ptr="*i32", g_ptr="*fp32", eps="fp32"),
                  dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=fg.BLOCK_T, SPLIT_K=split > 1 and not norm, EVEN_K=even,
                       NATIVE=native, SCALE_E8M0=e8m0, DOT_F32=False, ITERS=0, BITS=bits, NORM=norm), arch, nw, ns,
                  div16=div if even else ())
        if even:
            assert "cp.async" in k["ptx"] and "mma" in k["ptx"]
        assert ("fma.rn.bf16x2" in k["ptx"]) == bits


@pytest.mark.parametrize("cfg", [(32, 128, 6, 4, 6), (64, 128, 1, 4, 4), (128, 256, 1, 4, 4)])
def test_fp8_gemv_a8_builds(cfg: tuple[int, int, int, int, int]) -> None:
    # a8 (sm_90): x quantized in the program, the e4m3 x e4m3 MMA on the weight tile as loaded (no widening)
    from ds4f.kernels import fp8_gemv as fg

    bn, bk, split, nw, ns = fg.fit(cfg, SMEM[90])
    div = ("x_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "NT", "K", "GN", "s_xt", "s_xg", "s_ot",
           "k_per")
    for norm in (False, True):
        k = build(fg._fp8_gemv, dict(x_ptr="*bf16", w_ptr="*fp8e4nv", ws_ptr="*u8", out_ptr="*bf16",
                                     part_ptr="*fp32", lock_ptr="*i32", g_ptr="*bf16", eps="fp32"),
                  dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=fg.BLOCK_T, SPLIT_K=split > 1 and not norm, EVEN_K=True,
                       NATIVE=True, SCALE_E8M0=True, DOT_F32=False, ITERS=0, BITS=False, NORM=norm, A8=True), 90,
                  nw, ns, div16=div)
        assert k["shared"] <= 227 * 1024
        assert "e4m3" in k["ptx"] and "cp.async" in k["ptx"] and "fma.rn.bf16x2" not in k["ptx"]


@pytest.mark.parametrize("arch", [90, 121])
def test_fp8_gemv_act_builds(arch: int) -> None:
    # ACT (the shared expert's SwiGLU inside its w2 GEMV): the gate and up halves both stream through cp.async, the
    # a8 MMA as without it, within GB10's shared memory after fit
    from ds4f.kernels import fp8_gemv as fg

    bn, bk, split, nw, ns = fg.fit(fg.CONFIGS_A8["W2_TP2"], SMEM[arch])
    div = ("x_ptr", "w_ptr", "ws_ptr", "out_ptr", "part_ptr", "lock_ptr", "NT", "K", "GN", "s_xt", "s_xg", "s_ot",
           "k_per", "up_off")
    types = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", ws_ptr="*u8", out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32",
                 g_ptr="*bf16", eps="fp32", limit="fp32")
    ks = [build(fg._fp8_gemv, types, dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_T=fg.BLOCK_T, SPLIT_K=split > 1, EVEN_K=True,
                                          NATIVE=True, SCALE_E8M0=True, DOT_F32=False, ITERS=0, BITS=False,
                                          A8=True, ACT=act), arch, nw, ns, div16=div) for act in (False, True)]
    assert ks[1]["ptx"].count("cp.async.cg") > ks[0]["ptx"].count("cp.async.cg")  # the up half joins the pipeline
    assert "ex2.approx" in ks[1]["ptx"] and "e4m3" in ks[1]["ptx"]


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_sum_builds(arch: int) -> None:
    from ds4f.kernels import moe_kernels as mk

    for has_sh in (False, True):
        build(mk._moe_sum, dict(rows_ptr="*fp32", sh_ptr="*bf16", out_ptr="*bf16"),
              dict(K=6, D=4096, HAS_SH=has_sh, BLOCK_T=1, BLOCK_D=1024, F32=False), arch)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("nope", [0, 448])
def test_prefix_attn_builds(arch: int, nope: int) -> None:
    from ds4f.kernels import prefix_attn as pa

    types = dict(q_ptr="*bf16", ent_ptr="*bf16", seq_ptr="*i32", vis_ptr="*i32", win_ptr="*i32",
                 kv_ptr="*u8" if nope else "*bf16", exp_ptr="*u8" if nope else "*bf16", rope_ptr="*bf16",
                 sink_ptr="*fp32", o_ptr="*bf16", qk_scale="fp32")
    # the launch's picks by shared memory (prefix_attn: 64-key tiles on Hopper; on sm_80 32, or 16 with the bit
    # decode; on GB10 16 keys, unpipelined, and 32 query rows with fp8 rows)
    smem, native = SMEM[arch], arch >= 89
    bn = 64 if smem >= 200 << 10 else (32 if nope == 0 or native else 16) if smem >= 140 << 10 else 16
    ns = 2 if smem >= 140 << 10 else 1
    bm = 32 if nope and smem < 140 << 10 else 64
    build(pa._prefix_fwd, types, dict(D=512, BLOCK_D=512, BLOCK_M=bm, BLOCK_N=bn, BT=bm // 64 + 2, NOPE=nope,
                                      NATIVE_FP8=native), arch, 8, ns)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kernel", "tile", "nw", "ns"), [
    ("_indexer_tb_fwd", dict(BT=2, BLOCK_L=64, N_INNER=4), 4, 3),  # heads-major: BT tokens' heads as M
    ("_indexer_tb_fwd", dict(BT=4, BLOCK_L=64, N_INNER=4), 8, 3),
    ("_indexer_kt_fwd", dict(BT=16, BLOCK_L=128, STAGES=2), 4, 2),  # keys-major: the key tile as M
    ("_indexer_kt_fwd", dict(BT=32, BLOCK_L=64, STAGES=3), 4, 3),
])
def test_indexer_token_blocks_build(arch: int, kernel: str, tile: dict[str, int], nw: int, ns: int) -> None:
    from ds4f.kernels import indexer_tb

    fp8 = arch >= 89
    for qfp8 in (False, True) if fp8 else (False,):
        k = build(getattr(indexer_tb, kernel), dict(q_ptr="*fp8e4nv" if qfp8 else "*bf16", w_ptr="*fp32",
                                                    k_ptr="*fp8e4nv" if fp8 else "*bf16", ks_ptr="*fp32",
                                                    slots_ptr="*i32", seq_ptr="*i32", vlen_ptr="*i32",
                                                    out_ptr="*fp32", scale="fp32"),
                  dict(DI=128, BLOCK_HI=64, KSCALE=fp8, QFP8=qfp8, ZERO_RANK=True, **tile), arch, nw, ns)
        assert k["shared"] <= 160 * 1024


@pytest.mark.parametrize("arch", ARCHS)
def test_index_q_builds(arch: int) -> None:
    # the indexer query kernel at V4's shape (64 heads of 128, 64 rope channels): bf16 everywhere, e4m3 from sm_89
    from ds4f.kernels import index_q as iq

    for fp8 in (False, True) if arch >= 89 else (False,):
        k = build(iq._index_q, dict(q_ptr="*bf16", w_ptr="*bf16", q8_ptr="*fp8e4nv" if fp8 else "*bf16",
                                    wo_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", w_scale="fp32"),
                  dict(HD=128, HALF=32, BLOCK_P=32, BLOCK_H=64, FP8=fp8), arch, 4, 1)
        assert ("cvt.rn.satfinite.e4m3x2.f32" in k["ptx"]) == fp8  # round-to-nearest-even, as quant_heads_fp8



def test_attn_tiles_shrink_to_fit_gb10() -> None:
    # the decode / prefill tiles swept on H200 (227 KB) that do not fit GB10's 99 KB (sm_121): sparse_attn.shrink's
    # sequence (what the launch walks when Triton refuses a tile) reaches one that builds within it
    import importlib

    sa = importlib.import_module("ds4f.kernels.sparse_attn")
    cases = [(sa.MID_KNOBS, 448), (sa.LONG_FP8_KNOBS, 448), (sa.SHORT_KNOBS, 448),
             ((64, 32, 4, 1), 448), ((64, 64, 8, 2), 0)]  # CSA / long HCA / window decode on fp8 rows, a 64-head
    # prefill chunk, bf16 rows
    fitted = []
    for cfg, nope in cases:
        cfg = tuple(cfg)
        while True:
            bh, bk, nw, ns = cfg
            try:
                build(sa._attn_fwd, dict(ATTN_TYPES, kv_ptr="*u8" if nope else "*bf16"),
                      dict(D=512, BLOCK_D=512, BLOCK_H=bh, BLOCK_K=bk, NG=0, SPLIT=True, SCALE_BCAST=True, NOPE=nope,
                           NATIVE_FP8=True, LIVE=True, HALF=32, DYN=True, FUSE=0, SKIP=False), 121, nw, ns)
                break
            except AssertionError:  # over SMEM[121]
                cfg = sa.shrink(cfg)
                assert cfg is not None
        fitted.append(cfg)
    assert fitted[0] != tuple(sa.MID_KNOBS)  # the CSA decode tile (147 KB there) is one that had to shrink
    assert fitted[1] != tuple(sa.LONG_FP8_KNOBS)  # so is the long HCA tile (64 keys, 147 KB)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_moe_tiles_build(arch: int) -> None:
    # the bf16 fused MoE's table tiles (prefill, batched decode, a few tokens) at V4-Flash's D = 4096, I = 2048 fit
    # the arch's shared memory (build asserts SMEM)
    from ds4f.kernels import moe
    from ds4f.kernels import moe_kernels as mk

    types = dict(x_ptr="*bf16", w_ptr="*bf16", sid_ptr="*i32", be_ptr="*i32", a_ptr="*bf16", tw_ptr="*fp32",
                 ids_ptr="*i32", out_ptr="*bf16", fin_ptr="*bf16", cnt_ptr="*i32", limit="fp32")
    for M, T in ((8192 * 6, 8192), (64 * 6, 64), (4 * 6, 4)):
        c = moe._config(M, 256, T)
        for fn, g in ((mk._moe_up, "up"), (mk._moe_down, "down")):
            consts = dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c[f"{g}_BLOCK_N"], BLOCK_K=c[f"{g}_BLOCK_K"],
                          GROUP_M=c[f"{g}_GROUP_M"], PER_PICK=c["PER_PICK"], F32_DOT=False, DM=4096, I=2048, TOPK=6,
                          PDL=arch >= 90)
            if g == "down":
                consts.update(SPLIT_K=c["SPLIT_K"], FUSE_SUM=bool(c["FUSE_SUM"]))
            build(fn, types, consts, arch, c[f"{g}_num_warps"], c[f"{g}_num_stages"])
