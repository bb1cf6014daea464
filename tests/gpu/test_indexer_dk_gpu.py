"""The keys-major decode indexer (indexer._indexer_fwd KEYS_MAJOR, DS4F_INDEXER_DECODE_KM) on CUDA: T = 4 tokens over a
262,144-entry pool (one CSA layer at 1M), bf16 and e4m3 keys, bf16 and e4m3 queries, valid lengths from 0 to L,
against indexer_scores_ref and the heads-major kernel (the same -inf, the values within fp32 summation order), and
in a replayed CUDA graph with the fused first-digit histogram equal to the one counted from the scores it wrote."""

from __future__ import annotations

import pytest
import torch
from test_topk_small_gpu import indexer_inputs, sort_keys

from ds4f.kernels import HAS_TRITON, indexer_scores
from ds4f.kernels.index_q import quant_heads_fp8
from ds4f.kernels.ref import indexer_scores_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton"),
]

KM = [(128, 4, 4, 3), (64, 8, 4, 3), (256, 2, 8, 3)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return ((a[fin].double() - b[fin].double()).norm() / b[fin].double().norm()).item()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("km", KM)
def test_keys_major_decode_matches(fp8: bool, km: tuple[int, int, int, int]) -> None:
    T, L = 4, 262144
    q, w, keys, ks, slots, seq = indexer_inputs(11, T, L, fp8)
    qw = [(q, w)] + ([quant_heads_fp8(q)] if fp8 else [])
    for i, (qq, ww) in enumerate(qw):
        ww = ww if i == 0 else w * ww  # e4m3 q: its per-head scales fold into w
        for lens in ([L, L - 5, 8192, 0], [1, 300, 40000, 200000]):
            vl = torch.tensor(lens, dtype=torch.int32, device="cuda")
            got = indexer_scores(qq, ww, keys, slots, seq, vl, k_scale=ks, zero_rank=True, decode_km=km)
            hm = indexer_scores(qq, ww, keys, slots, seq, vl, k_scale=ks, zero_rank=True, decode_km=())
            assert _rel(got, hm) < 1e-5, (km, lens)
            ref = indexer_scores_ref(qq, ww, keys, slots, seq, vl, 128**-0.5, None if ks is None else ks[:, None])
            nz = torch.isfinite(ref) & (ref != 0)
            e_km, e_hm = (((o[nz] - ref[nz]).norm() / ref[nz].norm()).item() for o in (got, hm))
            assert e_km < max(1e-4, 1.05 * e_hm), (km, lens, e_km, e_hm)  # no further from it than heads-major


def test_keys_major_decode_hist_graph() -> None:
    T, L = 2, 262144
    q, w, keys, ks, slots, seq = indexer_inputs(12, T, L, True)
    q8, qs = quant_heads_fp8(q)
    vl = torch.zeros(T, dtype=torch.int32, device="cuda")
    buf = torch.zeros(T * 256, dtype=torch.int32, device="cuda")

    def run() -> torch.Tensor:
        buf.zero_()
        return indexer_scores(q8, w * qs, keys, slots, seq, vl, k_scale=ks, zero_rank=True, hist=buf,
                              decode_km=KM[0])

    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for lens in ([L, 9000], [8193, L - 3], [40000, 0]):
        vl.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        key = sort_keys(out)
        for r in range(T):
            fin = torch.isfinite(out[r])
            assert int(fin.sum()) == lens[r]
            want = torch.bincount(key[r][fin] >> 24, minlength=256)
            assert torch.equal(buf[r * 256:(r + 1) * 256].long(), want), lens
