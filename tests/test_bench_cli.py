"""`ds4f bench`: sweep planning, a down server, and a --quick sweep against `ds4f serve` on the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ds4f.tools import bench
from ds4f.tools.endpoint import Endpoint, child_env, free_port, roofline

pytest.importorskip("llama_benchy")
pytest.importorskip("matplotlib")

SERVE_ARGS = "--tool-call-parser deepseek_v4 --enable-auto-tool-choice --reasoning-parser deepseek_v4"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_seed_depths_unscaled_at_1m_and_never_scaled_up() -> None:
    assert bench.scaled_depths(bench.SEED_DEPTHS, 1_000_000, 1024, 128) == list(bench.SEED_DEPTHS)
    assert bench.scaled_depths(bench.SEED_DEPTHS, 1_048_576, 1024, 128) == list(bench.SEED_DEPTHS)


def test_depths_scale_to_a_short_server_and_fit() -> None:
    got = bench.scaled_depths(bench.SEED_DEPTHS, 100_000, 1024, 128)
    assert got == [0, 24_000, 38_400, 51_200, 72_000, 98_000]
    tight = bench.scaled_depths(bench.SEED_DEPTHS, 8192, 1024, 128)
    assert max(tight) + 1024 + 128 + bench.TEMPLATE_SLACK <= 8192
    assert len(tight) == len(set(tight))


def test_full_plan_matches_the_seed_grid() -> None:
    cases = bench.plan(1_000_000, quick=False)
    depth = [(c.pp, c.tg, c.depth, c.concurrency) for c in cases if "depth" in c.sweeps]
    conc = [(c.pp, c.tg, c.depth, c.concurrency) for c in cases if "concurrency" in c.sweeps]
    assert depth == [(1024, 128, d, 1) for d in bench.SEED_DEPTHS]
    assert conc == [(2048, 128, d, c) for d in (0, 4096) for c in (1, 2, 4)]


def test_quick_plan_runs_the_shared_point_once() -> None:
    cases = bench.plan(1024, quick=True)
    keys = [c.key for c in cases]
    assert len(keys) == len(set(keys))
    shared = [c for c in cases if c.sweeps == ["depth", "concurrency"]]
    assert [(c.depth, c.concurrency) for c in shared] == [(0, 1)]


def test_roofline_read_from_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = Endpoint("http://x", "m", "m", 1024, {"version": "0.33.0", "ds4f_version": "0.1.0"})
    text = '# TYPE ds4f:decode_roofline_fraction gauge\nds4f:decode_roofline_fraction{model_name="m"} 0.42\n'
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text=text))
    assert roofline(ep) == (0.42, "/metrics ds4f:decode_roofline_fraction")
    monkeypatch.setattr(httpx, "get", lambda *a, **k: httpx.Response(200, text="vllm:num_requests_running 0\n"))
    value, note = roofline(ep)
    assert value is None and "not exposed" in note
    assert roofline(Endpoint("http://x", "m", "m", 1024, {"version": "0.33.0"}))[0] is None


def _bench(args: list[str], home: Path, **kw: object) -> subprocess.Popen[str]:
    env = child_env() | {"HOME": str(home)}  # llama-benchy's book cache lives under ~/.cache
    return subprocess.Popen([sys.executable, "-m", "ds4f", "bench", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def test_down_server_fails_fast_naming_url_and_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    p = _bench(["--base-url", url, "--out", str(tmp_path / "out")], tmp_path)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2, (out, err)
    assert time.monotonic() - t0 < 30
    assert url in err and "ds4f serve" in err and "--base-url" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "flag"), [(["--runs", "0"], "--runs"), (["ds4f-tiny", "--base-url", "http://x"],
                                                                          "--base-url"),
                                            (["--book", "/nonexistent.txt"], "--book")])
def test_bad_flags_name_the_flag(tmp_path: Path, args: list[str], flag: str) -> None:
    p = _bench(args, tmp_path)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and flag in err, err


@pytest.mark.slow
def test_quick_sweep_writes_tables_plots_and_json(server: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _bench(["--quick", "--base-url", f"{server}/v1", "--out", str(out)], tmp_path)
    stdout, err = p.communicate(timeout=240)
    assert p.returncode == 0, (stdout, err)
    planned = bench.plan(bench.QUICK_MAX_LEN, quick=True)
    report = (out / "report.md").read_text()
    assert "| depth (tokens) | decode tok/s | TTFT (s) | prefill tok/s |" in report
    assert "| concurrency | depth (tokens) | aggregate tok/s | per-request tok/s | TTFT (s) |" in report
    for c in planned:
        if "depth" in c.sweeps:
            assert f"\n| {c.depth:,} | " in report
    assert "\n| 2 | 0 | " in report
    assert report in stdout
    data = json.loads((out / "results.json").read_text())
    assert data["complete"] is True
    assert data["machine"]["cpu"] and data["machine"]["cpu_count"] and data["machine"]["torch"]
    assert data["server"]["model"] == "ds4f-tiny" and data["server"]["max_model_len"] > 0
    # read again after the sweep: the server's decode steps give a fraction (its /version key or /metrics gauge)
    assert data["server"]["roofline_fraction"] > 0 and "roofline_fraction" in data["server"]["roofline_note"]
    assert {c["key"] for c in data["cases"]} == {c.key for c in planned}
    for c in data["cases"]:
        assert c["status"] == "ok", c
        assert c["result"]["tg_throughput"]["mean"] > 0 and c["result"]["e2e_ttft"]["mean"] > 0
        assert c["result"]["pp_throughput"]["mean"] > 0  # --quick probes latency with GET /models (see bench)
    for name in ("decode_vs_depth.png", "ttft_vs_depth.png", "aggregate_vs_concurrency.png"):
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000
    seeded = list((tmp_path / ".cache" / "llama-benchy").glob("*.txt"))
    assert len(seeded) == 1 and seeded[0].read_text() == bench.REPO_BOOK.read_text()


@pytest.mark.slow
def test_model_mode_starts_a_server_and_ctrl_c_keeps_partial_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _bench(["ds4f-tiny", "--quick", "--serve-args", SERVE_ARGS, "--out", str(out)], tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        try:
            if any(c["status"] == "ok" for c in json.loads((out / "results.json").read_text())["cases"]):
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == 130, (stdout, err)
    data = json.loads((out / "results.json").read_text())
    statuses = [c["status"] for c in data["cases"]]
    assert data["complete"] is False and "ok" in statuses and statuses.count("pending") >= 1
    assert "Partial results" in (out / "report.md").read_text()
    port = int(data["server"]["base_url"].rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
