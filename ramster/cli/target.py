# What every node command shares: the --target/--timeout flags, the TLS flags (--tls-ca, and
# --tls-cert/--tls-key for a node that wants client certificates), --token or --token-file (else
# RAMSTER_TOKEN or RAMSTER_TOKEN_FILE: the bearer token of a node run with --tokens; a file or the
# environment keeps it out of `ps` and shell history, and it is never printed), the key flags
# (checked against the ranges a node serves, so a key out of range is a usage error before any
# call), and a client
# whose failures become one-line CliErrors that name the node ("127.0.0.1:7070: UNAVAILABLE: ...").
from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ramster.cli.errors import CliError
from ramster.client import Client, RamsterError
from ramster.wire import INDEX_LIMIT, OID_LIMIT, POOL_LIMIT

DEFAULT_TARGET = "127.0.0.1:7070"


def hostport(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _whole_number(minimum: int, what: str, below: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


nonnegative = _whole_number(0, "a number >= 0")
positive = _whole_number(1, "a positive number")
niceness = _whole_number(0, "a niceness from 0 to 19", 20)
pool_id = _whole_number(0, "a pool id in [0, 2**64)", POOL_LIMIT)
page_index = _whole_number(0, "a page index in [0, 2**32)", INDEX_LIMIT)
object_id = _whole_number(0, "an object id in [0, 2**64)", OID_LIMIT)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_tls(parser: argparse.ArgumentParser, again: bool = False) -> None:
    """--tls-ca, --tls-cert and --tls-key (see add_target for `again`)."""
    for flag, help in (
        ("--tls-ca", "the cluster CA (PEM): talk TLS and trust nodes it signed"),
        ("--tls-cert", "client certificate (PEM), for a node run with --tls-client-auth"),
        ("--tls-key", "the key of --tls-cert (PEM)"),
    ):
        default = argparse.SUPPRESS if again else None
        parser.add_argument(flag, default=default, metavar="PATH", help=help)


def tls_of(args: argparse.Namespace) -> dict[str, str | None]:
    """The TLS keyword arguments of Client/AsyncClient from the flags."""
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def add_target(parser: argparse.ArgumentParser, timeout: float = 10.0, again: bool = False) -> None:
    """--target, --timeout and the TLS flags.  `again` is for a sub-action of a command that has
    them already: there they default to nothing, so the command-level values stand unless
    given."""
    parser.add_argument(
        "--target",
        type=hostport,
        default=argparse.SUPPRESS if again else DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"the node's gRPC address (default {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        default=argparse.SUPPRESS if again else timeout,
        metavar="S",
        help=f"deadline of each call in seconds (default {timeout:g})",
    )
    add_tls(parser, again)
    add_token(parser, again)


def add_token(parser: argparse.ArgumentParser, again: bool = False) -> None:
    parser.add_argument(
        "--token",
        default=argparse.SUPPRESS if again else None,
        metavar="TOKEN",
        help="bearer token for a node run with --tokens (default: $RAMSTER_TOKEN)",
    )
    parser.add_argument(
        "--token-file",
        default=argparse.SUPPRESS if again else None,
        metavar="FILE",
        help="read the bearer token from FILE, as `ramster tokens` writes it "
        "(default: $RAMSTER_TOKEN_FILE)",
    )


def token_of(args: argparse.Namespace) -> str | None:
    """--token, else --token-file, else RAMSTER_TOKEN, else RAMSTER_TOKEN_FILE, else none."""
    token = getattr(args, "token", None)
    path = getattr(args, "token_file", None)
    if not token and not path:
        token = os.environ.get("RAMSTER_TOKEN")
        path = None if token else os.environ.get("RAMSTER_TOKEN_FILE")
    if token:
        return str(token)
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise CliError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise CliError(f"the token file {path} is empty")
    return token


def add_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", type=pool_id, required=True, help="pool id")
    parser.add_argument("--oid", type=object_id, required=True, help="object id")


@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Client]:
    """A client of --target; any RamsterError inside becomes a CliError naming the target."""
    try:
        with Client(
            args.target, timeout=args.timeout, token=token_of(args), **tls_of(args)
        ) as client:
            yield client
    except RamsterError as exc:
        raise CliError(f"{args.target}: {exc}") from None
