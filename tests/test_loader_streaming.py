"""Streaming loader: TP-sliced loading equals load-then-shard_model, packed-only linears hold no dense copy, the
host memory of a streamed load stays far below the model, and the progress line falls back to stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import write_checkpoint

from ds4f.distributed.comm import Comm
from ds4f.model.args import tiny_config
from ds4f.model.deepseek_v4 import Transformer
from ds4f.model.linear import Linear
from ds4f.model.loader import Progress, load_model
from ds4f.model.quant import dequantize
from ds4f.model.tp import SHARDED, rank_slice, shard_model

TINY = tiny_config()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("q") / "ckpt", TINY, 7, quantized=True, shards=3)


def _linears(model: torch.nn.Module) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and m.fmt in ("fp8", "fp4")}


def _same_bytes(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("source", ["files", "dummy"])
@pytest.mark.parametrize("rank", [0, 1])
def test_tp_sliced_load_equals_load_then_shard(quant_dir: Path, source: str, rank: int) -> None:
    """Oracle: the whole model loaded, then tp.shard_model; every tensor, packed bytes and local count must match."""
    name, fmt = str(quant_dir), ("auto" if source == "files" else "dummy")  # dummy: the quantized config
    ref = shard_model(load_model(name, dtype=torch.float32, load_format=fmt, seed=7), rank, 2,
                      Comm(rank, 2, pg=object()))
    got = load_model(name, dtype=torch.float32, load_format=fmt, seed=7, tp_rank=rank, tp_world=2,
                     comm=Comm(rank, 2, pg=object()))
    rs, gs = ref.state_dict(), got.state_dict()
    assert rs.keys() == gs.keys()
    for k in rs:
        assert rs[k].shape == gs[k].shape and torch.equal(rs[k], gs[k]), k
    assert any(rs[k].shape != v.shape for k, v in load_model(name, dtype=torch.float32, load_format=fmt,
                                                            seed=7).state_dict().items())  # something was split
    rl, gl = _linears(ref), _linears(got)
    for k, lin in rl.items():
        assert _same_bytes(lin.packed_weight, gl[k].packed_weight), k
        assert _same_bytes(lin.packed_scale, gl[k].packed_scale), k
    assert sum(lin.packed_weight is not None for lin in gl.values()) > 0
    for a, b in zip(ref.layers, got.layers, strict=True):
        assert (a.attn.n_heads, a.attn.o_groups) == (b.attn.n_heads, b.attn.o_groups)
    assert got.tp_comm.rank == rank and len(got.head._forward_hooks) == 1


def test_rank_slice_tiles_every_sharded_tensor() -> None:
    """The ranks' slices of each split tensor are disjoint and cover it (head: its padded vocab)."""
    from ds4f.model.args import ModelArgs
    from ds4f.model.manifest import checkpoint_manifest

    man = checkpoint_manifest(ModelArgs.from_hf(TINY))
    split = 0
    for name, spec in man.items():
        if spec.fmt == "scale":
            continue
        shape = (spec.shape[0], spec.shape[1] * 2) if spec.fmt == "fp4" else spec.shape
        cuts = [rank_slice(name, shape, r, 2) for r in range(2)]
        if not SHARDED.search(name):
            assert cuts == [None, None], name
            continue
        split += 1
        (d0, lo0, hi0), (d1, lo1, hi1) = cuts
        assert d0 == d1 and lo0 == 0 and hi0 == lo1 and hi1 - lo1 == hi0 - lo0, name
        assert hi1 == shape[d0] or (name.startswith("head.") and hi1 - shape[d0] in (0, 1)), name
    assert split > 0


@pytest.mark.parametrize("world", [1, 2])
def test_packed_only_keeps_no_dense_copy(quant_dir: Path, world: int) -> None:
    """keep_dequantized=False: quantized linears hold only packed bytes (weight on meta), and those bytes
    dequantize to the default load's weight; everything else equals the default load."""
    kw = {"tp_rank": world - 1, "tp_world": world, "comm": Comm(world - 1, world, pg=object()) if world > 1 else None}
    dense = load_model(str(quant_dir), dtype=torch.bfloat16, **kw)
    packed = load_model(str(quant_dir), dtype=torch.bfloat16, keep_dequantized=False, **kw)
    dl, pl = _linears(dense), _linears(packed)
    n_packed = 0
    for k, lin in pl.items():
        ref = dl[k]
        if ref.packed_weight is None:  # TP cut off the block grid: dense slice only, in both modes
            assert not lin.weight.is_meta and torch.equal(lin.weight, ref.weight), k
            continue
        n_packed += 1
        assert lin.weight.is_meta and tuple(lin.weight.shape) == tuple(ref.weight.shape), k
        assert lin.packed_weight.dtype == (torch.uint8 if lin.fmt == "fp4" else torch.float8_e4m3fn)
        assert torch.equal(dequantize(lin.fmt, lin.packed_weight, lin.packed_scale, torch.bfloat16), ref.weight), k
    assert n_packed > len(pl) // 2
    dense_sd = dense.state_dict()
    for k, v in packed.state_dict().items():
        if not v.is_meta:
            assert torch.equal(v, dense_sd[k]), k
    materialized = sum(p.numel() * p.element_size() for p in packed.parameters() if not p.is_meta)
    assert materialized < sum(p.numel() * p.element_size() for p in dense.parameters())


