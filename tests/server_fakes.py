"""Server test helpers: a scripted FakeEngine (AsyncEngine API), an in-thread uvicorn, a `ds4f serve` subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import torch
import uvicorn

from ds4f.engine.request import CompletionOutput, RequestOutput
from ds4f.sample.sampler import Logprob
from ds4f.server.args import ServeSettings
from ds4f.tokenizer import load_tokenizer

THINK_START_ID, THINK_END_ID, EOS_ID = 128821, 128822, 1
_TOKENIZER = None


def tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = load_tokenizer()
    return _TOKENIZER


def weather_call(city: str = "Paris", days: int = 2) -> str:
    return ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
            f'<｜DSML｜parameter name="city" string="true">{city}</｜DSML｜parameter>\n'
            f'<｜DSML｜parameter name="days" string="false">{days}</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


class FakeEngine:
    """AsyncEngine's API over a script: reasoning (in thinking mode), then `Echo: <last user text>`, then EOS.

    A user text containing "weather" makes the reply a get_weather DSML call. Each step takes `step_s`; logits
    processors are applied to a one-hot preference for the scripted token, so a constraint can override it.
    """

    def __init__(self, max_model_len: int = 4096, step_s: float = 0.001, max_waiting: int | None = None) -> None:
        self.tokenizer = tokenizer()
        self.max_model_len = max_model_len
        self.model_args = None
        self.step_s = step_s
        self.healthy = True
        self.running: set[str] = set()
        self.aborted: set[str] = set()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.max_waiting = max_waiting
        self.shutdown_called = False
        self.last_prompt: list[int] = []
        self.last_params: Any = None
        self.finished: dict[str, str] = {}  # request id -> finish reason (abort included)

    def stats(self) -> dict[str, Any]:
        return {"num_running": len(self.running), "num_waiting": 0, "kv_usage": len(self.running) / 100,
                "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": self.generation_tokens_total, "num_preemptions": 0}

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.add(request_id)

    async def shutdown(self) -> None:
        self.shutdown_called = True

    def _prior(self) -> torch.Tensor:
        # when a processor masks the scripted token, prefer the longest allowed token (fewer steps per literal)
        if not hasattr(self, "_prior_t"):
            self._prior_t = torch.tensor([len(b) for b in self.tokenizer.all_token_bytes()], dtype=torch.float32) / 100
        return self._prior_t

    def script(self, prompt_ids: list[int]) -> str:
        text = self.tokenizer.decode(prompt_ids)
        user = text.rsplit("<｜User｜>", 1)[-1].split("<｜Assistant｜>", 1)[0]
        thinking = prompt_ids[-1] == THINK_START_ID
        reply = weather_call() if "weather" in user.lower() and "## Tools" in text else f"Echo: {user}"
        return ("Let me think.</think>" if thinking else "") + reply

    async def generate(self, request_id: str, prompt_ids: list[int], params: Any) -> AsyncIterator[RequestOutput]:
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_model_len {self.max_model_len}")
        target = self.tokenizer.encode(self.script(prompt_ids)) + [EOS_ID]
        self.last_prompt, self.last_params = list(prompt_ids), params
        self.running.add(request_id)
        self.prompt_tokens_total += len(prompt_ids)
        out_ids: list[int] = []
        text = ""
        stops = list(params.stop or [])
        try:
            for i in range(params.max_tokens or self.max_model_len - len(prompt_ids)):
                await asyncio.sleep(self.step_s)
                if request_id in self.aborted:
                    self.finished[request_id] = "abort"
                    yield RequestOutput(request_id, prompt_ids, [CompletionOutput(0, "", [], None, None, "abort")],
                                        True)
                    return
                tok = target[i] if i < len(target) else self.tokenizer.encode(" more")[0]
                if params.logits_processors:
                    logits = self._prior().clone()
                    logits[tok] = 10.0
                    for proc in params.logits_processors:
                        logits = proc(out_ids, logits)
                    tok = int(torch.argmax(logits))
                out_ids.append(tok)
                self.generation_tokens_total += 1
                finish, stop_reason = None, None
                if tok == EOS_ID and not params.ignore_eos:
                    finish, new_text = "stop", ""
                else:
                    full = self.tokenizer.decode(out_ids, skip_special_tokens=params.skip_special_tokens)
                    new_text = ""
                    if not full.endswith("\ufffd"):  # hold back a partial UTF-8 character
                        new_text, text = full[len(text):], full
                    for s in stops:
                        if s in text:
                            cut = text.index(s)
                            new_text = new_text[: max(0, len(new_text) - (len(text) - cut))]
                            finish, stop_reason = "stop", s
                            break
                    if finish is None and len(out_ids) >= (params.max_tokens or 1 << 30):
                        finish = "length"
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [{tok: Logprob(-0.25, 1, None), 2: Logprob(-3.0, 2, None)}]
                yield RequestOutput(request_id, prompt_ids,
                                    [CompletionOutput(0, new_text, [tok], None, logprobs, finish, stop_reason)],
                                    finish is not None)
                if finish is not None:
                    self.finished[request_id] = finish
                    return
        finally:
            self.finished.setdefault(request_id, "abort")
            self.running.discard(request_id)
            self.aborted.discard(request_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings(**kw: Any) -> ServeSettings:
    base: dict[str, Any] = dict(engine_kwargs={"block_size": 256}, served_model_names=["ds4f-test", "alias"],
                                model_root="ds4f-tiny", enable_auto_tool_choice=True, uvicorn_log_level="warning")
    base.update(kw)
    return ServeSettings(**base)


class ServerThread:
    """uvicorn in a background thread on a free loopback port; `url` is the root (no /v1)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(*flags: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ds4f", "serve", "--port", str(port), "--uvicorn-log-level", "warning", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ds4f serve exited with {proc.returncode}: {proc.stdout.read()}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ds4f serve did not become healthy in 90 s")
