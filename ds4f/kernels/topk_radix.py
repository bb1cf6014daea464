"""⑥ kernels, the multi-program radix top-k of long rows (ds4f.kernels.indexer.topk_indices' passes): scores [T, L]
fp32 + per-row histograms / slot counters (zeroed by topk_small's launch) in, ids [T, k] int32 out.

8-bit digits of the order-preserving key (topk_small._sort_key), each a grid of (row, chunk) programs adding their
chunk's histogram of the keys that match the k-th's prefix so far into the row's histogram (`_topk_hist`). Then,
with a candidate buffer (cap > 0, the default): after two digits a grid pass writes the keys whose top 16 bits are
above the k-th's and copies the keys sharing them into the row's candidate buffer (`_topk_gather`), and one program
per row picks the krem still needed among them by their low 16 bits (`_topk_final`): in registers up to `lanes`
of them (~15 candidates for random scores at 262,144 entries), else from the buffer 2048 at a time up to its `cap`,
else by streaming the row (exact either way; the last is slow). lanes 0: four digit passes and a compaction pass
over the whole row (`_topk_select`), the former path. Atomics are relaxed: launch
boundaries order the passes. Measured and removed (session 12): the five phases in one launch with a row's programs
meeting at an arrival-counter barrier (slower: 65.4 vs 54.6 us at one token, 262,144 entries).
A decode step at 1M context runs this in each of 21 CSA layers (262,144 entries per row)."""

from __future__ import annotations

import os

import torch

from ds4f.kernels import pdl
from ds4f.kernels.knobs import env_knobs

try:
    import triton

    from ds4f.kernels.topk_radix_kernels import PICK_BLOCK, _topk_final, _topk_gather, _topk_hist, _topk_select
except ImportError:  # CPU-only installs: topk_indices runs its reference instead
    triton = None

# DS4F_TOPK_SPARSE_ADD (default 1; 0: every bin, A/B): a digit pass's program adds only its nonzero histogram bins
# (the scores of a row fall in a few top-byte bins, so most of a program's 256 adds are zeros, each one more atomic on
# the row's 256 shared counters); the same histograms. H200, one token at 1M (bench/kernel_times_long.py, session 15):
# indexer + top-512 + rows 49.3 vs 51.7 us, the two digit passes 11.6 vs 15.8 us
SPARSE_ADD = bool((env_knobs("DS4F_TOPK_SPARSE_ADD", 1, "1", minimum=0) or (1,))[0])
# DS4F_TOPK_FUSED_FINAL (default 1; 0: a launch of its own, A/B): the per-row pick runs in the gather launch, in the
# last of the row's programs to arrive, instead of one more launch in the decode chain of each CSA layer
FUSED_FINAL = bool((env_knobs("DS4F_TOPK_FUSED_FINAL", 1, "1", minimum=0) or (1,))[0])
# DS4F_TOPK_STATS=1 (diagnostics, off by default): each row's pick in the gather launch counts into a per-device int64
# buffer (picks, the sum and max of the candidates n sharing the k-th's top 16 bits, picks with n past the register
# lanes, past the buffer, the sum of krem); stats_line() reads and clears it (DS4F_TRACE_WORKER's lines print it)
STATS = os.environ.get("DS4F_TOPK_STATS", "0") == "1"
_STATS: dict[torch.device, torch.Tensor] = {}


def launch_passes(scores: torch.Tensor, valid_len: torch.Tensor | None, hist: torch.Tensor, cnt: torch.Tensor,
                  out: torch.Tensor, k: int, block: int, chunk: int, small: int, cand: torch.Tensor | None = None,
                  lanes: int = 0, cap: int = 0, first_level: int = 0,
                  rows: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, int, int]] | None = None) -> None:
    """The radix select of the rows past `small` valid entries into out [T, k] (hist [4 * T * 256] and cnt [2 * T]
    zeroed; first_level 1: the first digit's histogram already counted, by the indexer). lanes > 0 (a power of two;
    cand [T * 2 * cap] int32, cap >= lanes): two digit passes, the gather, one program per row (lanes: its register
    tile) in the gather's launch (FUSED_FINAL) or one of its own; lanes 0: the four digit
    passes, then the compaction. rows = (dst [T, W + k] int32, (bt_tok, win, comp_base, epb)), with the fused
    pick only: the gather launch also writes those rows' attention index lists (glue.topk_rows of their ids)."""
    T, L = scores.shape
    nb, n_chunks = 256, triton.cdiv(L, chunk)
    grid = (T, n_chunks)
    vl = valid_len if valid_len is not None else cnt
    common = dict(NB=nb, BLOCK=block, VLEN=valid_len is not None, SMALL=small, num_warps=4,
                  **pdl.launch(scores.device))
    for level in range(first_level, 2 if lanes else 4):
        _topk_hist[grid](scores, vl, hist, L, scores.stride(0), k, chunk, T * nb, LEVEL=level, SPARSE=SPARSE_ADD,
                         **common)
    if not lanes:
        _topk_select[grid](scores, vl, hist, cnt, out, L, scores.stride(0), k, chunk, T * nb, **common)
        return
    assert lanes & (lanes - 1) == 0 and cap >= lanes and cand is not None and cand.numel() >= T * 2 * cap
    fused = FUSED_FINAL
    assert fused or rows is None, "rows: with the pick fused into the gather launch only"
    if rows is None:
        dst, bt, win, base, epb, wp = out, out, out, 0, 1, 0
    else:
        dst, (bt, win, base, epb) = rows
        wp = win.shape[1]
        assert dst.shape == (T, wp + k) and dst.stride(1) == 1 and win.stride(1) == 1 and bt.stride(1) == 1
        assert wp & (wp - 1) == 0 and win.shape[0] == T
    st = stats_buffer(scores.device) if fused else None
    _topk_gather[grid](scores, vl, hist, cnt, out, cand, L, scores.stride(0), k, chunk, T * nb, cap, dst,
                       dst.stride(0), bt, bt.stride(0), win, win.stride(0), base, epb, FINAL=fused, NC=lanes,
                       ROWS=rows is not None, WP=wp, KP=triton.next_power_of_2(k),
                       st_ptr=cnt if st is None else st, STATS=st is not None, **common)
    if not fused:
        _topk_final[(T,)](scores, vl, hist, cnt, out, cand, L, scores.stride(0), k, T * nb, cap, NC=lanes,
                          **{**common, "BLOCK": PICK_BLOCK})


def stats_buffer(device: torch.device) -> torch.Tensor | None:
    """DS4F_TOPK_STATS: device's counters (made on the first launch outside a CUDA-graph capture: the decode graphs'
    warm-up), else None."""
    if not STATS:
        return None
    if device not in _STATS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _STATS[device] = torch.zeros(6, dtype=torch.int64, device=device)
    return _STATS[device]


def stats_line() -> str:
    """DS4F_TOPK_STATS' counters since the last call (cleared), one clause per device that picked; "" if none."""
    out = []
    for dev, buf in _STATS.items():
        picks, n_sum, n_max, past_lanes, past_cap, krem = buf.tolist()
        with torch.inference_mode():  # made in the model's inference mode: zeroed in it
            buf.zero_()
        if picks:
            out.append(f"top-k picks on {dev}: {picks}, candidates mean {n_sum / picks:.1f} max {n_max}, past the "
                       f"lanes {past_lanes}, past the buffer {past_cap}, still needed mean {krem / picks:.1f}")
    return "; ".join(out)


__all__ = ["launch_passes", "stats_line"]
