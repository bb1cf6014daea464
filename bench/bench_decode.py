"""⑤ runner fast path, end-to-end bench: 8-layer V4-Flash-width model (random bf16) in, one line + JSON per case out.

Cases: decode (CUDA graphs) at batch 1/4/16 and depth 0/8K/128K/1M, prefill at 1K/8K (MFU, TTFT). A decode depth is
synthesized: the pools are filled with random rows and the positions set to the depth (no prefill of the context).
Roofline = (weight bytes + KV bytes read per step) / copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import measure_ceilings  # noqa: E402
from ds4f.model.args import HCA, SWA, ModelArgs, flash_config  # noqa: E402
from ds4f.model.deepseek_v4 import Transformer  # noqa: E402
from ds4f.runner.gpu.fast_model import FastModel  # noqa: E402
from ds4f.runner.gpu.graphs import DecodeGraphs  # noqa: E402
from ds4f.runner.gpu.pools import FastCache  # noqa: E402

RATIOS = [0, 0, 4, 128, 4, 128, 4, 128]  # 2 SWA, 3 CSA, 3 HCA
BS = 256  # block size (tokens): a multiple of both ratios


def bench_args() -> ModelArgs:
    cfg = flash_config()
    cfg.pop("quantization_config")
    cfg.update(num_hidden_layers=len(RATIOS), compress_ratios=RATIOS, num_nextn_predict_layers=0, expert_dtype="bf16")
    return ModelArgs.from_hf(cfg)


@torch.no_grad()
def init_random_gpu_(model: Transformer, seed: int) -> None:
    """init_random_'s rules (deepseek_v4.py), drawn on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = model.args
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if name == "embed.weight":
            p.normal_(0.0, 1.0, generator=g)
        elif leaf == "weight" and p.dim() == 1:
            p.normal_(1.0, 0.1, generator=g)
        elif leaf == "weight":
            p.normal_(0.0, (4.0 if parent in ("w1", "w3") else 1.0) / math.sqrt(p.shape[1]), generator=g)
        elif leaf.endswith("_fn"):
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
        elif leaf.endswith("_base"):
            p.normal_(0.0, 0.5, generator=g)
            if p.numel() > a.hc_mult:
                p[2 * a.hc_mult:] += 2 * torch.eye(a.hc_mult, device=p.device).flatten()
        elif leaf.endswith("_scale"):
            p.normal_(1.0, 0.2, generator=g)
        elif leaf in ("attn_sink", "bias"):
            p.normal_(0.0, 1.0 if leaf == "attn_sink" else 0.1, generator=g)
        elif leaf == "ape":
            p.normal_(0.0, 0.5, generator=g)
        else:
            raise AssertionError(name)
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            r = torch.rand(buf.shape[0], a.n_routed_experts, device=buf.device, generator=g)
            buf.copy_(r.argsort(dim=-1)[:, : buf.shape[1]])


PROFILE_DIR = ""  # main's --profile: graph-replay timelines of batch 1 land here


