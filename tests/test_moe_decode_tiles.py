"""⑥ kernels, fused_moe's decode configs (one block per pick, down summing a token's picks itself, down's K split
over programs) on CPU: the Triton kernels under TRITON_INTERPRET=1 (tiny shapes) against fused_moe_ref, the decode
table / env rows resolving to those configs, and each config class compiling for sm_80 and sm_90 without a GPU.
Skips the Triton parts when triton is missing (CI)."""

from __future__ import annotations

import pytest
import torch

from ds4f.kernels import moe

# (BLOCK_M, PER_PICK, FUSE_SUM, SPLIT_K, up BN, BK, GM, warps, stages, down BN, BK, GM, warps, stages)
ROWS = {
    "fuse_sum": (16, 1, 1, 1, 16, 16, 1, 4, 2, 16, 16, 1, 4, 2),
    "fuse_sum_split2": (16, 1, 1, 2, 16, 32, 4, 4, 3, 16, 16, 1, 4, 3),
    "per_pick_split2": (16, 1, 0, 2, 32, 16, 64, 4, 2, 16, 16, 64, 4, 2),
    "sorted_split2": (16, 0, 0, 2, 16, 32, 1, 4, 2, 32, 16, 1, 4, 2),
    "sorted": (16, 0, 0, 1, 16, 16, 4, 4, 2, 16, 32, 4, 4, 2),
}


def check_interpreted() -> None:
    """Each row class at a few token counts, the shared expert as id E (so tokens repeat an expert), ragged N and
    ragged K-split tiles (D = 40, I = 48: half-K 24 over 16-wide K tiles)."""
    from ds4f.kernels import arrival
    from ds4f.kernels.ref import fused_moe_ref

    g = torch.Generator().manual_seed(0)
    for name, row in ROWS.items():
        for T, E, k, D, I in [(1, 8, 3, 40, 48), (3, 6, 2, 32, 32), (5, 9, 3, 40, 48)]:
            x = torch.randn(T, D, generator=g).bfloat16()
            w13 = (torch.randn(E + 1, 2 * I, D, generator=g) * (3 / D**0.5)).bfloat16()
            w2 = (torch.randn(E + 1, D, I, generator=g) / I**0.5).bfloat16()
            ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.int()
            ids = torch.cat([ids, torch.full((T, 1), E, dtype=torch.int32)], 1)
            wt = torch.rand(ids.shape, generator=g)
            out = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=moe.decode_row_config(row))
            ref = fused_moe_ref(x, w13, w2, ids, wt, 2.0)
            assert out.shape == ref.shape and out.dtype == torch.bfloat16
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < 1.5e-2, (name, T, err)
            if name == "fuse_sum_split2":  # the last-arriving split's sum = moe_sum's, bit for bit; counts re-armed
                moe.SERIAL_SUM = False
                two = moe.fused_moe(x, w13, w2, ids, wt, 2.0, config=moe.decode_row_config(row))
                moe.SERIAL_SUM = True
                assert torch.equal(out, two), (T, (out.float() - two.float()).abs().max())
                assert all(int(c.abs().sum()) == 0 for c in arrival.buffers("moe_down_sum"))
    print("ok")


def test_decode_configs_in_the_interpreter_match_the_reference():
    pytest.importorskip("triton")
    from tests.interp import run_interpreted

    assert run_interpreted("test_moe_decode_tiles", "check_interpreted").strip().endswith("ok")


