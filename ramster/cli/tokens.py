# `ramster tokens`: a tokens file for `ramster-node --tokens` and one token file per tenant, so
# compose, Kubernetes and tests turn tenants on without hand-made secrets.
#
# Tokens are 32 random bytes from `secrets` (URL-safe base64, 43 characters), far above the
# node's 16-character minimum.  Every file is written with mode 0600 and never overwritten: a
# second run on the same --out is refused rather than silently rotating every client's token
# (compose guards it with `test -f`, as it does the certificates).  The tokens are printed to no
# terminal: clients read their own file (`--token-file`, or RAMSTER_TOKEN_FILE).
from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from ramster.certs import CertError, check_name
from ramster.cli.certs import names
from ramster.cli.errors import CliError
from ramster.cli.target import nonnegative


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new file only its owner can read (refusing to replace one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _tokens(args: argparse.Namespace) -> int:
    out: Path = args.out
    token_dir: Path = args.token_dir or out.parent / "tenants"
    if not args.tenants:
        raise CliError("--tenants names no tenant")
    try:
        tenants = [check_name(name) for name in args.tenants]
    except CertError as exc:
        raise CliError(str(exc)) from None
    if len(set(tenants)) != len(tenants):
        raise CliError("--tenants names a tenant twice")
    strangers = set(args.operators) - set(tenants)
    if strangers:
        raise CliError(f"--operators names {', '.join(sorted(strangers))}, not in --tenants")
    tokens = {name: secrets.token_urlsafe(32) for name in tenants}
    limits = "".join(
        f"{key} = {value}\n"
        for key, value in (("pools", args.pools), ("pages", args.pages))
        if value is not None
    )
    table = "".join(
        f'[tenants.{name}]\ntokens = ["{token}"]\n{limits}'
        + ("operator = true\n" if name in args.operators else "")
        + "\n"
        for name, token in tokens.items()
    )
    try:
        token_dir.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        taken = [p for p in [out, *(token_dir / f"{n}.token" for n in tenants)] if p.exists()]
        if taken:
            raise CliError(f"{taken[0]} exists: tokens are never overwritten (remove it first)")
        _write_private(out, f"# bearer tokens for ramster-node --tokens\n\n{table}")
        for name, token in tokens.items():
            _write_private(token_dir / f"{name}.token", token + "\n")
    except OSError as exc:
        raise CliError(f"cannot write tokens: {exc}") from None
    print(f"tokens file {out}   (ramster-node --tokens {out})")
    for name in tenants:
        print(f"tenant {name:<12} {token_dir / f'{name}.token'}")
    first = token_dir / f"{tenants[0]}.token"
    print(f"\nramster pools list --target HOST:7070 --tls-ca ca.crt --token-file {first}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "tokens",
        help="make a tokens file (ramster-node --tokens) with a random token per tenant",
        description="Write FILE, the node's tokens file (TOML, [tenants.NAME] tables), and "
        "DIR/NAME.token, the token of each tenant for its clients (--token-file).  Tokens are "
        "random (32 bytes), files have mode 0600, and nothing is ever overwritten.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the tokens file")
    p.add_argument("--tenants", type=names, required=True, metavar="NAME,...", help="tenant names")
    p.add_argument(
        "--token-dir",
        type=Path,
        metavar="DIR",
        help="where each tenant's token file goes (default: tenants/ beside FILE)",
    )
    p.add_argument(
        "--operators",
        type=names,
        default=[],
        metavar="NAME,...",
        help="tenants of --tenants that see the node-wide counters in Stats (operator = true)",
    )
    p.add_argument(
        "--pools", type=nonnegative, metavar="N", help="pools per tenant (default: --max-pools)"
    )
    p.add_argument(
        "--pages", type=nonnegative, metavar="N", help="stored pages per tenant (default: no limit)"
    )
    p.set_defaults(func=_tokens)
