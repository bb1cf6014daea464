"""⑤ runner GPU fast path, check: a config + device in, per-step logit errors of FastModel vs the reference out.

The oracle is the reference Transformer in fp32 (the fast path's bf16 weights upcast) over a DenseCache, fed the
same batches: a mixed prefill (one whole prompt + the first chunk of another), the rest of the chunked prompt, then
greedy decode steps (tokens from the oracle), eager or through the decode CUDA graphs.
"""

from __future__ import annotations

from typing import Any

import torch

from ds4f.model.args import ModelArgs
from ds4f.model.cache import AttnBatch, DenseCache
from ds4f.model.deepseek_v4 import Transformer, init_random_
from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.pools import FastCache


def mid_config(base: dict[str, Any]) -> dict[str, Any]:
    """An odd mid-size config: non-power-of-two widths and head counts, window 32, CSA 4 / HCA 32, top-k 24.

    Every layer hash-routed: with 12 experts a learned top-3 flips between bf16 and fp32 on a few percent of tokens,
    which swaps a whole expert (logit errors ~0.5) and says nothing about the fast path; the tiny config keeps the
    learned router covered."""
    from ds4f.model.args import CSA, HCA, SWA

    cfg = dict(base)
    cfg.update(vocab_size=4099, hidden_size=320, num_hidden_layers=5, num_attention_heads=6, head_dim=192,
               qk_rope_head_dim=32, q_lora_rank=96, o_groups=3, o_lora_rank=80, sliding_window=32,
               compress_ratios=[0, 4, 32, 4, 32, 0], layer_types=[SWA, CSA, HCA, CSA, HCA],
               compress_rates={CSA: 4, HCA: 32}, index_n_heads=5, index_head_dim=64, index_topk=24,
               n_routed_experts=12, num_experts_per_tok=3, moe_intermediate_size=96, num_hash_layers=5)
    return cfg


def _rel(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return ((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).tolist()


@torch.no_grad()
def compare(cfg: dict[str, Any], device: str, prompt_lens: tuple[int, ...], first_chunk: int, decode_steps: int,
            graphs: bool = False, seed: int = 0, block_size: int = 32) -> list[list[float]]:
    """-> per forward, the relative L2 logit error of each sequence that produced logits.

    Sequence 0..n-1 have prompts of prompt_lens; the last one is prefilled in two chunks (first_chunk, rest) and the
    others in the first forward. Slots are 2*i so slot != batch row."""
    args = ModelArgs.from_hf(cfg)
    model = init_random_(Transformer(args, dtype=torch.bfloat16), seed=seed).to(device)
    ref = Transformer(args, dtype=torch.float32).to(device)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    n = len(prompt_lens)
    max_ctx = max(prompt_lens) + decode_steps + 1
    fm = FastModel(model, max_pos=max_ctx + block_size)
    nb = n * (-(-max_ctx // block_size))
    cache = FastCache(args, max_seqs=2 * n, num_blocks=nb, block_size=block_size, max_ctx=max_ctx,
                      max_tokens=sum(prompt_lens), device=device)
    dense = DenseCache().bind(list(range(n)))
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, args.vocab_size, (k,), generator=g).tolist() for k in prompt_lens]
    slots = [2 * i for i in range(n)]
    errs: list[list[float]] = []

    def run(chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """chunks: (seq, start, ids) -> oracle logits [len(chunks), vocab]; also checks the fast path."""
        ids = torch.tensor([t for _, _, c in chunks for t in c], device=device)
        pos = torch.tensor([s + i for _, s, c in chunks for i in range(len(c))], device=device)
        qsl = [0]
        for _, _, c in chunks:
            qsl.append(qsl[-1] + len(c))
        dense.bind([b for b, _, _ in chunks])
        out = ref(ids, pos, AttnBatch(qsl, [s for _, s, _ in chunks], dense))
        want = ref.compute_logits(out[[q - 1 for q in qsl[1:]]])
        if graphs and all(len(c) == 1 for _, _, c in chunks):
            got = dg.step([(slots[b], s, c[0]) for b, s, c in chunks])
        else:
            meta = cache.build_meta([(slots[b], s, c) for b, s, c in chunks], fm.ratios)
            got = fm.logits(fm.forward(meta, cache), meta)
        errs.append(_rel(got, want))
        return want

    dg = None
    if graphs:
        from ds4f.runner.gpu.graphs import DecodeGraphs

        dg = DecodeGraphs(fm, cache, buckets=(1, 2, 4))
    last = n - 1
    first = [(b, 0, prompts[b]) for b in range(last)] + [(last, 0, prompts[last][:first_chunk])]
    lg = run(first)
    nxt = {b: int(lg[b].argmax()) for b in range(last)}
    lg = run([(last, first_chunk, prompts[last][first_chunk:])])
    nxt[last] = int(lg[0].argmax())
    pos = {b: prompt_lens[b] for b in range(n)}
    for step in range(decode_steps):
        live = [b for b in range(n) if step % 3 != 2 or b != 0]  # sequence 0 skips every third step
        lg = run([(b, pos[b], [nxt[b]]) for b in live])
        for r, b in enumerate(live):
            nxt[b] = int(lg[r].argmax())
            pos[b] += 1
    return errs
