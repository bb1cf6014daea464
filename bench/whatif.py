"""Timing-only variants of the decode step for bench_full.py --whatif NAME[,NAME]: each patches the fast runner before
the engine is built (so the CUDA graphs capture the variant) and makes the model's outputs WRONG; a record measured
under one says so (`whatif`), and none of them is a mode of the server. What they answer:

  no-compressor-gemv  the bf16 compressor projections of the packed attention input (the dense run beside the FP8
                      wq_a | wkv GEMV: CSA 2 x 1024 + 2 x 256 rows, HCA 2 x 512 rows, of 4096 columns, on every
                      rank) are not computed; only the indexer's weights_proj rows (64) are, the rest of the run's
                      output is a zero buffer. Bounds what computing the projections once per compressed window
                      (at its last token, for the window's rows) instead of once per token would save at decode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ds4f.model.args import flash_config

# the indexer's head weights (weights_proj, one row per indexer head): the last rows of a CSA layer's dense run
WEIGHTS_PROJ_ROWS = flash_config()["index_n_heads"]


def _no_compressor_gemv() -> None:
    from ds4f.kernels import gemv
    from ds4f.runner.gpu import packed

    zeros: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def dense_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n = w.shape[0]
        key = (x.shape[0], n, x.device)
        if key not in zeros:  # allocated on first use (the warm-up before capture), then reused: no launch
            zeros[key] = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
        out = zeros[key]
        if n % 128 == WEIGHTS_PROJ_ROWS:  # a CSA layer's run ends with weights_proj: the indexer reads it
            out[:, n - WEIGHTS_PROJ_ROWS:].copy_(gemv.linear(x, w[n - WEIGHTS_PROJ_ROWS:]))
        return out

    packed.InProj.dense_linear = staticmethod(dense_out)  # type: ignore[assignment]


WHATIFS: dict[str, Callable[[], None]] = {"no-compressor-gemv": _no_compressor_gemv}


def apply(names: str) -> list[str]:
    """Comma-separated names -> applied (in order); an unknown name raises SystemExit naming the known ones."""
    out = [n for n in names.split(",") if n]
    if unknown := [n for n in out if n not in WHATIFS]:
        raise SystemExit(f"--whatif: unknown {', '.join(unknown)}; known: {', '.join(WHATIFS)}")
    for n in out:
        WHATIFS[n]()
    return out
