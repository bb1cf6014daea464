"""Where a decode step's wall time goes: a kernel timeline of one step (bench_decode.write_timeline's file: start_us
dur_us gap_us [stream] name per kernel) in, milliseconds per category out, summing to the main stream's span.

Walk the main stream (the stream of the step's first kernel) in launch order. Each kernel is charged from when it
could start doing work, max(its start, the end of the main-stream kernel before it: programmatic dependent launch
starts a kernel early and it waits inside), to its end. A gap before a main-stream kernel is charged to
`wait:<category>` of the side-stream kernel that ended last inside the gap, up to that kernel's end (the main stream
joins the side chains before attention and the next mHC step: that kernel is the likely holdup), and the rest to
`launch` (nothing of the main stream running). Side-stream
kernels that end while the main stream is busy cost nothing here: they were hidden. Timelines without a stream
column are read as one stream. Usage: python3 bench/step_breakdown.py TIMELINE [--first _step_meta] [--kinds flash]
[--attn-waits]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# kernel-name substrings -> category (first match wins)
CATEGORIES = (
    ("collectives", ("nccl", "allreduce", "all_reduce", "allgather", "push_ar", "one_shot")),
    ("moe", ("_dec_up", "_dec_down", "_a8_up", "_a8_down", "_a8_expand", "_moe", "mxfp4", "_up_mx", "_down_mx",
             "_up_gemv", "_down_gemv", "silu")),
    ("fp8_gemv", ("_fp8_gemv", "_gemv_cc", "_gemv_h2", "_w8_kernel", "_a8w8")),
    ("bf16_gemv", ("_gemv", "nvjet", "gemm", "cutlass", "splitk", "xmma", "dot_kernel", "gemv")),
    ("attention", ("_attn",)),
    ("kv_path", ("_rope", "_norm_rope", "_store_kv", "_store_key", "_compress")),
    ("indexer", ("_indexer", "_topk", "_index_q", "radix", "gathertopk", "sbtopk", "_align_small")),
    ("mhc", ("_hc_",)),
    ("router", ("_router",)),
)


@dataclass(frozen=True)
class Kernel:
    start: float  # us
    dur: float
    stream: str
    name: str

    @property
    def end(self) -> float:
        return self.start + self.dur


def category(name: str) -> str:
    n = name.lower()
    return next((c for c, subs in CATEGORIES if any(s in n for s in subs)), "other")


def parse(text: str) -> list[Kernel]:
    """Timeline lines -> kernels (comment lines skipped; 4 columns + name: the stream is the 4th, else "0")."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        f = line.split(None, 4)
        if len(f) == 5 and f[3].startswith("s") and f[3][1:].isdigit():
            out.append(Kernel(float(f[0]), float(f[1]), f[3], f[4].strip()))
        else:
            g = line.split(None, 3)
            out.append(Kernel(float(g[0]), float(g[1]), "0", g[3].strip()))
    return out


def last_step(kernels: list[Kernel], first: str) -> list[Kernel]:
    """The kernels from the last one whose name starts with `first` on (a step's first kernel), or all."""
    starts = [i for i, k in enumerate(kernels) if k.name.startswith(first)]
    return kernels[starts[-1]:] if starts else kernels


def breakdown(kernels: list[Kernel]) -> dict[str, float]:
    """-> {category: us} over the main stream's span (see the module docstring); the values sum to the span."""
    if not kernels:
        return {}
    ks = sorted(kernels, key=lambda k: k.start)
    main = ks[0].stream
    side = sorted((k for k in ks if k.stream != main), key=lambda k: k.end)
    out: Counter[str] = Counter()
    prev = ks[0].start
    for k in (k for k in ks if k.stream == main):
        if k.start > prev:
            ended = [s for s in side if prev < s.end <= k.start]
            if ended:
                w = ended[-1].end - prev
                out[f"wait:{category(ended[-1].name)}"] += w
                out["launch"] += k.start - prev - w
            else:
                out["launch"] += k.start - prev
        begin = max(k.start, prev)
        if k.end > begin:
            out[category(k.name)] += k.end - begin
            prev = k.end
    return dict(out)


