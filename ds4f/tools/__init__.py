"""Client-tools stage: `ds4f bench|eval|chat` argv (parsed by ds4f.cli) in, the chosen tool's exit status out."""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("bench", "eval", "chat")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the bench, eval (tools, ifeval) and chat subcommands; the heavy imports wait for main()."""
    from ds4f.tools import bench, chat_cli, eval_ifeval, eval_tools

    bench.register(sub)
    ev = sub.add_parser("eval", help="evals against a server: tool calling (tool-eval-bench) or IFEval",
                        description="Evaluate an OpenAI-compatible server.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)
    eval_tools.register(evsub)
    eval_ifeval.register(evsub)
    chat_cli.register(sub)


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ModuleNotFoundError as e:
        print(f"ds4f {args.command}: missing the Python package {e.name!r}; install the client tools with "
              "`pip install 'ds4f[bench]'`", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        from ds4f.tools import bench

        return bench.main(args)
    if args.command == "chat":
        from ds4f.tools import chat_cli

        return chat_cli.main(args)
    if args.eval_command == "tools":
        from ds4f.tools import eval_tools

        return eval_tools.main(args)
    from ds4f.tools import eval_ifeval

    return eval_ifeval.main(args)
