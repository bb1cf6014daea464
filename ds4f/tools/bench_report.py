"""Bench report stage: finished llama-benchy cases in, seed-style markdown tables and the results JSON out."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any


@dataclass
class Case:
    """One llama-benchy invocation: a (pp, tg, depth, concurrency) point of a sweep."""

    pp: int
    tg: int
    depth: int
    concurrency: int
    sweeps: list[str] = field(default_factory=list)  # "depth" and/or "concurrency"
    status: str = "pending"  # pending | ok | failed | interrupted
    error: str | None = None
    seconds: float | None = None
    result: dict[str, Any] | None = None  # llama-benchy's JSON entry for this point

    @property
    def key(self) -> str:
        return f"pp{self.pp}_tg{self.tg}_d{self.depth}_c{self.concurrency}"


def metric(case: Case, name: str) -> float | None:
    """Mean of a llama-benchy metric ({mean, std, values}) of the case, None when absent."""
    m = (case.result or {}).get(name)
    return float(m["mean"]) if isinstance(m, dict) and m.get("mean") is not None else None


def _num(v: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if v is None else f"{v * scale:,.{digits}f}"


def _status(case: Case) -> str:
    return "" if case.status == "ok" else f" ({case.status})"


def depth_table(cases: list[Case]) -> str:
    rows = sorted((c for c in cases if "depth" in c.sweeps), key=lambda c: c.depth)
    if not rows:
        return ""
    head = f"### Single request: pp{rows[0].pp} / tg{rows[0].tg} against depth\n\n"
    lines = ["| depth (tokens) | decode tok/s | TTFT (s) | prefill tok/s |", "|---:|---:|---:|---:|"]
    for c in rows:
        lines.append(f"| {c.depth:,}{_status(c)} | {_num(metric(c, 'tg_throughput'))} | "
                     f"{_num(metric(c, 'e2e_ttft'), 1e-3, 3)} | {_num(metric(c, 'pp_throughput'), digits=1)} |")
    return head + "\n".join(lines) + "\n"


def concurrency_table(cases: list[Case]) -> str:
    rows = sorted((c for c in cases if "concurrency" in c.sweeps), key=lambda c: (c.depth, c.concurrency))
    if not rows:
        return ""
    head = f"### Concurrency: pp{rows[0].pp} / tg{rows[0].tg}, aggregate decode against concurrency\n\n"
    lines = ["| concurrency | depth (tokens) | aggregate tok/s | per-request tok/s | TTFT (s) |",
             "|---:|---:|---:|---:|---:|"]
    for c in rows:
        lines.append(f"| {c.concurrency}{_status(c)} | {c.depth:,} | {_num(metric(c, 'tg_throughput'))} | "
                     f"{_num(metric(c, 'tg_req_throughput'))} | {_num(metric(c, 'e2e_ttft'), 1e-3, 3)} |")
    return head + "\n".join(lines) + "\n"


def markdown(cases: list[Case], info: dict[str, Any]) -> str:
    server = info["server"]
    parts = [f"## ds4f bench: {server['model']} at {server['base_url']}\n",
             f"llama-benchy {info['tools'].get('llama-benchy')}, {info['config']['runs']} run(s) per point, "
             f"latency mode {info['config']['latency_mode']}; max_model_len {server['max_model_len']}, depths "
             f"scaled to {info['config']['scale_len']:,}. Machine: {info['machine']['cpu']}"
             f"{', ' + info['machine']['gpu'] if info['machine']['gpu'] else ''}. Roofline fraction: "
             f"{server['roofline_fraction'] if server['roofline_fraction'] is not None else 'null'} "
             f"({server['roofline_note']}).\n"]
    parts += [t for t in (depth_table(cases), concurrency_table(cases)) if t]
    if not info.get("complete"):
        parts.append("*Partial results: the sweep did not finish.*\n")
    return "\n".join(parts)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = [g.strip() for g in out.splitlines() if g.strip()]
    return f"{len(gpus)}x {gpus[0]}" if gpus else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The host running the client (also the server's host when the server is on loopback)."""
    mem_gib = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "memory_gib": mem_gib, "gpu": _gpu(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": _version("torch"), "ds4f": _version("ds4f")}


def tool_versions() -> dict[str, str | None]:
    return {name: _version(name) for name in ("llama-benchy", "tool-eval-bench", "lm_eval")}


def write(out: Path, cases: list[Case], info: dict[str, Any]) -> None:
    """results.json and report.md, rewritten whole after every case (atomic rename)."""
    data = {**info, "cases": [asdict(c) | {"key": c.key} for c in cases]}
    for name, text in (("results.json", json.dumps(data, indent=2)), ("report.md", markdown(cases, info))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
