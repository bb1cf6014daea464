"""llama-benchy 0.4.0 (the pip package, unmodified) sweeps `ds4f serve` offline and prints its table."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ds4f.tools.bench import REPO_BOOK, default_tokenizer
from ds4f.tools.endpoint import LocalServer

pytest.importorskip("llama_benchy")

BOOK_URL = "https://www.gutenberg.org/files/1661/1661-0.txt"  # llama-benchy's default; served from the seeded cache


@pytest.mark.slow
def test_llama_benchy_sweep_offline(server: str, tmp_path: Path) -> None:
    cache = tmp_path / ".cache" / "llama-benchy"
    cache.mkdir(parents=True)
    (cache / f"{hashlib.md5(BOOK_URL.encode()).hexdigest()}.txt").write_text(REPO_BOOK.read_text())
    # Proxies pointing nowhere: any attempt to reach the network (book, HF hub) fails loudly instead of hanging.
    env = os.environ | {"HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9",
                        "NO_PROXY": "127.0.0.1,localhost"}
    # Latency mode api (GET /models): with "generation", a 1-token probe costs about as much as the tiny model's
    # whole 128-token prefill, so est_ppt can come out <= 0 and llama-benchy drops the pp row.
    cmd = [sys.executable, "-m", "llama_benchy", "--base-url", f"{server}/v1", "--model", "ds4f-tiny",
           "--tokenizer", str(default_tokenizer()), "--pp", "128", "--tg", "8", "--depth", "0", "256",
           "--concurrency", "1", "2", "--runs", "1", "--latency-mode", "api", "--skip-coherence"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "Loading text from cache" in out and "Downloading book" not in out
    assert "Falling back to 'gpt2'" not in out and "Error loading tokenizer" not in out
    # Warmup: the server counts the V4 chat template (BOS, turn markers, HIGH effort preamble) around the text.
    delta = re.search(r"Warmup \(User only\) complete\. Delta: (\d+) tokens \(Server: (\d+), Local: (\d+)\)", out)
    assert delta and int(delta.group(2)) > int(delta.group(3)), out
    table = re.sub(r" +", " ", out)  # tabulate pads cells to the column width
    header = ("| model | test | t/s (total) | t/s (req) | peak t/s | peak t/s (req) | ttfr (ms) | est_ppt (ms) | "
              "e2e_ttft (ms) |")
    assert header in table, out
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
             if line.startswith("| ds4f-tiny ")]
    rows = {c[1]: c[2:] for c in cells}  # test -> t/s (total), t/s (req), peak, peak (req), ttfr, est_ppt, e2e_ttft
    for test in ("pp128 (c1)", "tg8 (c1)", "pp128 (c2)", "tg8 (c2)", "pp128 @ d256 (c1)", "tg8 @ d256 (c1)",
                 "pp128 @ d256 (c2)", "tg8 @ d256 (c2)"):
        assert test in rows, (test, out)
        assert float(rows[test][0].split(" ± ")[0]) > 0, rows[test]  # t/s (total)
    for test in ("pp128 @ d256 (c1)", "pp128 @ d256 (c2)"):
        assert float(rows[test][4].split(" ± ")[0]) > 0, rows[test]  # ttfr (ms)
    assert "latency mode: api" in out


@pytest.mark.slow
def test_llama_benchy_exact_tg_and_no_cache(tmp_path: Path) -> None:
    # --exact-tg sends min_tokens + ignore_eos, --no-cache the unknown field cache_prompt. Until 12:23 on 2026-11-28,
    # min_tokens (and penalties, tool_choice required) killed the engine: in-place sampler writes into inference
    # tensors outside torch.inference_mode. Own server: a dying engine must not take the other test with it.
    cache = tmp_path / ".cache" / "llama-benchy"
    cache.mkdir(parents=True)
    (cache / f"{hashlib.md5(BOOK_URL.encode()).hexdigest()}.txt").write_text(REPO_BOOK.read_text())
    with LocalServer(None, "", log_path=tmp_path / "server.log", startup_timeout=300) as srv:
        cmd = [sys.executable, "-m", "llama_benchy", "--base-url", f"{srv.base_url}/v1", "--model", "ds4f-tiny",
               "--tokenizer", str(default_tokenizer()), "--pp", "64", "--tg", "8", "--runs", "1", "--latency-mode",
               "api", "--skip-coherence", "--exact-tg", "--no-cache", "--exit-on-first-fail"]
        p = subprocess.run(cmd, env=os.environ | {"HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert re.search(r"^\| ds4f-tiny \| +tg8 \| +\d", p.stdout, re.MULTILINE), p.stdout
    assert "500 Internal Server Error" not in (tmp_path / "server.log").read_text()
