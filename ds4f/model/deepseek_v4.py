"""⑥ model DeepSeek-V4 network: token ids + positions + AttnBatch in, 4-stream residual [T, hc, D] (and logits) out."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ds4f.model.args import ModelArgs
from ds4f.model.attention import Attention
from ds4f.model.cache import AttnBatch
from ds4f.model.layers import RMSNorm
from ds4f.model.linear import Linear
from ds4f.model.mhc import hc_head, hc_mix, hc_post
from ds4f.model.moe import MoE


def _fp32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)


class Block(nn.Module):
    """One decoder layer: mHC pre-mix -> attn_norm -> attention -> mHC post; mHC pre-mix -> ffn_norm -> MoE -> post."""

    def __init__(self, args: ModelArgs, layer: int, dtype: torch.dtype):
        super().__init__()
        self.layer_id, self.args = layer, args
        d, hc = args.hidden_size, args.hc_mult
        mix = (2 + hc) * hc
        self.attn_norm = RMSNorm(d, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, args.rms_norm_eps)
        self.attn = Attention(args, layer, dtype)
        self.ffn = MoE(args, layer, dtype)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = _fp32(mix, hc * d), _fp32(mix), _fp32(3)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = _fp32(mix, hc * d), _fp32(mix), _fp32(3)

    def _mix(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor,
             base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.args
        return hc_mix(x, fn, scale, base, a.hc_mult, a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                batch: AttnBatch) -> torch.Tensor:
        """x [T, hc, D] -> [T, hc, D]."""
        c, post, comb = self._mix(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        x = hc_post(self.attn(self.attn_norm(c), positions, batch), x, post, comb)
        c, post, comb = self._mix(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        return hc_post(self.ffn(self.ffn_norm(c), input_ids), x, post, comb)


class MTPBlock(Block):
    """Multi-token-prediction layer: (previous 4-stream residual at position i, token i+1) -> its own streams.

    H0[j] = h_proj(hnorm(X_i[j])) + e_proj(enorm(embed(tok_{i+1}))), the embedding zeroed at position 0; then one
    SWA block (main RoPE, learned routing). Logits through its own hc_head and norm and the shared head.
    """

    def __init__(self, args: ModelArgs, layer: int, dtype: torch.dtype):
        super().__init__(args, layer, dtype)
        d, hc = args.hidden_size, args.hc_mult
        self.e_proj = Linear(d, d, args.linear_format, dtype)
        self.h_proj = Linear(d, d, args.linear_format, dtype)
        self.enorm = RMSNorm(d, args.rms_norm_eps)
        self.hnorm = RMSNorm(d, args.rms_norm_eps)
        self.norm = RMSNorm(d, args.rms_norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _fp32(hc, hc * d), _fp32(hc), _fp32(1)
        self._embed: list[nn.Embedding] = []  # shared with the Transformer; a list so it is not a submodule

    def forward(self, prev_streams: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                batch: AttnBatch) -> torch.Tensor:
        """prev_streams [T, hc, D] (target's pre-hc_head residual), input_ids [T] = next tokens -> [T, hc, D]."""
        e = self._embed[0](input_ids)
        e = self.enorm(torch.where((positions == 0)[:, None], torch.zeros_like(e), e))
        x = self.h_proj(self.hnorm(prev_streams)) + self.e_proj(e).unsqueeze(1)
        return super().forward(x, input_ids, positions, batch)

    def compute_logits(self, streams: torch.Tensor, head: Linear) -> torch.Tensor:
        a = self.args
        h = hc_head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.hc_eps, a.rms_norm_eps)
        return head(self.norm(h)).float()