def busy_breakdown(kernels: list[Kernel]) -> dict[str, float]:
    """-> {category: us} over the span, each instant charged to the running kernel that started first (a kernel
    started early by programmatic dependent launch waits while the one before it works; a side-stream kernel that
    starts under a running one is hidden by it), `launch` where none runs; the values sum to the span. For
    timelines whose kernels are spread over many streams (a CUDA graph of a TP step replays its nodes on several),
    where breakdown's main stream is not the step's chain."""
    if not kernels:
        return {}
    ks = sorted(kernels, key=lambda k: (k.start, k.end))
    cuts = sorted({x for k in ks for x in (k.start, k.end)})
    out: Counter[str] = Counter()
    i, active = 0, []  # active: kernels running at the current cut, in start order
    for a, b in zip(cuts, cuts[1:]):
        while i < len(ks) and ks[i].start <= a:
            active.append(ks[i])
            i += 1
        active = [k for k in active if k.end > a]
        out[category(active[0].name) if active else "launch"] += b - a
    return dict(out)


AR_NAMES = ("allreduce", "all_reduce", "push_ar", "one_shot")  # the per-sublayer all-reduces (not the head's gather)
HC = "_hc_decode"  # the decode mHC launch: with DS4F_HC_AR the sublayer's all-reduce runs inside it


def _cut(kernels: list[Kernel]) -> tuple[list[tuple[float, float]], float]:
    """The step cut at its all-reduces -> ([(us before the i-th all-reduce, its own us)], us after the last). An mHC
    launch after the step's first that no all-reduce launch precedes holds its sublayer's all-reduce (DS4F_HC_AR):
    the cut is where the kernels that started before it have ended (its own us 0; it belongs to the next stretch,
    as the mHC launch after an all-reduce launch does)."""
    ks = sorted(kernels, key=lambda k: k.start)
    cuts, prev = [], ks[0].start if ks else 0.0
    last = ""  # the last all-reduce ("ar") or mHC ("hc") launch seen
    for i, k in enumerate(ks):
        if any(n in k.name.lower() for n in AR_NAMES):
            cuts.append((max(0.0, k.start - prev), max(0.0, k.end - max(k.start, prev))))
            prev, last = max(prev, k.end), "ar"
        elif k.name.startswith(HC):
            if last == "hc":  # an mHC launch right after another one: the all-reduce between them is inside it
                c = max([j.end for j in ks[:i] if j.end <= k.end] + [prev])
                cuts.append((max(0.0, c - prev), 0.0))
                prev = c
            last = "hc"
    return cuts, max(0.0, max((k.end for k in ks), default=prev) - prev)


def sublayers(kernels: list[Kernel]) -> dict[str, float]:
    """-> {"attn", "moe", "all_reduce", "rest": us} over the step's span, cut at its all-reduces (TP: one after each
    sublayer's partial sums; inside the next mHC launch with DS4F_HC_AR: all_reduce 0 there, see _cut): the
    stretches before them alternate attention (with the mHC step and, first, the step's prologue before it) and MoE
    sublayers (with their mHC step); after the last one, `rest` (the last mHC step, the head, its gather); `layers`:
    the all-reduce pairs. Empty without all-reduces (one GPU)."""
    cuts, rest = _cut(kernels)
    if not cuts:
        return {}
    out: Counter[str] = Counter()
    for i, (before, ar) in enumerate(cuts):
        out["moe" if i % 2 else "attn"] += before
        out["all_reduce"] += ar
    return {**out, "rest": rest, "layers": len(cuts) / 2}


