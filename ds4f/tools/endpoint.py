"""Endpoint stage: a base URL (or a model to serve locally) in, a checked OpenAI endpoint description out."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ds4f.tools import DEFAULT_BASE_URL


class EndpointDown(RuntimeError):
    """No usable OpenAI-compatible server at the URL; the message says how to start one."""


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # server root, no trailing /v1
    model_id: str  # what clients send as `model`
    root: str  # /v1/models `root` (HF repo id on vLLM), else the id
    max_model_len: int | None
    version: dict[str, Any] = field(default_factory=dict)

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def is_ds4f(self) -> bool:
        return "ds4f_version" in self.version


def server_root(base_url: str) -> str:
    """`http://h:p/v1/` and `http://h:p` both name the root `http://h:p`."""
    url = base_url.strip().rstrip("/")
    if not re.match(r"^https?://", url):
        raise ValueError(f"--base-url {base_url!r} is not an http(s) URL; give e.g. {DEFAULT_BASE_URL}")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def probe(base_url: str, *, api_key: str | None = None, model: str | None = None, timeout: float = 5.0,
          command: str = "ds4f") -> Endpoint:
    """GET /v1/models (and /version); raise EndpointDown naming the URL and the fix when nothing answers."""
    root = server_root(base_url)
    url = f"{root}/v1/models"
    hint = (f"Start a server first (`ds4f serve` for the built-in tiny model, `ds4f serve MODEL ...` or "
            f"`vllm serve MODEL ...`), or point {command} at one with --base-url URL.")
    try:
        r = httpx.get(url, headers=_headers(api_key), timeout=timeout)
    except httpx.HTTPError as e:
        raise EndpointDown(f"{command}: no server at {root} (GET {url} failed: {type(e).__name__}: {e}). "
                           f"{hint}") from e
    if r.status_code != 200:
        raise EndpointDown(f"{command}: GET {url} answered HTTP {r.status_code}: {r.text[:200]!r}. "
                           "Is it an OpenAI-compatible server (check --base-url and --api-key)?")
    try:
        data = r.json()["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise EndpointDown(f"{command}: GET {url} did not return an OpenAI model list. {hint}") from e
    if not data:
        raise EndpointDown(f"{command}: {url} lists no models. {hint}")
    ids = [m.get("id") for m in data]
    entry = data[0]
    if model is not None:
        matches = [m for m in data if m.get("id") == model]
        if not matches:
            raise EndpointDown(f"{command}: --model {model!r} is not served at {root} (it serves {ids}); "
                               "drop --model to use the first one.")
        entry = matches[0]
    mml = entry.get("max_model_len")
    version: dict[str, Any] = {}
    try:
        v = httpx.get(f"{root}/version", headers=_headers(api_key), timeout=timeout)
        if v.status_code == 200 and isinstance(v.json(), dict):
            version = v.json()
    except (httpx.HTTPError, ValueError):
        pass
    return Endpoint(base_url=root, model_id=str(entry["id"]), root=str(entry.get("root") or entry["id"]),
                    max_model_len=int(mml) if isinstance(mml, int | float) else None, version=version)


def roofline(endpoint: Endpoint, *, api_key: str | None = None) -> tuple[float | None, str]:
    """The server's reported fraction of the decode roofline, or None with the reason."""
    if not endpoint.is_ds4f:
        return None, "not a ds4f server (its /version has no ds4f_version)"
    for key, value in endpoint.version.items():
        if "roofline" in key and isinstance(value, int | float):
            return float(value), f"/version {key}"
    try:
        text = httpx.get(f"{endpoint.base_url}/metrics", headers=_headers(api_key), timeout=5.0).text
    except httpx.HTTPError as e:
        return None, f"GET /metrics failed: {e}"
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_:][\w:]*roofline[\w:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)\s*$", line)
        if m and m.group(3) != "NaN":
            return float(m.group(3)), f"/metrics {m.group(1)}"
    return None, "not exposed by this server yet: no '*roofline*' key in /version nor metric in /metrics"


def child_env() -> dict[str, str]:
    """os.environ with this ds4f's parent dir on PYTHONPATH, so `python -m ds4f` in a child finds the same package
    from a plain checkout as well as from an install."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """`ds4f serve MODEL ...` as a child process on a free loopback port, stopped on exit."""

    def __init__(self, model: str | None, serve_args: str = "", *, log_path: Path, startup_timeout: float = 900.0,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "ds4f", "serve", *([model] if model else []), *shlex.split(serve_args),
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env or child_env())
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise EndpointDown(f"`{shlex.join(self.cmd)}` exited with status {self.proc.returncode} before "
                                   f"serving; its log ({self.log_path}) ends with:\n{tail}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise EndpointDown(f"`{shlex.join(self.cmd)}` did not answer /health within {self.startup_timeout:.0f} s "
                           f"(log: {self.log_path}); raise --server-timeout for a large model.")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
