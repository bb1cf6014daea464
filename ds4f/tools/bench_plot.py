"""Bench plot stage: sweep cases in, PNGs (decode tok/s and TTFT vs depth, aggregate tok/s vs concurrency) out."""

from __future__ import annotations

from pathlib import Path

from ds4f.tools.bench_report import Case, metric


def plots(out: Path, cases: list[Case], title: str) -> list[Path]:
    """Write the plots that have at least one measured point; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: object, name: str) -> None:
        path = out / name
        fig.savefig(path, dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        written.append(path)

    depth = sorted((c for c in cases if "depth" in c.sweeps and c.status == "ok"), key=lambda c: c.depth)
    for name, key, scale, label in (("decode_vs_depth.png", "tg_throughput", 1.0, "decode tok/s"),
                                    ("ttft_vs_depth.png", "e2e_ttft", 1e-3, "TTFT (s)")):
        pts = [(c.depth, v * scale) for c in depth if (v := metric(c, key)) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("depth (context tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {label}, pp{depth[0].pp}/tg{depth[0].tg}, 1 request")
        ax.grid(True, alpha=0.3)
        save(fig, name)

    conc = [c for c in cases if "concurrency" in c.sweeps and c.status == "ok"]
    series: dict[int, list[tuple[int, float]]] = {}
    for c in sorted(conc, key=lambda c: c.concurrency):
        if (v := metric(c, "tg_throughput")) is not None:
            series.setdefault(c.depth, []).append((c.concurrency, v))
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for d, pts in sorted(series.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"depth {d:,}")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("aggregate decode tok/s")
        ax.set_xticks(sorted({c.concurrency for c in conc}))
        ax.set_title(f"{title}: aggregate tok/s, pp{conc[0].pp}/tg{conc[0].tg}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "aggregate_vs_concurrency.png")
    return written
