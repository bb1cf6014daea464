"""Checkpoint files -> ds4f and HF transformers loading the SAME files: weights, logits and greedy text agree.

HF reads the official names itself (its conversion mapping renames them and stacks the experts); for the FP8 + MXFP4
files it dequantizes with its own FineGrainedFP8 `dequantize=True` path (its own e2m1 table and scale grid).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from checkpoints import write_checkpoint
from hf_ref import _lower_id_wins_ties, hf_greedy, hf_logits, hf_state_dict

from ds4f.model.args import ModelArgs, flash_config, tiny_config
from ds4f.model.cache import AttnBatch, DenseCache
from ds4f.model.loader import load_model
from ds4f.model.manifest import checkpoint_manifest

N_PROMPT, N_GEN = 100, 6  # 100 tokens: 25 CSA entries > index_topk 4, 6 HCA entries (ratio 16)

VARIANTS = {
    "bf16": {"quantized": False, "shards": 1},
    "fp8_mxfp4": {"quantized": True, "shards": 2},  # Flash: FP8 linears + MXFP4 experts, UE8M0 scales
    "fp8_f32scale": {"quantized": True, "shards": 1, "scale_fmt": "float"},  # Flash-Base: FP8 experts, f32 scales
}


def _hf_from_files(path: Path, monkeypatch: pytest.MonkeyPatch) -> transformers.PreTrainedModel:
    cfg = json.loads((path / "config.json").read_text())
    kw: dict = {}
    q = cfg.get("quantization_config")
    if q:
        kw["quantization_config"] = transformers.FineGrainedFP8Config(
            dequantize=True, weight_block_size=tuple(q["weight_block_size"]),
            scale_fmt=q["scale_fmt"], expert_dtype=cfg["expert_dtype"])
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", **kw).eval()
    for layer in hf.model.layers:
        comp = layer.self_attn.compressor
        if comp is not None and hasattr(comp, "indexer"):
            comp.indexer.scorer.register_forward_hook(_lower_id_wins_ties)
    return hf


@torch.no_grad()
def _ds4f_greedy(model, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill logits [T, V] and n greedy tokens decoded one at a time through the cache."""
    cache = DenseCache()
    t = prompt.numel()
    streams = model(prompt, torch.arange(t), AttnBatch([0, t], [0], cache))
    logits = model.compute_logits(streams)
    out = [int(logits[-1].argmax())]
    for i in range(n - 1):
        s = model(torch.tensor([out[-1]]), torch.tensor([t + i]), AttnBatch([0, 1], [t + i], cache))
        out.append(int(model.compute_logits(s)[-1].argmax()))
    return logits, out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ds4f_and_hf_load_same_files(variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_checkpoint(tmp_path / variant, tiny_config(), seed=11, **VARIANTS[variant])
    model = load_model(str(path), dtype=torch.float32)
    hf = _hf_from_files(path, monkeypatch)

    # weights: HF's renaming + its own dequantization give exactly ds4f's tensors
    ours = hf_state_dict(model)
    theirs = hf.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert torch.equal(theirs[k].to(v.dtype), v), k

    prompt = torch.randint(2, tiny_config()["vocab_size"], (N_PROMPT,), generator=torch.Generator().manual_seed(7))
    logits, greedy = _ds4f_greedy(model, prompt, N_GEN)
    ref = hf_logits(hf, prompt)
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"{variant}: logits differ by {rel:.2e} (relative to max |logit|)"
    assert greedy == hf_greedy(hf, prompt.tolist(), N_GEN)


def test_flash_manifest_matches_hf_module_shapes():
    """Every non-MTP tensor of the full Flash manifest, renamed by HF's own conversion mapping, lands on an HF
    parameter (built on the meta device) of the matching shape; experts stack as [E, 2I, D] / [E, D, I]."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    cfg = {k: v for k, v in flash_config().items() if k != "quantization_config"}
    with torch.device("meta"):
        hf = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**cfg))
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    renames = get_checkpoint_conversion_mapping("deepseek_v4")
    man = checkpoint_manifest(ModelArgs.from_hf(flash_config()))
    covered = set()
    for name, spec in man.items():
        if name.startswith("mtp.") or spec.fmt == "scale":
            continue
        key = name
        for r in renames:
            key = r.rename_source_key(key)[0]
        key = key if key in shapes else f"model.{key}"
        assert key in shapes, f"{name} -> {key} has no HF parameter"
        covered.add(key)
        shape = (spec.shape[0], 2 * spec.shape[1]) if spec.fmt == "fp4" else spec.shape
        if ".experts." in name:
            e, rows, cols = shapes[key]
            want = (rows // 2, cols) if name.endswith(("w1.weight", "w3.weight")) else (rows, cols)
            assert e == 256 and shape == want, name
        else:
            assert shape == shapes[key], name
    assert covered == set(shapes)