def timed(fn, reps: int = 5, inner: int = 10) -> float:
    """Median seconds per call (CUDA events around `inner` calls, `reps` times) after 3 warm-up calls."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3 / inner)
    return statistics.median(ts)


def ceilings() -> dict[str, float]:
    copy_gbps, mm_tflops = measure_ceilings(iters=15)
    return {"copy_Bps": copy_gbps * 1e9, "mm_flops": mm_tflops * 1e12}


# ---- bytes and FLOPs ----
def weight_bytes(model: Transformer, b: int) -> float:
    """Bytes of weights one decode step of b sequences must read: all but the embedding and the unpicked experts
    (expected distinct experts hit under uniform routing)."""
    a = model.args
    total = b * a.hidden_size * 2
    for name, p in model.named_parameters():
        if not (name.startswith("embed.") or ".ffn.experts." in name):
            total += p.numel() * p.element_size()
    hit = a.n_routed_experts * (1 - (1 - 1 / a.n_routed_experts) ** (a.num_experts_per_tok * b))
    return total + a.num_hidden_layers * hit * 3 * a.moe_intermediate_size * a.hidden_size * 2


def keys(a: ModelArgs, layer: int, t: int) -> tuple[int, int]:
    """(attended KV rows, index keys scored) for a query at position t - 1 (t tokens visible)."""
    kind, m, w = a.layer_type(layer), a.compress_ratio(layer), min(t, a.sliding_window)
    if kind == SWA:
        return w, 0
    if kind == HCA:
        return w + t // m, 0
    return w + min(a.index_topk, t // m), t // m


def kv_bytes(a: ModelArgs, depth: int) -> float:
    t = depth + 1
    tot = 0
    for i in range(a.num_hidden_layers):
        rows, idx = keys(a, i, t)
        tot += rows * a.head_dim * 2 + idx * a.index_head_dim * 2
    return tot


def prefill_flops(model: Transformer, n: int) -> float:
    a = model.args
    per_tok = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.startswith(("embed.", "head.")) and ".ffn.experts." not in name:
            per_tok += 2 * p.numel()
    per_tok += a.num_hidden_layers * a.num_experts_per_tok * 2 * 3 * a.moe_intermediate_size * a.hidden_size
    fl = per_tok * n + 2 * a.vocab_size * a.hidden_size
    for i in range(a.num_hidden_layers):
        for t in range(1, n + 1):
            rows, idx = keys(a, i, t)
            scored = idx if -(-n // 4) > a.index_topk else 0  # the fast path scores only beyond top-k entries
            fl += 4 * a.num_attention_heads * a.head_dim * rows + 2 * a.index_n_heads * a.index_head_dim * scored
    return fl


# ---- cases ----
def decode_cases(fm: FastModel, model: Transformer, depth: int, batches: list[int], ceil: dict, emit) -> None:
    a = model.args
    nbs = -(-(depth + 1) // BS)
    cache = FastCache(a, max_seqs=max(batches), num_blocks=max(batches) * nbs, block_size=BS,
                      max_ctx=nbs * BS, max_tokens=max(batches), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(depth)
    for t in [*cache.kv, *cache.index.values(), *cache.state.values()]:
        t.normal_(0.0, 1.0, generator=g)  # synthesized context: unit-RMS rows like the normed K=V rows
    for s in range(max(batches)):
        cache.ensure(s, depth + 1)
    dg = DecodeGraphs(fm, cache, buckets=tuple(batches))
    for b in batches:
        seqs = [(s, depth, 1000 + s) for s in range(b)]
        key = dg.prepare(seqs)
        graph = dg.graphs[key]
        t = timed(graph.replay)
        if PROFILE_DIR and b == 1 and depth in (0, 8192):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                graph.replay()
                torch.cuda.synchronize()
            write_timeline(prof, Path(PROFILE_DIR) / f"graph_decode_d{depth}_timeline.txt")
        # the graph (compiled glue) against an eager forward of the same step (rewrites the same rows)
        got = dg.out[key][:b].clone()
        mode = os.environ.get("DS4F_COMPILE")
        os.environ["DS4F_COMPILE"] = "0"
        meta = cache.build_meta([(s, depth, [tok]) for s, _, tok in seqs], fm.ratios)
        want = fm.logits(fm.forward(meta, cache), meta)
        os.environ.pop("DS4F_COMPILE") if mode is None else os.environ.__setitem__("DS4F_COMPILE", mode)
        rel_tok = ((got - want).norm(dim=-1) / want.norm(dim=-1)).tolist()  # per sequence: flips show as outliers
        roof = b / ((weight_bytes(model, b) + b * kv_bytes(a, depth)) / ceil["copy_Bps"])
        emit({"case": "decode", "batch": b, "depth": depth, "step_ms": round(t * 1e3, 3),
              "tokens_per_s": round(b / t, 1), "roofline_tokens_per_s": round(roof, 1),
              "roofline_frac": round(b / t / roof, 3), "kv_pool_GiB": round(cache.nbytes / 2**30, 2),
              "graph_vs_eager_rel_median": round(statistics.median(rel_tok), 5),
              "graph_vs_eager_rel_max": round(max(rel_tok), 5), "compile": os.environ.get("DS4F_COMPILE", "1"),
              "note": "depth synthesized: pools filled with random rows, positions set to depth"})
    del dg, cache
    torch.cuda.empty_cache()


def prefill_case(fm: FastModel, model: Transformer, n: int, ceil: dict, emit, prof_dir: str = "") -> None:
    a = model.args
    nbs = -(-n // BS)
    cache = FastCache(a, max_seqs=1, num_blocks=nbs, block_size=BS, max_ctx=nbs * BS, max_tokens=n, device="cuda")
    ids = torch.randint(2, a.vocab_size, (n,)).tolist()

    def run() -> torch.Tensor:
        meta = cache.build_meta([(0, 0, ids)], fm.ratios)
        return fm.logits(fm.forward(meta, cache), meta)

    t = timed(run, reps=3, inner=1)
    if prof_dir and n >= 8192:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        (Path(prof_dir) / f"profile_prefill_{n}.txt").write_text(
            ka.table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run().argmax(-1).item()  # TTFT: metadata + forward + logits + the token on the host
    ttft = time.perf_counter() - t0
    fl = prefill_flops(model, n)
    emit({"case": "prefill", "batch": 1, "depth": n, "tokens_per_s": round(n / t, 1), "step_ms": round(t * 1e3, 2),
          "ttft_ms": round(ttft * 1e3, 2), "mfu": round(fl / t / ceil["mm_flops"], 3),
          "tflops": round(fl / t / 1e12, 1)})


def write_timeline(prof, out: Path) -> None:
    """Kernels of a profiled region in launch order: start (us from the first), duration, gap before it, stream
    ("s<id>"), name (bench/step_breakdown.py reads it)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        evs = [e for e in json.loads(Path(f.name).read_text())["traceEvents"]
               if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    evs.sort(key=lambda e: e["ts"])
    if not evs:
        return
    t0, end, lines = evs[0]["ts"], evs[0]["ts"], []
    for e in evs:
        st = "".join(c for c in str((e.get("args") or {}).get("stream", e.get("tid", 0))) if c.isdigit()) or "0"
        lines.append(f"{e['ts'] - t0:10.2f} {e['dur']:8.2f} {max(0.0, e['ts'] - end):7.2f} s{st}  {e['name'][:90]}")
        end = max(end, e["ts"] + e["dur"])
    busy = sum(e["dur"] for e in evs)
    out.write_text(f"# {len(evs)} kernels, span {end - t0:.1f} us, busy {busy:.1f} us\n"
                   "# start_us dur_us gap_us stream name\n" + "\n".join(lines) + "\n")


def profile_decode(fm: FastModel, model: Transformer, depth: int, out: Path) -> None:
    """Kernel-time table of one eager decode step at batch 1 (where the step time goes)."""
    a = model.args
    nbs = -(-(depth + 1) // BS)
    cache = FastCache(a, max_seqs=1, num_blocks=nbs, block_size=BS, max_ctx=nbs * BS, max_tokens=1, device="cuda")
    for t in [*cache.kv, *cache.index.values(), *cache.state.values()]:
        t.normal_()
    meta = cache.build_meta([(0, depth, [1000])], fm.ratios)
    for _ in range(2):
        fm.logits(fm.forward(meta, cache), meta)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fm.logits(fm.forward(meta, cache), meta)
        torch.cuda.synchronize()
    write_timeline(prof, out.with_name(out.stem + "_timeline.txt"))
    ka = prof.key_averages()
    total = sum(e.device_time_total for e in ka)
    n_kernels = sum(e.count for e in ka)
    out.write_text(f"depth {depth} batch 1 eager: {n_kernels} kernels, {total / 1e3:.3f} ms kernel time\n"
                   + ka.table(sort_by="device_time_total", row_limit=30, max_name_column_width=70))
    print(f"# profile depth={depth}: {n_kernels} kernels, {total / 1e3:.3f} ms summed kernel time", flush=True)
    del cache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/decode.jsonl"))
    ap.add_argument("--depths", default="0,8192,131072,1048576")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--big-batches", default="1", help="batches at depths >= 512K")
    ap.add_argument("--prefill", default="1024,8192")
    ap.add_argument("--peer", default="", help="hf_peer.py JSON (same config, same device call)")
    ap.add_argument("--profile", default="", help="directory for kernel-time tables")
    ap.add_argument("--git", default="unknown")
    ap.add_argument("--command", default=" ".join(sys.argv))
    args = ap.parse_args()
    import triton

    base = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git": args.git, "command": args.command, "model": "V4-Flash width, 8 layers (2 SWA, 3 CSA, 3 HCA), bf16"}
    peer = json.loads(Path(args.peer).read_text()) if args.peer and Path(args.peer).exists() else {}
    ceil = ceilings()
    print(f"# ceilings: copy {ceil['copy_Bps'] / 1e12:.2f} TB/s, bf16 mm {ceil['mm_flops'] / 1e12:.0f} TFLOP/s",
          flush=True)
    records: list[dict] = []

    def emit(r: dict) -> None:
        key = "decode_tok_s" if r["case"] == "decode" else "prefill_tok_s"
        pr = [x for x in peer.get("results", []) if x.get("ctx") == r["depth"] and key in x]
        r["peer_tokens_per_s"] = pr[0][key] if pr and r["batch"] == 1 else None
        r.setdefault("compile", os.environ.get("DS4F_COMPILE", "1"))
        r.update(base, ceiling_copy_TBps=round(ceil["copy_Bps"] / 1e12, 3),
                 ceiling_mm_TFLOPs=round(ceil["mm_flops"] / 1e12, 1))
        records.append(r)
        extra = (f"roofline={r['roofline_tokens_per_s']:.0f} frac={r['roofline_frac']:.3f}" if r["case"] == "decode"
                 else f"mfu={r['mfu']:.3f} ttft_ms={r['ttft_ms']:.1f}")
        print(f"{r['case']:8s} batch={r['batch']:<3d} depth={r['depth']:<8d} tok/s={r['tokens_per_s']:<10.1f} "
              f"step_ms={r['step_ms']:<9.3f} {extra} peer={r['peer_tokens_per_s']}", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")

    t0 = time.time()
    with torch.device("meta"):
        model = Transformer(bench_args(), dtype=torch.bfloat16)
    model = model.to_empty(device="cuda")
    init_random_gpu_(model, seed=0)
    depths = [int(x) for x in args.depths.split(",") if x]
    fm = FastModel(model, max_pos=max(depths + [1]) + 2 * BS)
    torch.cuda.synchronize()
    print(f"# model ready in {time.time() - t0:.1f}s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if args.profile:
        for d in (8192,):
            profile_decode(fm, model, d, Path(args.profile) / f"profile_decode_d{d}.txt")
    for d in depths:
        bs = [int(x) for x in (args.big_batches if d >= 2**19 else args.batches).split(",")]
        try:
            decode_cases(fm, model, d, bs, ceil, emit)
        except torch.cuda.OutOfMemoryError as ex:
            print(f"# decode depth={d}: out of memory ({str(ex)[:120]})", flush=True)
            torch.cuda.empty_cache()
    for n in [int(x) for x in args.prefill.split(",") if x]:
        prefill_case(fm, model, n, ceil, emit, args.profile)
    dec = {(r["batch"], r["depth"]): r["tokens_per_s"] for r in records if r["case"] == "decode"}
    for (b, d), v in sorted(dec.items()):
        if b > 1 and (1, d) in dec:
            print(f"# batch {b} / batch 1 at depth {d}: {v / dec[1, d]:.2f}x", flush=True)
        if b == 1 and d > 0 and (1, 0) in dec:
            print(f"# depth {d} / depth 0 at batch 1: {v / dec[1, 0]:.3f}", flush=True)
    os.makedirs(Path(args.out).parent, exist_ok=True)


if __name__ == "__main__":
    main()