class Transformer(nn.Module):
    """DeepSeek-V4 main model; state_dict keys are the official checkpoint tensor names."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.args, self.dtype = args, dtype
        d, hc = args.hidden_size, args.hc_mult
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.embed = nn.Embedding(args.vocab_size, d, dtype=dtype)
            self.layers = nn.ModuleList(Block(args, i, dtype) for i in range(args.num_hidden_layers))
            self.norm = RMSNorm(d, args.rms_norm_eps)
            self.head = Linear(d, args.vocab_size, "bf16", dtype)
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _fp32(hc, hc * d), _fp32(hc), _fp32(1)
            self.mtp = nn.ModuleList(MTPBlock(args, args.num_hidden_layers + k, dtype)
                                     for k in range(args.num_nextn_predict_layers))
        for m in self.mtp:
            m._embed.append(self.embed)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 (per sequence: start_pos ..) -> streams [T, hc, D]."""
        x = self.embed(input_ids).unsqueeze(1).expand(-1, self.args.hc_mult, -1).contiguous()
        for layer in self.layers:
            x = layer(x, input_ids, positions, batch)
        return x

    def compute_logits(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [N, hc, D] -> logits [N, vocab] fp32 (hc_head -> norm -> head)."""
        a = self.args
        h = hc_head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.hc_eps, a.rms_norm_eps)
        return self.head(self.norm(h)).float()


@torch.no_grad()
def init_random_(model: Transformer, seed: int = 0) -> Transformer:
    """Deterministic random weights with realistic scales (unit-RMS activations, non-trivial routing, sinks, gates,
    Sinkhorn mixes and some SwiGLU clamping); for tests and weightless runs."""
    g = torch.Generator().manual_seed(seed)
    a = model.args

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if name == "embed.weight":
            normal(p, 1.0)
        elif leaf == "weight" and p.dim() == 1:  # RMSNorm weights
            normal(p, 0.1, 1.0)
        elif leaf == "weight":
            gain = 4.0 if parent in ("w1", "w3") else 1.0  # swiglu inputs occasionally beyond the clamp
            normal(p, gain / math.sqrt(p.shape[1]))
        elif leaf.endswith("_fn"):
            normal(p, 1.0 / math.sqrt(p.shape[1]))
        elif leaf.endswith("_base"):
            normal(p, 0.5)
            if p.numel() > a.hc_mult:  # comb bias leaning towards identity, like a trained residual
                p[2 * a.hc_mult:] += 2 * torch.eye(a.hc_mult).flatten()
        elif leaf.endswith("_scale"):
            normal(p, 0.2, 1.0)
        elif leaf == "attn_sink":
            normal(p, 1.0)
        elif leaf == "ape":
            normal(p, 0.5)
        elif leaf == "bias":
            normal(p, 0.1)
        else:
            raise AssertionError(f"init_random_: no rule for {name}")
    for name, buf in model.named_buffers():
        if name.endswith("tid2eid"):
            buf.copy_(torch.rand(buf.shape[0], a.n_routed_experts, generator=g).argsort(dim=-1)[:, : buf.shape[1]])
    return model


if __name__ == "__main__":
    from ds4f.model.args import tiny_config
    from ds4f.model.cache import DenseCache

    args = ModelArgs.from_hf(tiny_config())
    model = init_random_(Transformer(args), seed=0)
    ids = torch.randint(0, args.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    cache = DenseCache()
    with torch.inference_mode():
        streams = model(ids, torch.arange(40), AttnBatch([0, 40], [0], cache))
        logits = model.compute_logits(streams[-1:])
        nxt = logits.argmax(-1)
        step = model(nxt, torch.tensor([40]), AttnBatch([0, 1], [40], cache))
        mtp = model.mtp[0](streams, torch.cat([ids[1:], nxt]), torch.arange(40), AttnBatch([0, 40], [0], cache))
    n_params = sum(p.numel() for p in model.parameters())
    mtp_logits = model.mtp[0].compute_logits(mtp[-1:], model.head)
    print(f"tiny DeepSeek-V4: {n_params / 1e6:.1f}M params, streams {tuple(streams.shape)}, next token {nxt.item()}, "
          f"decode step {tuple(step.shape)}, mtp {tuple(mtp.shape)}, mtp logits {tuple(mtp_logits.shape)}")
