"""Checkpoint loading: manifest validation errors, sharding, formats, dummy weights, offline model resolution."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from checkpoints import checkpoint_config, write_checkpoint

from ds4f.model.args import ModelArgs, flash_config, tiny_config
from ds4f.model.hub import ModelNotFoundError, resolve_model
from ds4f.model.loader import CheckpointError, FileTensor, load_model, load_state_dict, validate
from ds4f.model.manifest import checkpoint_manifest, manifest_bytes
from ds4f.model.quant import dequant_fp8_block, dequant_mxfp4
from ds4f.model.weights import random_checkpoint, random_tensors

TINY = tiny_config()


@pytest.fixture(scope="module")
def quant_tensors() -> dict[str, torch.Tensor]:
    return random_checkpoint(ModelArgs.from_hf(checkpoint_config(TINY, quantized=True)), seed=5)


def _write(tmp_path: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    return write_checkpoint(tmp_path / "ckpt", TINY, 5, quantized=True, shards=shards, tensors=tensors)


def test_missing_tensor_named_with_expected_shape(tmp_path, quant_tensors):
    t = dict(quant_tensors)
    del t["layers.2.attn.compressor.ape"]
    del t["layers.1.ffn.experts.3.w2.scale"]
    with pytest.raises(CheckpointError) as e:
        load_state_dict(str(_write(tmp_path, t)), dtype=torch.float32)
    msg = str(e.value)
    assert "missing tensor layers.2.attn.compressor.ape (expected shape [16, 64] dtype float32)" in msg
    assert "missing tensor layers.1.ffn.experts.3.w2.scale (expected shape [64, 1] dtype float8_e8m0fnu)" in msg


def test_extra_tensor_named(tmp_path, quant_tensors):
    t = dict(quant_tensors)
    t["layers.0.ffn.gate.bias"] = torch.zeros(8)  # layer 0 is a hash layer: no bias
    with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.0\.ffn\.gate\.bias \(shape \[8\]"):
        load_state_dict(str(_write(tmp_path, t)), dtype=torch.float32)


def test_misshapen_and_mistyped_tensors_named(tmp_path, quant_tensors):
    t = dict(quant_tensors)
    t["layers.3.attn.wq_b.weight"] = t["layers.3.attn.wq_b.weight"][:, :16].contiguous()
    t["layers.1.attn.wkv.weight"] = t["layers.1.attn.wkv.weight"].to(torch.bfloat16)  # FP8 config: must be e4m3
    with pytest.raises(CheckpointError) as e:
        load_state_dict(str(_write(tmp_path, t, shards=2)), dtype=torch.float32)
    msg = str(e.value)
    assert "tensor layers.3.attn.wq_b.weight has shape [256, 16], expected shape [256, 32] dtype float8_e4m3fn" in msg
    assert "tensor layers.1.attn.wkv.weight has dtype bfloat16, expected shape [64, 64] dtype float8_e4m3fn" in msg
    assert "2 problems" in msg


def test_sharded_equals_single_and_formats_decoded(tmp_path, quant_tensors):
    single = write_checkpoint(tmp_path / "one", TINY, 5, quantized=True, shards=1)
    sharded = write_checkpoint(tmp_path / "three", TINY, 5, quantized=True, shards=3)
    assert len(list(sharded.glob("*.safetensors"))) == 3 and (sharded / "model.safetensors.index.json").is_file()
    s1, p1 = load_state_dict(str(single), dtype=torch.float32)
    s3, p3 = load_state_dict(str(sharded), dtype=torch.float32)
    assert s1.keys() == s3.keys() and p1.keys() == p3.keys()
    assert all(torch.equal(s1[k], s3[k]) for k in s1)
    assert all(torch.equal(p1[k][0].view(torch.uint8), p3[k][0].view(torch.uint8)) for k in p1)
    # packed tensors are the bytes as written; the dequantized weight follows them
    fp8, fp4 = "layers.1.attn.wq_b", "layers.2.ffn.experts.5.w1"
    for name, dec in ((fp8, dequant_fp8_block), (fp4, dequant_mxfp4)):
        w, s = quant_tensors[f"{name}.weight"], quant_tensors[f"{name}.scale"]
        assert torch.equal(p3[name][0].view(torch.uint8), w.view(torch.uint8))
        assert torch.equal(p3[name][1].view(torch.uint8), s.view(torch.uint8))
        assert torch.equal(s3[f"{name}.weight"], dec(w, s, torch.float32))
    assert s3[f"{fp4}.weight"].shape == (32, 64) and s3["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert len(p3) == sum(1 for k in quant_tensors if k.endswith(".scale"))


def test_float32_scales_variant(tmp_path):
    d = write_checkpoint(tmp_path / "f32", TINY, 1, quantized=True, scale_fmt="float")
    state, packed = load_state_dict(str(d), dtype=torch.float32)
    w, s = packed["layers.0.attn.wq_a"]
    assert s.dtype == torch.float32 and w.dtype == torch.float8_e4m3fn
    assert packed["layers.0.ffn.experts.0.w2"][1].dtype == torch.float32  # Flash-Base: FP8 experts, f32 scales
    assert torch.equal(state["layers.0.attn.wq_a.weight"], w.float() * s.item())


def test_dummy_tiny_is_deterministic_and_sane():
    a, _ = load_state_dict(None, dtype=torch.float32, seed=3)
    b, _ = load_state_dict("ds4f-tiny", dtype=torch.float32, seed=3)
    c, _ = load_state_dict(None, dtype=torch.float32, seed=4)
    assert a.keys() == set(checkpoint_manifest(ModelArgs.from_hf(TINY)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.1.attn.wq_a.weight"], c["layers.1.attn.wq_a.weight"])
    tid = a["layers.0.ffn.gate.tid2eid"]
    assert tid.shape == (129280, 2) and int(tid.min()) >= 0 and int(tid.max()) < 8
    assert bool((tid[:, 0] != tid[:, 1]).all())  # distinct experts per token
    w = a["layers.1.attn.wq_b.weight"].float()
    assert 0.5 < w.std().item() * 32 ** 0.5 < 2.0  # ~1/sqrt(fan_in)
    assert torch.isfinite(a["layers.1.attn.attn_sink"]).all()


def test_load_model_fills_every_parameter_and_logs(tmp_path, caplog, quant_tensors):
    d = _write(tmp_path, quant_tensors, shards=2)
    with caplog.at_level(logging.INFO, logger="ds4f"):
        model = load_model(str(d), dtype=torch.bfloat16)
    line = [r.getMessage() for r in caplog.records if r.name == "ds4f"]
    assert len(line) == 1 and f"loaded {len(quant_tensors)} tensors" in line[0] and "fp4" in line[0]
    sd = model.state_dict()
    ref, _ = load_state_dict(str(d), dtype=torch.bfloat16)
    assert sd.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(sd[k], v.to(sd[k].dtype)), k
    lin = model.get_submodule("layers.2.ffn.experts.1.w2")
    assert lin.weight.dtype == torch.bfloat16 and lin.packed_weight is not None
    assert lin.packed_weight.dtype == torch.uint8  # MXFP4 bytes as uint8 whatever the file stores (int8 here)
    assert torch.equal(lin.packed_weight, quant_tensors["layers.2.ffn.experts.1.w2.weight"].view(torch.uint8))
    assert torch.equal(lin.packed_scale.view(torch.uint8), quant_tensors["layers.2.ffn.experts.1.w2.scale"].view(
        torch.uint8))
    assert model.get_submodule("layers.0.attn.wq_a").packed_scale is not None
    assert model.get_submodule("head").packed_weight is None


def _fake_hub(cache: Path, repo: str, rev: str = "0123abcd" * 5) -> Path:
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / rev
    write_checkpoint(snap, TINY, 9, quantized=False)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    return snap


def test_repo_id_resolves_from_hf_hub_cache(tmp_path, monkeypatch):
    snap = _fake_hub(tmp_path / "hub", "acme/tiny-v4")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    r = resolve_model("acme/tiny-v4")
    assert r.path == snap.resolve() or r.path == snap
    assert r.args == ModelArgs.from_hf(TINY)
    state, _ = load_state_dict("acme/tiny-v4", dtype=torch.float32)
    assert torch.equal(state["embed.weight"], random_checkpoint(r.args, 9)["embed.weight"].float())


def test_repo_id_resolves_from_hf_home(tmp_path, monkeypatch):
    snap = _fake_hub(tmp_path / "home" / "hub", "acme/tiny-v4")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve_model("acme/tiny-v4").path in (snap, snap.resolve())
    assert resolve_model("acme/tiny-v4@" + "0123abcd" * 5).path in (snap, snap.resolve())
    (snap.parent.parent / "refs" / "main").unlink()  # pinned-commit download: no refs/main, one snapshot
    assert resolve_model("acme/tiny-v4").path in (snap, snap.resolve())
    with pytest.raises(ModelNotFoundError, match="hf download acme/tiny-v4"):
        resolve_model("acme/tiny-v4@ffffffff")


def test_not_found_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "emptyhub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    msg = str(e.value)
    assert str(tmp_path / "emptyhub" / "models--deepseek-ai--DeepSeek-V4-Flash") in msg
    assert str(tmp_path / "deepseek-ai" / "DeepSeek-V4-Flash") in msg
    assert "hf download deepseek-ai/DeepSeek-V4-Flash" in msg and "directory" in msg
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path / "noconfig"))


def test_tokenizer_path_when_shipped(tmp_path):
    d = write_checkpoint(tmp_path / "c", TINY, 0, quantized=False)
    assert resolve_model(str(d)).tokenizer_path is None
    (d / "tokenizer.json").write_text(json.dumps({}))
    assert resolve_model(str(d)).tokenizer_path == d.resolve()
    assert resolve_model(None).path is None


def test_flash_manifest_shapes_without_materializing():
    """Full Flash: the manifest against §4.1's table and its byte total, a header built from it validates, and single
    dummy tensors come out in the on-disk formats at real shapes (nothing else is generated)."""
    args = ModelArgs.from_hf(flash_config())
    man = checkpoint_manifest(args)
    expect = {
        "embed.weight": ((129280, 4096), torch.bfloat16), "hc_head_fn": ((4, 16384), torch.float32),
        "layers.0.hc_attn_fn": ((24, 16384), torch.float32), "layers.0.ffn.gate.tid2eid": ((129280, 6), torch.int64),
        "layers.5.attn.wq_a.weight": ((1024, 4096), torch.float8_e4m3fn),
        "layers.5.attn.wq_a.scale": ((8, 32), torch.float8_e8m0fnu), "layers.5.attn.wq_b.scale": ((256, 8), None),
        "layers.5.attn.wo_a.weight": ((8192, 4096), None), "layers.5.attn.wo_b.scale": ((32, 64), None),
        "layers.4.attn.compressor.wkv.weight": ((1024, 4096), torch.bfloat16),
        "layers.3.attn.compressor.wgate.weight": ((512, 4096), torch.bfloat16),
        "layers.4.attn.compressor.ape": ((4, 1024), torch.float32), "layers.3.attn.compressor.ape": ((128, 512), None),
        "layers.2.attn.indexer.wq_b.scale": ((64, 8), None), "layers.2.attn.indexer.compressor.ape": ((4, 256), None),
        "layers.3.ffn.gate.bias": ((256,), torch.float32),
        "layers.7.ffn.experts.255.w1.weight": ((2048, 2048), torch.int8),
        "layers.7.ffn.experts.255.w1.scale": ((2048, 128), torch.float8_e8m0fnu),
        "layers.7.ffn.experts.0.w2.weight": ((4096, 1024), torch.int8), "layers.7.ffn.experts.0.w2.scale": ((4096, 64),
                                                                                                           None),
        "layers.42.ffn.shared_experts.w2.scale": ((32, 16), None), "mtp.0.e_proj.scale": ((32, 32), None),
        "mtp.0.hc_head_fn": ((4, 16384), torch.float32), "mtp.0.ffn.gate.bias": ((256,), None),
    }
    for name, (shape, dtype) in expect.items():
        assert man[name].shape == shape, name
        assert dtype is None or man[name].dtype == dtype, name
    for absent in ("layers.3.attn.indexer.wq_b.weight", "layers.1.attn.compressor.ape", "layers.2.ffn.gate.bias",
                   "layers.3.ffn.gate.tid2eid", "mtp.0.attn.compressor.ape", "layers.43.attn_norm.weight"):
        assert absent not in man
    assert sum(n.endswith(".attn.indexer.wq_b.weight") for n in man) == 21
    assert sum(n.endswith(".attn.compressor.ape") for n in man) == 41
    assert abs(manifest_bytes(man) - 159.6e9) < 0.1e9  # ~156.0 GB main + ~3.6 GB MTP on disk (§1.3)
    validate({n: FileTensor(s.shape, s.dtype, Path("x")) for n, s in man.items()}, man, "flash")
    for name in ("layers.5.attn.wq_a.weight", "layers.7.ffn.experts.3.w2.weight"):
        spec, scale = man[name], man[name.removesuffix("weight") + "scale"]
        out = random_tensors(name, spec, args, seed=0, scale_spec=scale)
        assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == {
            name: (spec.shape, spec.dtype), name.removesuffix("weight") + "scale": (scale.shape, scale.dtype)}
