"""Chat stage: lines typed in a terminal in, streamed replies (reasoning dimmed, tool calls pretty-printed) out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ds4f.tools import DEFAULT_BASE_URL

HELP = ("/exit quits, /reset clears the history, /tool TEXT answers the pending tool calls with TEXT, "
        "/help shows this")


@dataclass
class Turn:
    """One streamed assistant reply, assembled from SSE deltas."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class Echo:
    """Prints streamed text as it arrives: reasoning dimmed, a line break where reasoning turns into content."""

    def __init__(self, console: Any, hide_reasoning: bool) -> None:
        self.console, self.hide_reasoning, self.last = console, hide_reasoning, ""

    def _print(self, text: str, kind: str) -> None:
        if self.last and self.last != kind:
            self.console.print()
        self.last = kind
        self.console.print(text, style="dim" if kind == "reasoning" else None, end="", markup=False, highlight=False)

    def reasoning(self, text: str) -> None:
        if not self.hide_reasoning:
            self._print(text, "reasoning")

    def content(self, text: str) -> None:
        self._print(text, "content")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("chat", help="chat with a server in the terminal (streams; reasoning dimmed)",
                       description=f"Terminal chat client for an OpenAI-compatible server. {HELP}.")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"server root or .../v1 (default {DEFAULT_BASE_URL})")
    p.add_argument("--model", default=None, help="served model name (default: the first /v1/models entry)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--tools", type=Path, default=None, help="JSON file with an OpenAI `tools` list to offer")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--reasoning-effort", default=None, help="none | low | high | max")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning")


def _merge_tool_delta(calls: list[dict[str, Any]], delta: dict[str, Any]) -> None:
    idx = delta.get("index", len(calls))
    while len(calls) <= idx:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[idx]
    call["id"] = delta.get("id") or call["id"]
    fn = delta.get("function") or {}
    call["function"]["name"] += fn.get("name") or ""
    call["function"]["arguments"] += fn.get("arguments") or ""


def stream_turn(client: Any, url: str, body: dict[str, Any], on_reasoning: Callable[[str], None],
                on_content: Callable[[str], None]) -> Turn:
    """POST a streamed chat completion and fold its SSE chunks into a Turn, echoing text as it arrives."""
    turn = Turn()
    with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            turn.error = f"HTTP {r.status_code}: {r.text[:500]}"
            return turn
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                turn.error = str(chunk["error"].get("message", chunk["error"]))
                continue
            for choice in chunk.get("choices", []):
                delta = choice.get("delta") or {}
                if text := delta.get("reasoning") or delta.get("reasoning_content"):
                    turn.reasoning += text
                    on_reasoning(text)
                if text := delta.get("content"):
                    turn.content += text
                    on_content(text)
                for tc in delta.get("tool_calls") or []:
                    _merge_tool_delta(turn.tool_calls, tc)
                turn.finish_reason = choice.get("finish_reason") or turn.finish_reason
    return turn


def render_tool_calls(console: Any, calls: list[dict[str, Any]]) -> None:
    from rich.panel import Panel
    from rich.syntax import Syntax

    for call in calls:
        raw = call["function"]["arguments"]
        try:
            args = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
        except ValueError:
            args = raw
        console.print(Panel(Syntax(args, "json", word_wrap=True), title=f"tool call: {call['function']['name']}",
                            subtitle=call["id"], expand=False))


def chat_loop(client: Any, url: str, model: str, args: argparse.Namespace, read: Callable[[], str],
              console: Any) -> list[dict[str, Any]]:
    """Read lines until /exit or EOF; returns the history (kept for the whole session)."""
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    tools = json.loads(args.tools.read_text()) if args.tools else None
    pending: list[dict[str, Any]] = []
    while True:
        try:
            line = read()
        except (EOFError, KeyboardInterrupt):
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if not text:
            continue
        if text == "/help":
            console.print(HELP)
            continue
        if text == "/reset":
            history = history[:1] if args.system else []
            pending = []
            console.print("[dim](history cleared)[/]")
            continue
        if text.startswith("/tool"):
            if not pending:
                console.print("[yellow]no tool calls are waiting for a result[/]")
                continue
            result = text[len("/tool"):].strip()
            history += [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": result}
                        for c in pending]
        elif text.startswith("/"):
            console.print(f"[yellow]unknown command {text.split()[0]}; {HELP}[/]")
            continue
        else:
            history.append({"role": "user", "content": text})
        pending = []
        body: dict[str, Any] = {"model": model, "messages": history}
        for key in ("max_tokens", "temperature", "reasoning_effort"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if tools:
            body["tools"] = tools
        echo = Echo(console, args.hide_reasoning)
        turn = stream_turn(client, url, body, on_reasoning=echo.reasoning, on_content=echo.content)
        console.print()
        if turn.error:
            console.print(f"[red]error: {turn.error}[/]")
            if history and history[-1]["role"] == "user":
                history.pop()
            continue
        if turn.tool_calls:
            render_tool_calls(console, turn.tool_calls)
            console.print("[dim](answer with /tool RESULT, or type a new message)[/]")
            pending = turn.tool_calls
        history.append(turn.message())
    return history


def main(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console

    from ds4f.tools.endpoint import EndpointDown, probe

    console = Console()
    try:
        ep = probe(args.base_url, api_key=args.api_key, model=args.model, command="ds4f chat")
    except (EndpointDown, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.tools is not None:
        try:
            ok = isinstance(json.loads(args.tools.read_text()), list)
        except (OSError, ValueError):
            ok = False
        if not ok:
            print(f"ds4f chat: error: --tools {args.tools}: give a readable JSON file holding a list of OpenAI tools",
                  file=sys.stderr)
            return 2
    console.print(f"[bold]{ep.model_id}[/] at {ep.base_url}. {HELP}.")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0), headers=headers) as client:
        chat_loop(client, f"{ep.v1}/chat/completions", ep.model_id, args, lambda: console.input("[bold]> [/]"),
                  console)
    return 0