def test_meta_model_then_fill_refuses_unfilled(quant_dir: Path) -> None:
    from ds4f.model.loader import CheckpointError, fill_model

    net = Transformer(load_model(None, dtype=torch.float32).args, dtype=torch.float32, device="meta")
    with pytest.raises(CheckpointError, match="does not fill"):
        fill_model(net, [], torch.device("cpu"))


_PROBE = """
import json, sys, torch
from ds4f.model.loader import load_model
def status(key):  # kB lines of /proc/self/status; VmHWM is this process's own peak (ru_maxrss keeps the parent's)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
with torch.device("meta"):  # the first meta init imports torch's decompositions (~150 MB): not the loader's
    torch.nn.Embedding(2, 2)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
kw = json.loads(sys.argv[2])
if kw.get("tp_world", 1) > 1:
    from ds4f.distributed.comm import Comm
    kw["comm"] = Comm(kw["tp_rank"], kw["tp_world"], pg=object())
m = load_model(sys.argv[1], dtype=torch.bfloat16, **kw)
peak = status("VmHWM")
held = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()] if not t.is_meta)
held += sum(t.numel() * t.element_size() for mod in m.modules() for t in
            (getattr(mod, "packed_weight", None), getattr(mod, "packed_scale", None))
            if t is not None and not t.is_meta)
print(json.dumps({"rise": peak - before, "held": held}))
"""


def peak_rise(path: Path, **kw: object) -> dict[str, int]:
    """Peak RSS rise of one load_model in a fresh process, and the bytes the loaded model holds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), json.dumps(kw)], capture_output=True, text=True,
                         env=env, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def big_config() -> dict[str, object]:
    """Tiny's shapes with 256 wider experts (~0.1 GB of MXFP4, so RSS noise is small against it) and every TP=2 cut
    on the block grid (o_lora_rank 128), so a rank needs no dequantization either."""
    return {**TINY, "n_routed_experts": 256, "moe_intermediate_size": 1024, "o_lora_rank": 128}


def test_streamed_peak_host_memory_below_model(tmp_path: Path) -> None:
    """A load onto the meta device keeps nothing: its peak RSS rise is what loading onto a GPU costs the host. It
    must stay near one shard (8 here), far below the checkpoint; a CPU load's rise is the model it holds."""
    d = write_checkpoint(tmp_path / "big", big_config(), 1, quantized=True, shards=8)
    files = sorted(d.glob("*.safetensors"))
    total, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    streamed = peak_rise(d, device="meta", keep_dequantized=False)
    assert streamed["held"] == 0
    assert streamed["rise"] < total / 2, (streamed, total)
    assert streamed["rise"] < 2 * largest + 64 * 2**20, (streamed, largest)
    rank_streamed = peak_rise(d, device="meta", keep_dequantized=False, tp_rank=1, tp_world=2)
    assert rank_streamed["rise"] < 2 * largest + 64 * 2**20, (rank_streamed, largest)
    on_cpu = peak_rise(d, keep_dequantized=False)
    assert on_cpu["held"] > 0.9 * total and on_cpu["rise"] > 0.9 * total  # the probe sees what a load keeps
    rank = peak_rise(d, keep_dequantized=False, tp_rank=1, tp_world=2)
    assert rank["held"] < 0.6 * on_cpu["held"]  # experts and the head split; a rank never holds the whole model


def test_progress_falls_back_to_periodic_stderr_line(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress(4 * 2**30, "Loading safetensors", every=0.0)
    p.update(2**30, "shard 1/4")
    p.close()
    err = capsys.readouterr().err
    assert "Loading safetensors: 1.0 / 4.0 GiB (25%" in err and "shard 1/4" in err
