"""Dummy weights generated on CUDA (ds4f/model/weights.py): deterministic, the checkpoint's formats, the same
distribution as the CPU draw, and a TP rank's load equals the whole CUDA load sharded (tp.shard_model)."""

from __future__ import annotations

import pytest
import torch

from ds4f.distributed.comm import Comm
from ds4f.model.args import ModelArgs, flash_config, tiny_config
from ds4f.model.loader import load_model
from ds4f.model.manifest import checkpoint_manifest
from ds4f.model.quant import dequant_fp8_block, dequant_mxfp4
from ds4f.model.tp import shard_model
from ds4f.model.weights import random_tensors

DEV = "cuda"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_draw_matches_cpu_formats_and_distribution() -> None:
    cfg = flash_config()
    cfg.update(num_hidden_layers=2, compress_ratios=cfg["compress_ratios"][:2], num_nextn_predict_layers=0,
               num_hash_layers=1)
    args = ModelArgs.from_hf(cfg)
    man = checkpoint_manifest(args)
    names = [n for n in man if n.startswith("layers.1.") and man[n].fmt in ("fp8", "fp4", "bf16", "i64")][:40]
    assert {man[n].fmt for n in names} >= {"fp8", "fp4"}
    for n in names:
        sc = man.get(n.removesuffix(".weight") + ".scale")
        cpu = random_tensors(n, man[n], args, 3, sc)
        gpu = random_tensors(n, man[n], args, 3, sc, DEV)
        again = random_tensors(n, man[n], args, 3, sc, DEV)
        assert gpu.keys() == cpu.keys() == again.keys()
        for k in cpu:
            assert gpu[k].device.type == DEV and gpu[k].shape == cpu[k].shape and gpu[k].dtype == cpu[k].dtype, k
            assert torch.equal(_bytes(gpu[k]), _bytes(again[k])), k  # deterministic in the seed
        if man[n].fmt in ("fp8", "fp4"):
            s = n.removesuffix(".weight") + ".scale"
            deq = dequant_fp8_block if man[n].fmt == "fp8" else dequant_mxfp4
            a, b = deq(cpu[n], cpu[s]).float(), deq(gpu[n].cpu(), gpu[s].cpu()).float()
            assert abs(a.std().item() / b.std().item() - 1) < 0.05, n


@pytest.mark.parametrize("rank", [0, 1])
def test_cuda_dummy_tp_slice_equals_sharded_whole(rank: int) -> None:
    whole = shard_model(load_model(None, dtype=torch.float32, device=DEV, load_format="dummy", seed=5), rank, 2,
                        Comm(rank, 2, pg=object()))
    part = load_model(None, dtype=torch.float32, device=DEV, load_format="dummy", seed=5, tp_rank=rank,
                      tp_world=2, comm=Comm(rank, 2, pg=object()))
    ws, ps = whole.state_dict(), part.state_dict()
    assert ws.keys() == ps.keys()
    for k in ws:
        assert ws[k].device.type == DEV and torch.equal(ws[k], ps[k]), k
    assert tiny_config()["num_hidden_layers"] == len(part.layers)
