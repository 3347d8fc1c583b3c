"""The `kvswap` command line: one argparse tree, one module per command group.

Each module in this package exposes `register(subparsers)` and sets `func` on its parsers; `main` parses,
calls it, prints its result (a dict) as JSON with --json or through its human renderer, and turns every
KvswapError into one line on stderr and a non-zero exit. torch is imported only inside commands that need
the engine, so `kvswap --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..protocol.errors import KvswapError

#: command-group modules, in the order `kvswap --help` lists them
_GROUPS = ("engine_cmds", "artifact_cmds", "node_cmds", "report_cmds", "pay_cmds", "config_cmds", "demo_cmds")


def default_home() -> Path:
    """The node's home: --home, else $KVSWAP_HOME, else ~/.kvswap (kvswap/home.py decides)."""
    from ..home import default_home_path

    return default_home_path()


def add_common(parser: argparse.ArgumentParser) -> None:
    """Flags every command takes: --home and --json."""
    parser.add_argument("--home", type=Path, default=None, help="node home directory (env KVSWAP_HOME)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def home_of(args: argparse.Namespace) -> Path:
    return Path(args.home) if getattr(args, "home", None) else default_home()


def emit(args: argparse.Namespace, result: Any, render: Callable[[Any], str] | None = None) -> None:
    """Print a command's result: JSON with --json, else the human rendering (or key: value lines)."""
    if result is None:
        return
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    elif render is not None:
        text = render(result)
        if text:
            print(text)
    elif isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    else:
        print(result)


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as every other failure is: one `error: ...` line and exit 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        print(f"error: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = Parser(
        prog="kvswap",
        description="Share LLM KV caches peer to peer: publish once, fetch, verify, generate without prefill.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    from ..version import __version__

    parser.add_argument("--version", action="version", version=f"kvswap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # a command group not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `kvswap ledger | head`: the reader left; that is not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush does not raise
        return 141  # 128 + SIGPIPE, as a shell reports a pipe's writer that stopped
    except KvswapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
