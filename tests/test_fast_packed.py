"""⑤ runner GPU fast path on packed weights (CPU: kernels' torch fallbacks): one FP8 + MXFP4 checkpoint loaded twice,
dequantized (default) and packed-only (keep_dequantized=False); FastModel on each gets the same steps; the logits
agree and the packed FastModel holds the routed experts as their packed bytes only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import write_checkpoint

from ds4f.kernels.moe_mxfp4 import fused_moe_mxfp4
from ds4f.kernels.ref import fused_moe_ref
from ds4f.model.args import ModelArgs, tiny_config
from ds4f.model.deepseek_v4 import Transformer
from ds4f.model.linear import Linear
from ds4f.model.loader import load_model
from ds4f.runner.gpu import glue, packed
from ds4f.runner.gpu.fast_model import FastModel
from ds4f.runner.gpu.packed import InProj, grouped_out, is_packed, linear
from ds4f.runner.gpu.pools import FastCache

# Relative L2 logit error per row, packed vs dequantized. With UE8M0 scales every dequantized weight (e2m1 or e4m3
# times a power of two) is exact in bf16, and the CPU fallbacks (fp8_linear_ref, fused_moe_mxfp4_ref) compute with
# those same values in fp32, so what is left is rounding: mainly fused_moe_mxfp4 adds the shared expert's output
# rounded to bf16 where the bf16 path sums it in fp32 with the routed picks (~3e-3 per MoE; summed the same way, the
# tiny scenario's logits match exactly), plus an odd bf16 step in wo_a (fp32 einsum vs bf16 bmm). Measured: max
# 1.05e-2 (tiny) / 1.46e-2 (aligned), medians 9e-3. A wrong layout (w1 / w3 swapped, a scale row shifted, a group's
# columns misplaced) moves logits by O(1).
TOL = 2e-2


def aligned_config() -> dict[str, Any]:
    """Rows on the 128 scale grid: wq_a + wkv stack as one packed matrix, wo_a runs as one grouped fp8 GEMM."""
    cfg = dict(tiny_config())
    cfg.update(vocab_size=1024, hidden_size=128, q_lora_rank=128, head_dim=128, qk_rope_head_dim=32,
               num_attention_heads=2, o_groups=2, o_lora_rank=128)
    return cfg


def all_hash(cfg: dict[str, Any]) -> dict[str, Any]:
    # a learned top-k is free to flip on bf16 last-bit differences (a whole expert swapped), which says nothing about
    # the packed path; hash routing keeps the comparison on the projections and the experts' math
    return dict(cfg, num_hash_layers=cfg["num_hidden_layers"])


@torch.no_grad()
def run_pair(cfg: dict[str, Any], directory: Path, device: str, prompt_lens: tuple[int, ...] = (37, 21),
             first_chunk: int = 13, decode_steps: int = 6, block_size: int = 32, graphs: bool = False,
             scale_fmt: str = "ue8m0") -> tuple[list[torch.Tensor], list[torch.Tensor], FastModel]:
    """Write the FP8 + MXFP4 checkpoint (scale_fmt "float": FP8 experts, f32 scales, as Flash-Base), load it
    dequantized and packed-only, and feed both FastModels the same steps (a mixed prefill, the rest of a chunked
    prompt, greedy decode from the dequantized one; graphs: decode through DecodeGraphs, CUDA only).
    -> (dequantized logits per forward, packed logits per forward, the packed FastModel)."""
    d = write_checkpoint(directory, cfg, 3, quantized=True, scale_fmt=scale_fmt)
    deq = load_model(str(d), dtype=torch.bfloat16, device=device)
    pk = load_model(str(d), dtype=torch.bfloat16, device=device, keep_dequantized=False)
    args = ModelArgs.from_hf(cfg)
    n = len(prompt_lens)
    max_ctx = max(prompt_lens) + decode_steps + 1
    fms = [FastModel(m, max_pos=max_ctx + block_size) for m in (deq, pk)]
    caches = [FastCache(args, max_seqs=2 * n, num_blocks=n * -(-max_ctx // block_size), block_size=block_size,
                        max_ctx=max_ctx, max_tokens=sum(prompt_lens), device=device) for _ in fms]
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, args.vocab_size, (k,), generator=g).tolist() for k in prompt_lens]
    out: list[list[torch.Tensor]] = [[], []]
    dgs = []
    if graphs:
        from ds4f.runner.gpu.graphs import DecodeGraphs

        dgs = [DecodeGraphs(fm, cache, buckets=(1, 2, 4)) for fm, cache in zip(fms, caches)]

    def step(chunks: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        for k, (fm, cache, o) in enumerate(zip(fms, caches, out)):
            if dgs and all(len(c) == 1 for _, _, c in chunks):
                o.append(dgs[k].step([(2 * b, s, c[0]) for b, s, c in chunks]).clone())
                continue
            meta = cache.build_meta([(2 * b, s, c) for b, s, c in chunks], fm.ratios)
            o.append(fm.logits(fm.forward(meta, cache), meta))
        return out[0][-1]

    last = n - 1
    lg = step([(b, 0, prompts[b]) for b in range(last)] + [(last, 0, prompts[last][:first_chunk])])
    nxt = {b: int(lg[b].argmax()) for b in range(last)}
    lg = step([(last, first_chunk, prompts[last][first_chunk:])])
    nxt[last] = int(lg[0].argmax())
    at = dict(enumerate(prompt_lens))
    for _ in range(decode_steps):
        lg = step([(b, at[b], [nxt[b]]) for b in range(n)])
        for b in range(n):
            nxt[b], at[b] = int(lg[b].argmax()), at[b] + 1
    return out[0], out[1], fms[1]


def rel_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> torch.Tensor:
    e = torch.cat([(a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1) for a, b in zip(got, want)])
    assert not e.isnan().any(), "NaN in logits"
    return e.cpu()


def check_packed_only(fm: FastModel) -> None:
    """Routed experts: only packed bytes, in fused_moe_mxfp4's stacks that the modules' packed tensors view; no bf16
    expert stack; the attention projections that are fp8 in the checkpoint stay packed too."""
    model: Transformer = fm.model
    a = fm.args
    E, I, D = a.n_routed_experts, a.moe_intermediate_size, a.hidden_size
    for i, blk in enumerate(model.layers):
        mx = fm.mx[i]
        assert mx is not None and fm.w13[i] is None and fm.w2[i] is None
        assert mx.w13_q.dtype == torch.uint8 and mx.w2_q.dtype == torch.uint8
        assert mx.nbytes() == E * (3 * I * D // 2 + 3 * I * D // 32)  # e2m1 nibbles + one UE8M0 byte per 32
        for ex in blk.ffn.experts:
            for lin, stack in ((ex.w1, mx.w13_q), (ex.w3, mx.w13_q), (ex.w2, mx.w2_q)):
                assert lin.weight.is_meta and lin.packed_weight is not None
                assert lin.packed_weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
        # the shared expert: bf16 and small, or (DS4F_SHARED_FP8) on its packed fp8 tensors
        assert mx.shared_fp8 is not None or (mx.shared is not None and mx.shared[0].shape == (2 * I, D))
        att = blk.attn
        for lin in (att.wq_a, att.wkv, att.wq_b, att.wo_a, att.wo_b):
            assert is_packed(lin), lin
        assert isinstance(fm.w_in[i], InProj)
    big = E * I * D  # a dense copy of the routed experts would hold at least this many bf16 elements per layer
    held = [t for t in vars(fm).values() if isinstance(t, torch.Tensor)]
    held += [t for ts in (fm.w13, fm.w2) for t in ts if t is not None]
    assert all(t.numel() < big or t.dtype != torch.bfloat16 for t in held)


@pytest.mark.parametrize("name", ["tiny", "aligned"])
def test_packed_fast_model_matches_dequantized(tmp_path: Path, name: str) -> None:
    # tiny: no fp8 row count is a multiple of 128 (each fp8 input linear alone, wo_a group by group); aligned: wq_a +
    # wkv as one packed matrix, wo_a through fp8_grouped_linear
    cfg = all_hash(tiny_config() if name == "tiny" else aligned_config())
    want, got, fm = run_pair(cfg, tmp_path / name, "cpu")
    check_packed_only(fm)
    runs = [len(w.runs) for w in fm.w_in if isinstance(w, InProj)]
    if name == "aligned":  # SWA layer: one packed run; CSA / HCA: packed [wq_a; wkv] + the bf16 compressor run
        assert runs == [1, 2, 2, 2], runs
    err = rel_errors(got, want)
    assert len(want) == 8 and err.max() < TOL, err.tolist()


def test_shared_expert_on_packed_fp8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DS4F_SHARED_FP8=1: the FP8 shared expert runs through fp8_linear on its packed tensors (no bf16 copy) and is
    # added in fused_moe_mxfp4's final sum; the logits stay within the packed path's bound of the dequantized model
    monkeypatch.setattr(packed, "SHARED_FP8", True)
    want, got, fm = run_pair(all_hash(aligned_config()), tmp_path / "sh", "cpu")
    check_packed_only(fm)
    for mx in fm.mx:
        assert mx is not None and mx.shared is None and mx.shared_fp8 is not None
        w13, w2 = mx.shared_fp8
        assert all(r.s is not None for r in w13.runs) and is_packed(w2)  # e4m3 runs, no bf16 copy
    err = rel_errors(got, want)
    assert len(want) == 8 and err.max() < TOL, err.tolist()


def test_packed_fp8_experts_f32_scales(tmp_path: Path) -> None:
    # Flash-Base layout: FP8 routed experts, which fused_moe_mxfp4 cannot run, are dequantized into the bf16 stack;
    # the projections still run on their packed e4m3 + f32 block scales
    want, got, fm = run_pair(all_hash(aligned_config()), tmp_path / "f32", "cpu", scale_fmt="float")
    assert all(m is None for m in fm.mx) and all(w is not None and w.dtype == torch.bfloat16 for w in fm.w13)
    att = fm.model.layers[1].attn
    assert is_packed(att.wq_b) and att.wq_b.packed_scale is not None and att.wq_b.packed_scale.dtype == torch.float32
    err = rel_errors(got, want)
    assert err.max() < TOL, err.tolist()


def _f32(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    return (x.float() @ lin.weight.float().t()).to(x.dtype)


# Relative L2 error of one op against fp32 math on the dequantized weights: the same weight values, so only summation
# order and bf16 output rounding (2^-9 relative); a layout bug is O(1). The MoE adds the shared expert's output
# rounded to bf16 (the dequantized oracle sums it in fp32), and on CUDA that expert runs through the bf16 fused_moe
# kernel, which rounds each pick's weighted row to bf16 (tests/gpu/test_moe_gpu.py's bound, 1.5e-2). On CPU the
# fallbacks measured: linears 0 to 3e-8, MoE <= 2.9e-3.
OP_TOL = 5e-3
MOE_OP_TOL = 1.5e-2


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = OP_TOL) -> None:
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("name", ["tiny", "aligned"])
def test_packed_ops_match_dequantized(tmp_path: Path, name: str) -> None:
    check_ops(tiny_config() if name == "tiny" else aligned_config(), tmp_path / name, "cpu")


@torch.no_grad()
def check_ops(cfg: dict[str, Any], directory: Path, device: str, T: int = 7) -> None:
    """Each projection and the MoE of every layer, packed vs the dequantized weights in fp32, on random inputs."""
    d = write_checkpoint(directory, cfg, 3, quantized=True)
    deq = load_model(str(d), dtype=torch.bfloat16, device=device)
    fm = FastModel(load_model(str(d), dtype=torch.bfloat16, device=device, keep_dequantized=False), max_pos=64)
    a = fm.args
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16().to(device)

    for i, (bd, bp) in enumerate(zip(deq.layers, fm.model.layers)):
        x = rand(T, a.hidden_size)
        w_in = fm.w_in[i]
        assert isinstance(w_in, InProj)
        _close(w_in(x), torch.cat([_f32(lin, x) for lin in packed.in_linears(bd)], dim=1))
        qr = rand(T, a.q_lora_rank)
        _close(linear(bp.attn.wq_b, qr), _f32(bd.attn.wq_b, qr))
        if bp.attn.indexer is not None:
            _close(linear(bp.attn.indexer.wq_b, qr), _f32(bd.attn.indexer.wq_b, qr))
        o = rand(T, bp.attn.n_heads, bp.attn.head_dim)
        wa = bd.attn.wo_a.weight.float().view(a.o_groups, -1, bd.attn.wo_a.in_features)
        want = torch.einsum("tgk,gnk->tgn", o.float().view(T, a.o_groups, -1), wa).reshape(T, -1).bfloat16()
        _close(grouped_out(bp.attn.wo_a, o, a.o_groups), want)
        _close(glue.grouped_out(o, bd.attn.wo_a.weight.view(a.o_groups, -1, bd.attn.wo_a.in_features)), want)
        ob = rand(T, bp.attn.wo_b.in_features)
        _close(linear(bp.attn.wo_b, ob), _f32(bd.attn.wo_b, ob))
        # MoE: the packed stacks (+ bf16 shared expert) vs the dequantized experts with the shared one as expert E
        mx = fm.mx[i]
        assert mx is not None
        ids = torch.randint(0, a.n_routed_experts, (T, a.num_experts_per_tok), generator=g, dtype=torch.int32)
        wt = torch.rand(T, a.num_experts_per_tok, generator=g)
        exs = [*bd.ffn.experts, bd.ffn.shared_experts]
        w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in exs])
        w2 = torch.stack([e.w2.weight for e in exs])
        ids_e = torch.cat([ids, torch.full((T, 1), a.n_routed_experts, dtype=torch.int32)], dim=1).to(device)
        wt_e = torch.cat([wt, torch.ones(T, 1)], dim=1).to(device)
        ids, wt = ids.to(device), wt.to(device)
        # the shared expert as the model runs it: its bf16 copy inside the kernel, or (SHARED_FP8) fp8_linear's output
        sh = None if mx.shared_fp8 is None else packed.shared_fp8_out(mx.shared_fp8, x, a.swiglu_limit)
        _close(fused_moe_mxfp4(x, mx.w13_q, mx.w13_s, mx.w2_q, mx.w2_s, ids, wt, a.swiglu_limit, mx.shared,
                               shared_out=sh), fused_moe_ref(x, w13, w2, ids_e, wt_e, a.swiglu_limit), MOE_OP_TOL)


def test_llm_fast_runner_loads_packed(tmp_path: Path) -> None:
    """--runner fast on a quantized checkpoint loads packed-only (no dequantized copy) and generates the same greedy
    tokens as the reference runner on the dequantized load of the same files."""
    from ds4f import LLM, SamplingParams

    d = write_checkpoint(tmp_path, all_hash(tiny_config()), 3, quantized=True, scale_fmt="ue8m0")
    kw = dict(model=str(d), device="cpu", dtype="bfloat16", kv_cache_memory=16 << 20, block_size=16,
              max_num_batched_tokens=32, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    prompts = [[5, 17, 99, 1024, 77, 3, 4096, 12, 8, 8, 8, 600, 2, 19, 1280, 42, 43, 44], [7, 8, 9]]
    fast = LLM(runner="fast", **kw)
    model = fast.engine.runner.model
    assert any(is_packed(m) for m in model.modules() if isinstance(m, Linear))  # weight on meta: packed bytes only
    got = fast.generate(prompts, params)
    ref = LLM(runner="reference", **kw).generate(prompts, params)
    for g, r in zip(got, ref):
        for i, (a, b) in enumerate(zip(r.outputs[0].token_ids, g.outputs[0].token_ids)):
            top = sorted((x.logprob for x in r.outputs[0].logprobs[i].values()), reverse=True)
            if a != b:  # only at a reference near-tie (bf16 rounding of the shared expert, see TOL)
                assert top[0] - top[1] < 0.1, (i, top)
                break
            assert abs(r.outputs[0].logprobs[i][a].logprob - g.outputs[0].logprobs[i][b].logprob) < 0.1


def test_cols_views_match_concatenation() -> None:
    """InProj.cols hands out each linear's columns as views of its run's output: equal to slicing the concatenated
    output; a range across two runs is refused."""
    g = torch.Generator().manual_seed(0)
    ys = [torch.randn(3, 5, generator=g), torch.randn(3, 7, generator=g)]
    full = torch.cat(ys, dim=1)
    c = packed.Cols(ys)
    for a, b in [(0, 2), (2, 5), (5, 6), (6, 12)]:
        assert torch.equal(c.cols(a, b), full[:, a:b])
    assert all(torch.equal(p, q) for p, q in zip(c.split([2, 3, 4, 3]), full.split([2, 3, 4, 3], dim=1)))
    with pytest.raises(ValueError, match="straddle"):
        c.cols(4, 6)