def test_decode_rows_resolve_by_token_bucket(monkeypatch):
    assert moe.resolve_config(7, 257, 1) == moe.decode_row_config(moe.DECODE_TABLE[1])  # the swept T = 1 row
    monkeypatch.setattr(moe, "DECODE_TABLE", {1: None, 4: None, 16: None})
    legacy = moe.resolve_config(7, 257, 1)
    assert legacy["PER_PICK"] == 1 and legacy["FUSE_SUM"] == 0 and legacy["SPLIT_K"] == 1
    monkeypatch.setattr(moe, "DECODE_TABLE", {1: ROWS["fuse_sum"], 4: ROWS["sorted_split2"], 16: None})
    assert moe.resolve_config(7, 257, 1)["FUSE_SUM"] == 1
    for T in (2, 4):
        c = moe.resolve_config(7 * T, 257, T)
        assert c["SPLIT_K"] == 2 and c["PER_PICK"] == 0 and c["down_BLOCK_N"] == 32
    assert moe.resolve_config(7 * 16, 257, 16) == moe.resolve_config(7 * 16, 257, 16, None)  # legacy row
    assert moe.resolve_config(7 * 16, 257, 16)["up_BLOCK_N"] == 32
    assert moe.resolve_config(7 * 5, 257, 5)["up_BLOCK_N"] == 64
    monkeypatch.setattr(moe, "DECODE_ENV", {1: (), 4: (), 16: ROWS["per_pick_split2"]})  # env beats the table
    assert moe.resolve_config(7 * 9, 257, 9)["up_GROUP_M"] == 64
    assert moe.resolve_config(7 * 17, 257, 17)["PER_PICK"] == 0  # past the buckets: picks-per-expert table
    with pytest.raises(AssertionError):
        moe.decode_row_config((16, 0, 1, 1, 16, 16, 1, 4, 2, 16, 16, 1, 4, 2))  # FUSE_SUM without PER_PICK
    with pytest.raises(AssertionError):
        moe.resolve_config(7, 257, 1, dict(PER_PICK=0, FUSE_SUM=1))


def test_env_rows_parse_or_name_the_variable(monkeypatch):
    from ds4f.kernels.knobs import env_knobs

    monkeypatch.setenv("DS4F_MOE_DECODE_T1", ",".join(map(str, ROWS["fuse_sum"])))
    assert env_knobs("DS4F_MOE_DECODE_T1", 14, "", minimum=0) == ROWS["fuse_sum"]
    monkeypatch.setenv("DS4F_MOE_DECODE_T1", "16,1,1")
    with pytest.raises(ValueError, match="DS4F_MOE_DECODE_T1"):
        env_knobs("DS4F_MOE_DECODE_T1", 14, "", minimum=0)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("fs,sk,pp", [(1, 1, 1), (1, 2, 1), (0, 2, 1), (0, 2, 0), (0, 1, 0)])
def test_decode_kernels_build(arch, fs, sk, pp):
    """The V4-Flash decode widths (D 4096, I 2048) at the sweep's widest tiles compile (shared memory fits)."""
    pytest.importorskip("triton")
    from ds4f.kernels import moe_kernels as mk
    from tests.test_kernels_build import build

    out = "*fp32" if sk > 1 else "*bf16"
    serial = bool(fs) and sk > 1  # the last-arriving split's sum (moe.SERIAL_SUM)
    down = dict(a_ptr="*bf16", w_ptr="*bf16", sid_ptr="*i32", be_ptr="*i32", tw_ptr="*fp32", ids_ptr="*i32",
                out_ptr=out, fin_ptr="*bf16" if serial else out, cnt_ptr="*i32" if serial else out)
    for bn, bk, nw, ns in [(16, 256, 4, 4), (64, 256, 4, 3), (32, 512, 8, 3)]:
        k = build(mk._moe_down, down, dict(DM=4096, I=2048, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1,
                                           PER_PICK=pp, F32_DOT=False, TOPK=7, KP=8, SPLIT_K=sk, FUSE_SUM=bool(fs),
                                           SERIAL=serial),
                  arch, nw, ns)
        assert k["shared"] <= 160 * 1024
        assert not serial or "atom" in k["ptx"]
    up = dict(x_ptr="*bf16", w_ptr="*bf16", sid_ptr="*i32", be_ptr="*i32", a_ptr="*bf16", limit="fp32")
    for bn, bk, nw, ns in [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4)]:
        k = build(mk._moe_up, up, dict(I=2048, DM=4096, TOPK=7, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1,
                                       PER_PICK=pp, F32_DOT=False), arch, nw, ns)
        assert k["shared"] <= 160 * 1024
