"""⑤ bench peer: HF transformers DeepseekV4ForCausalLM (random bf16) on one GPU, the bench_decode model config in,
prefill / decode tokens per second at batch 1 out (JSON). Adapted from the team's shared hf_peer_baseline tool."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4f.model.args import CSA, HCA, SWA

TYPES = {0: SWA, 4: CSA, 128: HCA}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ctxs", default="1024,8192")
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    from bench.bench_decode import RATIOS

    out: dict = {"torch": torch.__version__}
    try:
        import transformers
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

        out["transformers"] = transformers.__version__
        cfg = DeepseekV4Config(num_hidden_layers=len(RATIOS), layer_types=[TYPES[r] for r in RATIOS],
                               compress_rates={CSA: 4, HCA: 128}, num_hash_layers=3, torch_dtype="bfloat16")
        cfg._attn_implementation = "eager"
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: an fp32 build of 8 layers does not fit
        with torch.device("cuda"):
            model = DeepseekV4ForCausalLM(cfg).eval()
        torch.set_default_dtype(torch.float32)
    except Exception as e:
        out["error"] = repr(e)[:400]
        Path(args.out).write_text(json.dumps(out))
        print(json.dumps(out), flush=True)
        return
    res = []
    for ctx in [int(x) for x in args.ctxs.split(",")]:
        try:
            ids = torch.randint(10, 120000, (1, ctx), device="cuda")
            with torch.no_grad():
                model(ids[:, :64], use_cache=True)  # warm-up
                torch.cuda.synchronize()
                t0 = time.time()
                model(ids, use_cache=True)
                torch.cuda.synchronize()
                tp = time.time() - t0
                t0 = time.time()
                g = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                torch.cuda.synchronize()
                tg = time.time() - t0
            n_new = g.shape[1] - ctx
            r = {"ctx": ctx, "prefill_tok_s": round(ctx / tp, 1), "decode_tok_s": round(n_new / max(tg - tp, 1e-6), 2)}
        except Exception as e:
            r = {"ctx": ctx, "error": repr(e)[:300]}
            torch.cuda.empty_cache()
        res.append(r)
        print(json.dumps(r), flush=True)
    out["results"] = res
    out["max_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    Path(args.out).write_text(json.dumps(out))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
