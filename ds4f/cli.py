"""CLI stage: `ds4f <subcommand> ...` argv in, the subcommand run (serve: an OpenAI-compatible HTTP server) out."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ds4f import __version__, tools


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from ds4f.server.args import _Formatter, add_serve_arguments

    p = argparse.ArgumentParser(prog="ds4f", description="Serve DeepSeek-V4-Flash yourself.")
    p.add_argument("--version", action="version", version=f"ds4f {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="OpenAI-compatible server, a drop-in for `vllm serve`",
                           formatter_class=_Formatter,
                           description="Serve DeepSeek-V4-Flash behind an OpenAI-compatible API "
                                       "(a drop-in for `vllm serve`: same flag names).")
    add_serve_arguments(serve)
    tools.register(sub)  # bench, eval, chat
    sub.add_parser("doctor", help="check this machine before serving: limits, /dev/shm, interfaces, RDMA, GPUs, "
                                  "the head's address", add_help=False)
    return p, serve


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, serve_parser = _parser()
    if argv and argv[0] in tools.COMMANDS:
        return tools.main(parser.parse_args(argv))
    if argv and argv[0] == "doctor":
        from ds4f.tools import doctor

        return doctor.main(argv[1:])
    if not argv or argv[0] != "serve":
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv)  # --help / --version / an unknown command (exits 2 naming it)
        return 2
    rest = argv[1:]
    from ds4f.server.args import ArgError, parse_serve_args

    try:
        settings = parse_serve_args(rest, serve_parser)
    except ArgError as e:
        serve_parser.print_usage(sys.stderr)
        print(f"ds4f serve: error: {e}", file=sys.stderr)
        return 2
    try:
        from ds4f.server.api import run_server
    except ModuleNotFoundError as e:
        print(f"ds4f serve: missing the Python package {e.name!r}; install the server with "
              "`pip install 'ds4f[serve]'`", file=sys.stderr)
        return 1
    return run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
