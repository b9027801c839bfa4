# Tenants and bearer tokens of the client API (ramster.v1.Tmem).
#
# With --tokens FILE, every client call must carry `authorization: Bearer <token>` naming one of
# the file's tenants, or it fails with UNAUTHENTICATED before the servicer runs (health stays
# open; the peer API has its own mTLS).  The caller's tenant then travels to the servicer in a
# context variable (CALLER), set by the interceptor for the whole RPC, stream included.  Without
# a tokens file every caller is the open tenant "", as before, still under the pool limit
# (--max-pools), so 10,000 CreatePool calls cannot eat the node.
#
# A pool belongs to its tenant: the registry records the owner ("tenant:NAME", "" for the open
# tenant, "nbd:NAME" for an NBD export's pool), and another tenant's call on it answers NOT_FOUND
# exactly as for a pool that does not exist, so ids leak nothing.  Quotas per tenant: pools, and
# stored pages (0: no limit); past them, RESOURCE_EXHAUSTED.
#
# The file is TOML (or JSON, by its .json suffix) with one table per tenant:
#
#     [tenants.alice]
#     tokens = ["a-long-random-token-of-16+-characters"]
#     pools = 16        # optional: default --max-pools
#     pages = 1000000   # optional: default 0, no limit
#     operator = true   # optional: Stats shows it the node-wide counters
#
# Stats answers a tenant with its own pools and the pages they hold; the node-wide counters
# (pool size, puts, gets, hits, outcomes, remote traffic), which tell one tenant about the others'
# activity, only go to operator tenants (and to every caller without a tokens file).
#
# Per-client limits (open streams, node/interceptor.py; turns in the engine, node/fairness.py)
# count a caller as client_of(): its tenant with a tokens file, else its client address.
# Tokens are never kept in clear: the table is keyed by their SHA-256, so lookups compare
# digests (no timing oracle on the token) and a token never reaches a log line, an error message
# or a metric.  Trade-off: tokens are static (rotating one means editing the file and restarting).
from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_TOKEN = 16  # characters: shorter tokens are guessable
BEARER = "bearer "


@dataclass(frozen=True)
class Tenant:
    name: str  # "" is the open tenant (no tokens configured)
    max_pools: int
    max_pages: int = 0  # 0: no limit
    operator: bool = False  # sees the node-wide counters of Stats, not only its own pools

    @property
    def owner(self) -> str:
        """The owner recorded for this tenant's pools in the pool registry."""
        return f"tenant:{self.name}" if self.name else ""


CALLER: ContextVar[Tenant] = ContextVar("ramster_caller")


class Tenants:
    """Who may call the client API: by token digest, or everyone as `open`."""

    def __init__(self, open: Tenant, by_digest: dict[bytes, Tenant]) -> None:
        self.open = open
        self.by_digest = by_digest

    @property
    def required(self) -> bool:
        return bool(self.by_digest)

    def authenticate(self, metadata: Iterable[tuple[str, Any]]) -> Tenant | None:
        """The tenant whose token the call's metadata carries; without a tokens file the open
        tenant; None for a missing or unknown token."""
        if not self.required:
            return self.open
        for name, value in metadata:
            scheme = value[: len(BEARER)] if isinstance(value, str) else ""
            if name == "authorization" and scheme.lower() == BEARER:
                return self.by_digest.get(_digest(value[len(BEARER) :].strip()))
        return None


def client_of(tenant: Tenant, peer: str) -> str:
    """Who a call counts as for per-client limits: its tenant when it has one (a tokens file is
    in use), else its client address without the port (gRPC's peer: "ipv4:127.0.0.1:5555",
    "ipv6:[::1]:5555"); every caller over a Unix socket is one client, "local"."""
    return "tenant:" + tenant.name if tenant.name else address_of(peer)


def address_of(peer: str) -> str:
    """Who a call counts as by its address alone: the client address without the port, or
    "local" for every caller over a Unix socket."""
    return "address:" + peer.rpartition(":")[0] if peer.startswith("ipv") else "local"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
    return value


def _switch(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


def load_tenants(path: Path | None, max_pools: int) -> Tenants:
    """The tenants of a tokens file (see the header), or only the open tenant without one."""
    open_tenant = Tenant("", max_pools, operator=True)
    if path is None:
        return Tenants(open_tenant, {})
    try:
        raw = path.read_bytes()
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except OSError as exc:
        raise ValueError(f"cannot read the tokens file {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSON and TOML errors are ValueErrors
        raise ValueError(f"the tokens file {path} does not parse: {exc}") from None
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise ValueError(f"the tokens file {path} names no [tenants.NAME] table")
    by_digest: dict[bytes, Tenant] = {}
    for name, table in tenants.items():
        where = f"tokens file {path}: tenant {name!r}"
        if not isinstance(table, dict) or not name:
            raise ValueError(f"{where} must be a non-empty name with a table")
        unknown = set(table) - {"tokens", "pools", "pages", "operator"}
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        tenant = Tenant(
            name,
            _count(table.get("pools", max_pools), f"{where}: pools"),
            _count(table.get("pages", 0), f"{where}: pages"),
            _switch(table.get("operator", False), f"{where}: operator"),
        )
        tokens = table.get("tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"{where} needs tokens = [...]")
        for number, token in enumerate(tokens, 1):
            if not isinstance(token, str) or len(token.strip()) < MIN_TOKEN:
                raise ValueError(f"{where}: token {number} must have {MIN_TOKEN}+ characters")
            if by_digest.setdefault(_digest(token.strip()), tenant) is not tenant:
                raise ValueError(f"{where}: token {number} belongs to another tenant too")
    return Tenants(open_tenant, by_digest)