def sublayers_by_kind(kernels: list[Kernel], kinds: list[str]) -> dict[tuple[str, str], list[float]]:
    """-> {(attn | moe, layer kind): [us per layer]}: sublayers' stretches as in sublayers, layer i of kind kinds[i]."""
    out: dict[tuple[str, str], list[float]] = {}
    for i, (before, _) in enumerate(_cut(kernels)[0][: 2 * len(kinds)]):
        out.setdefault(("moe" if i % 2 else "attn", kinds[i // 2]), []).append(before)
    return out


ATTN, Q_PROJ = "_attn_fwd", "_fp8_gemv"  # the attention launch; wq_b's FP8 GEMV (q norm inside), its q projection


def attn_waits(kernels: list[Kernel]) -> dict[str, dict[str, float]]:
    """What each attention launch waited on: per layer (the kernels since the previous attention launch, "indexer"
    layers where a top-k ran, else "plain"), each kernel name's last end and the attention's start, in us after the
    q projection's end; -> {kind: {name: median us}} (names of that kind's every layer; "attn_start" included)."""
    ks = sorted(kernels, key=lambda k: k.start)
    rows: dict[str, list[dict[str, float]]] = {}
    prev = 0
    for i, k in enumerate(ks):
        if k.name != ATTN:
            continue
        seg, prev = ks[prev:i], i + 1
        q = [j.end for j in seg if j.name == Q_PROJ]
        if not q:
            continue
        ends: dict[str, float] = {}
        for j in seg:
            ends[j.name] = max(ends.get(j.name, -1e30), j.end - q[-1])
        ends["attn_start"] = k.start - q[-1]
        rows.setdefault("indexer" if any("_topk" in n for n in ends) else "plain", []).append(ends)
    out = {}
    for kind, layers in rows.items():
        names = set.intersection(*(set(e) for e in layers))
        out[kind] = {n: sorted(e[n] for e in layers)[len(layers) // 2] for n in names}
    return out


def timeline_ms(path: Path, first: str = "_step_meta") -> dict[str, float]:
    """A timeline file's last step (from the last kernel named `first`) -> {category: ms}, sorted by name:
    breakdown's main-stream walk, or busy_breakdown where fewer than half the step's kernels are on its first
    kernel's stream."""
    ks = last_step(parse(Path(path).read_text()), first)
    main = sum(k.stream == ks[0].stream for k in ks) if ks else 0
    b = breakdown(ks) if 2 * main >= len(ks) else busy_breakdown(ks)
    return {c: round(us / 1e3, 4) for c, us in sorted(b.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("timeline")
    ap.add_argument("--first", default="_step_meta", help="name prefix of a step's first kernel")
    ap.add_argument("--kinds", choices=["flash"], help="also the sublayers by layer kind of this model's layers")
    ap.add_argument("--attn-waits", action="store_true", help="also what the attention launches waited on (median "
                    "us after wq_b's end of each kernel's last end, by layer kind)")
    args = ap.parse_args()
    b = timeline_ms(Path(args.timeline), args.first)
    total = sum(b.values())
    for c, ms in sorted(b.items(), key=lambda x: -x[1]):
        print(f"{c:20s} {ms:8.3f} ms {ms / total:6.1%}")
    print(json.dumps(b))
    sub = sublayers(last_step(parse(Path(args.timeline).read_text()), args.first))
    if sub:
        n = sub.pop("layers")
        print("by sublayer (cut at the all-reduces): " + ", ".join(
            f"{k} {v / 1e3:.3f} ms" + (f" ({v / n:.1f} us per layer)" if k != "rest" else "") for k, v in sub.items()))
    if args.kinds:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from ds4f.model.args import ModelArgs, flash_config

        a = ModelArgs.from_hf(flash_config())
        kinds = [a.layer_type(i) for i in range(a.num_hidden_layers)]
        by = sublayers_by_kind(last_step(parse(Path(args.timeline).read_text()), args.first), kinds)
        for (part, kind), us in sorted(by.items()):
            mean, total = sum(us) / len(us), sum(us) / 1e3
            print(f"  {part:4s} {kind:30s} {len(us):3d} layers {mean:7.1f} us each, {total:.3f} ms")
    if args.attn_waits:
        for kind, ends in attn_waits(last_step(parse(Path(args.timeline).read_text()), args.first)).items():
            print(f"attention in {kind} layers, us after wq_b's end (medians):")
            for n, us in sorted(ends.items(), key=lambda x: x[1])[-8:]:
                print(f"  {n[:40]:40s} {us:8.2f}")


if __name__ == "__main__":
    main()
