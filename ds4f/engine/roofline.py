"""③ engine roofline: ModelArgs + weight / KV storage formats + a decode batch's depths in, the bytes one decode step
must read (its memory-bandwidth floor) out; the device's copy bandwidth, measured once per process; and the tracker
the engine feeds with decode-step wall times to report the fraction of that roofline it reaches."""

from __future__ import annotations

import functools
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from ds4f.model.args import CSA, HCA, ModelArgs

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4
BANDWIDTH_PROBE_BYTES = 256 << 20
DECODE_WINDOW = 64  # decode steps the reported fraction averages over


def _linear(n_out: int, n_in: int, fmt: str, weights: str, scale_bytes: int) -> float:
    """Bytes of one [n_out, n_in] linear. weights = "checkpoint" (fmt as stored: bf16, fp8 with one scale per 128x128
    block, fp4 with one UE8M0 scale per 32 values) or a dtype name (every linear dequantized to that dtype)."""
    n = n_out * n_in
    if weights != "checkpoint":
        return n * _DTYPE_BYTES[weights]
    if fmt == "fp8":
        return n + math.ceil(n_out / 128) * math.ceil(n_in / 128) * scale_bytes
    if fmt == "fp4":
        return n / 2 + n / 32
    return 2 * n


def weight_bytes(args: ModelArgs, batch: int, weights: str = "checkpoint") -> int:
    """Weight bytes one decode step of `batch` sequences (one token each) reads; the MTP layer is not run.

    Routed experts count min(E, batch * k) per layer: the number of distinct experts the step can touch, an upper
    bound (sequences that pick the same expert share its read). Every other weight is read once per step."""
    d, lf, sb = args.hidden_size, args.linear_format, 1 if args.scale_format == "ue8m0" else 4

    def lin(n_out: int, n_in: int, fmt: str) -> float:
        return _linear(n_out, n_in, fmt, weights, sb)

    def compressor(ratio: int, head_dim: int, overlap: bool) -> float:
        cd = (2 if overlap else 1) * head_dim
        return 2 * lin(cd, d, "bf16") + FP32 * (ratio * cd + head_dim)  # wkv, wgate; ape, norm

    h, hd, inter = args.num_attention_heads, args.head_dim, args.moe_intermediate_size
    attn = (lin(args.q_lora_rank, d, lf) + lin(h * hd, args.q_lora_rank, lf) + lin(hd, d, lf)
            + lin(args.o_groups * args.o_lora_rank, h * hd // args.o_groups, lf)
            + lin(d, args.o_groups * args.o_lora_rank, lf) + FP32 * (args.q_lora_rank + hd + h))
    mix = (2 + args.hc_mult) * args.hc_mult
    mhc = 2 * FP32 * (mix * args.hc_mult * d + mix + 3)  # attn_hc + ffn_hc: fn, base, scale
    gate = lin(args.n_routed_experts, d, "bf16") + FP32 * args.n_routed_experts
    shared = args.n_shared_experts * 3 * lin(inter, d, lf)
    expert = 3 * lin(inter, d, args.expert_format)
    routed = min(args.n_routed_experts, batch * args.num_experts_per_tok) * expert
    per_layer = attn + mhc + gate + shared + routed + 2 * FP32 * d  # + attn_norm, ffn_norm
    total = args.num_hidden_layers * per_layer
    for layer in range(args.num_hidden_layers):
        kind, ratio = args.layer_type(layer), args.compress_ratio(layer)
        if kind == CSA:
            ih = args.index_head_dim
            total += (compressor(ratio, hd, True) + lin(args.index_n_heads * ih, args.q_lora_rank, lf)
                      + lin(args.index_n_heads, d, "bf16") + compressor(ratio, ih, True))
        elif kind == HCA:
            total += compressor(ratio, hd, False)
    embed_row = d * (2 if weights == "checkpoint" else _DTYPE_BYTES[weights])
    head = lin(args.vocab_size, d, "bf16") + FP32 * (args.hc_mult * args.hc_mult * d + args.hc_mult + 1 + d)
    return int(total + head + batch * embed_row)


def layer_kinds(args: ModelArgs) -> Counter[tuple[str, int]]:
    """(layer type, compress ratio) -> how many layers have it."""
    return Counter((args.layer_type(i), args.compress_ratio(i)) for i in range(args.num_hidden_layers))


def kv_bytes(args: ModelArgs, depth: int, kv_row_bytes: int, index_row_bytes: int,
             kinds: Counter[tuple[str, int]] | None = None) -> tuple[int, int]:
    """(attention KV bytes, index-key bytes) one sequence's decode token at `depth` reads (t = depth + 1 positions):
    every layer's min(t, window) window rows; CSA: min(index_topk, t // m) selected rows + all t // m index keys;
    HCA: all t // m entries. Compressor state (fixed, a few MiB) is not counted. kinds: layer_kinds(args), when
    the caller keeps it."""
    t = depth + 1
    rows = index_keys = 0
    for (kind, ratio), n in (kinds if kinds is not None else layer_kinds(args)).items():
        r = min(t, args.sliding_window)
        if kind == CSA:
            r += min(args.index_topk, t // ratio)
            index_keys += n * (t // ratio)
        elif kind == HCA:
            r += t // ratio
        rows += n * r
    return rows * kv_row_bytes, index_keys * index_row_bytes


def decode_step_bytes(args: ModelArgs, depths: Sequence[int], weights: str, kv_row_bytes: int,
                      index_row_bytes: int) -> int:
    """Roofline bytes of one decode step: one token for each sequence at depths[i] (its position)."""
    kv = sum(sum(kv_bytes(args, d, kv_row_bytes, index_row_bytes)) for d in depths)
    return weight_bytes(args, len(depths), weights) + kv


@functools.cache
def measure_bandwidth(device: str, nbytes: int = BANDWIDTH_PROBE_BYTES, reps: int = 5) -> float | None:
    """Copy bandwidth in bytes/s counting read + write (2 x nbytes per copy), best of `reps` after one warm-up;
    cached per device for the process. None if the probe buffers do not fit."""
    import torch

    dev = torch.device(device)
    try:
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
    except RuntimeError:  # CUDA OOM: the KV cache took the memory
        return None

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    dst.copy_(src)
    sync()
    copies = 10 if dev.type == "cuda" else 1  # a 256 MiB device copy takes ~0.1 ms: time several per sync
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        sync()
        best = min(best, (time.perf_counter() - t0) / copies)
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # hand the probe buffers back
    bw = 2 * nbytes / best
    print(f"[ds4f] memory bandwidth ({dev.type} copy of {nbytes >> 20} MiB, read + write): {bw / 1e9:.1f} GB/s",
          file=sys.stderr, flush=True)
    return bw


class DecodeRoofline:
    """Roofline bytes and wall time of the last DECODE_WINDOW decode steps; fraction = sum(bytes) / bandwidth /
    sum(seconds), so long steps weigh by their time."""

    def __init__(self, args: ModelArgs, weights: str, kv_row_bytes: int, index_row_bytes: int,
                 bandwidth: float | None) -> None:
        self.args, self.weights = args, weights
        self.kv_row_bytes, self.index_row_bytes = kv_row_bytes, index_row_bytes
        self.bandwidth = bandwidth
        self._steps: deque[tuple[int, float]] = deque(maxlen=DECODE_WINDOW)  # (bytes, seconds)
        self._weights: dict[int, int] = {}  # batch -> weight_bytes (the per-layer walk is ~100 us of Python)
        self._kinds = layer_kinds(args)

    def step_bytes(self, depths: Sequence[int]) -> int:
        """decode_step_bytes(depths) from memoized weight bytes and layer kinds: a few us per step instead of a walk
        over every layer (observe runs between every two decode steps)."""
        b = len(depths)
        if b not in self._weights:
            self._weights[b] = weight_bytes(self.args, b, self.weights)
        return self._weights[b] + sum(sum(kv_bytes(self.args, d, self.kv_row_bytes, self.index_row_bytes,
                                                   self._kinds)) for d in depths)

    def observe(self, depths: Sequence[int], seconds: float) -> None:
        self._steps.append((self.step_bytes(depths), seconds))

    def stats(self) -> dict[str, Any]:
        n = len(self._steps)
        nbytes = sum(b for b, _ in self._steps)
        secs = sum(s for _, s in self._steps)
        fraction = None
        if n and secs > 0 and self.bandwidth:
            fraction = nbytes / self.bandwidth / secs
        return {"decode_step_seconds": secs / n if n else None, "roofline_bytes_per_step": nbytes // n if n else None,
                "mem_bandwidth_bytes_per_s": self.bandwidth, "roofline_fraction": fraction}
