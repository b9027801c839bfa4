# Entry point of the `ramster` command: one argparse tree; each command module registers itself.
# User mistakes surface as one 'ramster: error: ...' line and exit status 2, never a traceback.
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ramster import __version__
from ramster.cli import bench, certs, corpus, demo, nbd, pages, pools, status, tokens
from ramster.cli.errors import CliError

COMMANDS = [demo, pages, pools, status, nbd, certs, tokens, corpus, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ramster",
        description="RAMster: a distributed, compressed memory service.",
    )
    parser.add_argument("--version", action="version", version=f"ramster {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        print(f"ramster: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ramster: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
