# Node settings: one dataclass, filled from flags > RAMSTER_* environment > TOML file > defaults.
#
# Each field declares its flag help and parser in its metadata, and the argparse tree, the
# environment names (RAMSTER_ + the field name in capitals) and the TOML keys (the field name,
# '-' or '_') are all derived from the fields, so a new setting (peers, replicas, ...) is one
# field.  Values from every source are text (or TOML scalars) run through the same parser, so a
# bad value gets the same message wherever it came from, naming its source.
from __future__ import annotations

import argparse
import grp
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ramster.nbd import Export
from ramster.zcache import ALLOCATORS, PAGE_SIZE
from ramster.zcache.config import default_pool_limit_frames

LOG_LEVELS = ("debug", "info", "warning", "error")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class SettingsError(ValueError):
    """A setting has a bad value or the config file cannot be read."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_hostport(text: str) -> HostPort:
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (port 0-65535), got {text!r}")
    return HostPort(host, int(port))


def parse_optional_hostport(text: str) -> HostPort | None:
    return parse_hostport(text) if str(text).strip() else None


@dataclass(frozen=True)
class UnixPath:
    """A Unix socket's path, for a listener that only processes of this host reach (and only
    those the socket file's mode lets in)."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


def parse_nbd_listen(text: str) -> HostPort | UnixPath | None:
    """HOST:PORT, unix:PATH, or nothing (empty)."""
    text = str(text).strip()
    if not text:
        return None
    if text.startswith("unix:"):
        if not text[5:]:
            raise ValueError("expected unix:PATH (a Unix socket's path), got 'unix:'")
        return UnixPath(Path(text[5:]))
    try:
        return parse_hostport(text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT or unix:PATH, got {text!r}") from None


def parse_size(text: str | int) -> int:
    """Bytes from '512M', '2Gi', '1048576' ...: K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"expected a size like 512M, 2Gi or 1048576, got {text!r}")
    number, unit = int(match[1]), (match[2] or "").lower()
    scale = 1024 ** " kmgt".index(unit[0]) if unit.endswith("i") else _UNITS[unit]
    size = number * scale
    if size < PAGE_SIZE:
        raise ValueError(f"a size must be at least one page ({PAGE_SIZE} bytes), got {text!r}")
    return size


def parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def parse_seconds(text: str | float) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"expected a non-negative number of seconds, got {text!r}")
    return value


def parse_peers(text: str | list[str]) -> tuple[HostPort, ...]:
    """Peer addresses from 'h1:p1,h2:p2' (or a TOML list); empty: no peers."""
    items = text if isinstance(text, list) else str(text).split(",")
    return tuple(parse_hostport(item.strip()) for item in items if str(item).strip())


def parse_count(low: int, high: int, what: str) -> Callable[[str | int], int]:
    """A parser of a whole number of `what` from `low` to `high`."""

    def parse(text: str | int) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected {low} to {high} {what}, got {text!r}")
        return value

    return parse


def parse_worker_threads(text: str | int | None) -> int | None:
    """--worker-threads: 0 to 64 threads, or auto (None: codec_threads() picks)."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    try:
        return parse_count(0, 64, "threads")(text)
    except ValueError:
        raise ValueError(f"expected 0 to 64 threads or auto, got {text!r}") from None


def parse_stream_count(text: str | int) -> int:
    value = int(text)
    if not 1 <= value <= 1 << 16:
        raise ValueError(f"expected 1 to 65536 streams, got {text!r}")
    return value


def parse_positive_seconds(text: str | float) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    return value


def parse_optional_size(text: str | int) -> int:
    return 0 if str(text).strip() in ("", "0") else parse_size(text)


def parse_path(text: str) -> Path:
    return Path(str(text)).expanduser()


def parse_optional_path(text: str) -> Path | None:
    return parse_path(text) if str(text) else None


def parse_group(text: str | int) -> int | None:
    """A group's id, from its name or number; None for empty."""
    value = str(text).strip()
    if not value:
        return None
    if value.isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"no group named {value!r} on this host") from None


def parse_switch(text: str | bool) -> bool:
    value = str(text).strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("1", "true", "yes", "on")


def parse_name(text: str) -> str:
    if not str(text).strip():
        raise ValueError("expected a non-empty name")
    return str(text).strip()


NBD_WORKERS = 2  # codec worker threads of a node that serves NBD, unless told (node/engine.py)
MAX_EXPORT_SIZE = (1 << 63) - PAGE_SIZE  # the largest size libnbd and qemu read as positive


def parse_nbd_exports(text: str | list[str]) -> tuple[Export, ...]:
    """NBD exports from NAME:SIZE items (repeated flags, a TOML list, or comma-separated)."""
    items = text if isinstance(text, list) else str(text).split(",")
    exports = []
    for item in (str(i).strip() for i in items if str(i).strip()):
        name, sep, size = item.rpartition(":")
        if not sep or not export_name_ok(name):
            raise ValueError(f"expected NAME:SIZE (a name of 1 to 256 bytes), got {shown(item)}")
        try:
            length = parse_size(size)
        except ValueError as exc:
            raise ValueError(f"export {name!r}: {exc}") from None
        if length % PAGE_SIZE:
            raise ValueError(f"the size of export {name!r} must be a multiple of {PAGE_SIZE}")
        if length > MAX_EXPORT_SIZE:  # NBD clients take a size as a signed 64-bit number
            raise ValueError(
                f"the size of export {name!r} must be at most {MAX_EXPORT_SIZE} bytes "
                f"(2**63 less a block), got {size!r}"
            )
        exports.append(Export(name, length))
    if len({e.name for e in exports}) < len(exports):
        raise ValueError("two NBD exports have the same name")
    return tuple(exports)


def parse_nbd_drops(text: str | list[str]) -> tuple[str, ...]:
    """Export names from repeated flags, a TOML list, or comma-separated, each once."""
    items = text if isinstance(text, list) else str(text).split(",")
    names = tuple(dict.fromkeys(str(i).strip() for i in items if str(i).strip()))
    for name in names:
        if not export_name_ok(name):
            raise ValueError(f"expected an export name of 1 to 256 bytes, got {shown(name)}")
    return names


def export_name_ok(name: str) -> bool:
    """An NBD export name as the node takes it: 1 to 256 bytes, no NUL."""
    return bool(name) and "\0" not in name and len(name.encode()) <= 256


def shown(text: str) -> str:
    """`text` quoted for an error message, cut at 80 characters."""
    return repr(text) if len(text) <= 80 else f"{text[:80]!r}..."


def parse_nbd_allow(text: str | list[str]) -> tuple[tuple[str, str], ...]:
    """(export, client) pairs from EXPORT=CLIENT items (repeated flags, a TOML list, or
    comma-separated)."""
    items = text if isinstance(text, list) else str(text).split(",")
    pairs = []
    for item in (str(i).strip() for i in items if str(i).strip()):
        export, sep, client = item.rpartition("=")
        if not sep or not export or not client.strip() or any(c.isspace() for c in client):
            raise ValueError(f"expected EXPORT=CLIENT (a client certificate's name), got {item!r}")
        pairs.append((export, client))
    return tuple(pairs)


def meta(
    parse: Callable[[Any], Any],
    help: str,
    metavar: str,
    repeat: bool = False,
    switch: bool = False,
    shown: str | None = None,
) -> dict[str, Any]:
    """Field metadata of a setting: how its text is parsed and how --help shows it (`shown`:
    its default, where the value itself would not say it); a `repeat` flag may be given more
    than once (its parser gets the list); a `switch` flag takes no value (its presence means
    "true"; the environment and TOML say true or false)."""
    return {
        "parse": parse,
        "help": help,
        "metavar": metavar,
        "repeat": repeat,
        "switch": switch,
        "shown": shown,
    }


@dataclass(frozen=True)
class Settings:
    listen: HostPort = field(
        default=HostPort("127.0.0.1", 7070),
        metadata=meta(
            parse_hostport,
            "gRPC address; port 0 picks a free port (logged, and written to --port-file)",
            "HOST:PORT",
        ),
    )
    metrics_listen: HostPort | None = field(
        default=HostPort("127.0.0.1", 9170),
        metadata=meta(
            parse_optional_hostport,
            "Prometheus metrics address; port 0 picks a free port; empty disables metrics",
            "HOST:PORT",
        ),
    )
    data_dir: Path = field(
        default=Path("ramster-data"),
        metadata=meta(parse_path, "directory for the node's files", "PATH"),
    )
    pool_limit: int = field(
        default_factory=lambda: default_pool_limit_frames() * PAGE_SIZE,
        metadata=meta(
            parse_size,
            "memory for compressed pages, in bytes; K/M/G are powers of 1000, Ki/Mi/Gi of 1024 "
            "(default: a quarter of RAM)",
            "SIZE",
        ),
    )
    allocator: str = field(
        default="zsmalloc",
        metadata=meta(
            parse_choice(ALLOCATORS), "allocator of pools that name none", "zbud|zsmalloc"
        ),
    )
    node_id: str = field(
        default_factory=socket.gethostname,
        metadata=meta(parse_name, "name of this node (default: the hostname)", "NAME"),
    )
    log_level: str = field(
        default="info", metadata=meta(parse_choice(LOG_LEVELS), "log level", "|".join(LOG_LEVELS))
    )
    grace: float = field(
        default=10.0,
        metadata=meta(
            parse_seconds, "seconds that in-flight RPCs get to finish on SIGTERM/SIGINT", "SECONDS"
        ),
    )
    peer_listen: HostPort | None = field(
        default=None,
        metadata=meta(
            parse_optional_hostport,
            "address of the peer API (ramster.v1.Peer), served with --peers or when set (a node "
            "others may join); default: the --listen host and its port + 1000 (7070: 8070; "
            "port 0: a free port)",
            "HOST:PORT",
        ),
    )
    peers: tuple[HostPort, ...] = field(
        default=(),
        metadata=meta(
            parse_peers,
            "seed addresses of the cluster's peer APIs, comma-separated: the node joins the "
            "members it learns from them (one running node is enough; the same list on every "
            "node works, a node skips itself; a DNS name in front of several nodes, such as a "
            "headless Service, works too); empty, and no --peer-listen: a single node",
            "HOST:PORT,...",
        ),
    )
    peer_advertise: HostPort | None = field(
        default=None,
        metadata=meta(
            parse_optional_hostport,
            "where other nodes reach this node's peer API, as told to them; default: the "
            "--peer-listen address, or this host's name at its port when it listens on all "
            "addresses",
            "HOST:PORT",
        ),
    )
    forget_after: float = field(
        default=60.0,
        metadata=meta(
            parse_positive_seconds,
            "seconds a member stays down before it is forgotten (at once if it left "
            "gracefully), once no page depends on it",
            "SECONDS",
        ),
    )
    replicas: int = field(
        default=2,
        metadata=meta(
            parse_count(1, 8, "replicas"),
            "copies of each page parked on peers (on peers, or on peers plus the backing file)",
            "N",
        ),
    )
    foreign_limit: int = field(
        default_factory=lambda: default_pool_limit_frames() * PAGE_SIZE,
        metadata=meta(
            parse_size,
            "memory for pages held for peers, apart from the pool (default: a quarter of RAM)",
            "SIZE",
        ),
    )
    backing_limit: int = field(
        default=0,
        metadata=meta(
            parse_optional_size,
            "largest size of the backing file, whose room to save RAM at a stop counts too (so "
            "it also bounds the persistent pages RAM takes); 0: no limit",
            "SIZE",
        ),
    )
    heartbeat_interval: float = field(
        default=0.5,
        metadata=meta(parse_positive_seconds, "seconds between heartbeats to peers", "SECONDS"),
    )
    down_after: float = field(
        default=3.0,
        metadata=meta(
            parse_positive_seconds, "seconds of silence before a peer is marked down", "SECONDS"
        ),
    )
    worker_threads: int | None = field(
        default=None,
        metadata=meta(
            parse_worker_threads,
            "threads that compress and decompress big batches beside the event loop; 0: on the "
            "loop, in slices (best for single-get latency under bulk load); auto (unset): "
            f"{NBD_WORKERS} (at most the cores the node may use; 0 on one core) for a node that "
            "serves NBD exports, whose big requests they speed up, else 0",
            "N|auto",
            shown="auto",
        ),
    )
    peer_timeout: float = field(
        default=1.0,
        metadata=meta(
            parse_positive_seconds,
            "deadline of a call to a peer (a frozen peer costs this, then the next copy is used)",
            "SECONDS",
        ),
    )
    port_file: Path | None = field(
        default=None,
        metadata=meta(
            parse_optional_path,
            'write {"port": N, "peer_port": P, "metrics_port": M} to this file once listening',
            "PATH",
        ),
    )
    nbd_listen: HostPort | UnixPath | None = field(
        default=None,
        metadata=meta(
            parse_nbd_listen,
            "NBD (block device) address: HOST:PORT, or unix:PATH for a Unix socket that only "
            "the node's user (and root) may connect to (mode 0600), for qemu or nbd-client on "
            "this host; with --tls-* clients must use TLS (STARTTLS, nbds://), "
            "without it TCP only on loopback unless --insecure; port 0 picks a free port "
            "(logged); empty: no NBD",
            "ADDRESS",
        ),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=meta(
            parse_optional_path,
            "this node's certificate (PEM; `ramster certs` makes one): TLS on the client "
            "and NBD listeners, mTLS on the peer listener, and what the node shows its peers",
            "PATH",
        ),
    )
    tls_key: Path | None = field(
        default=None,
        metadata=meta(parse_optional_path, "the private key of --tls-cert (PEM)", "PATH"),
    )
    tls_ca: Path | None = field(
        default=None,
        metadata=meta(
            parse_optional_path,
            "the cluster CA (PEM): peers (and, with --tls-client-auth, clients) must show a "
            "certificate it signed",
            "PATH",
        ),
    )
    tls_client_auth: bool = field(
        default=False,
        metadata=meta(
            parse_switch,
            "clients (gRPC and NBD) too must show a certificate signed by --tls-ca",
            "",
            switch=True,
        ),
    )
    insecure: bool = field(
        default=False,
        metadata=meta(
            parse_switch,
            "allow listening on non-loopback addresses without TLS (protected mode is off)",
            "",
            switch=True,
        ),
    )
    nbd_socket_group: int | None = field(
        default=None,
        metadata=meta(
            parse_group,
            "with --nbd-listen unix:PATH, this group (name or number) may connect too: the "
            "socket is made mode 0660 and given to it (e.g. the group qemu runs in); empty: "
            "the node's user only",
            "GROUP",
        ),
    )
    nbd_export: tuple[Export, ...] = field(
        default=(),
        metadata=meta(
            parse_nbd_exports,
            "an NBD export of SIZE bytes backed by a persistent pool, with a map of its blocks "
            "in the data directory (256 KiB per GiB, so blocks lost in a crash read as I/O "
            "errors, not zeros); repeat the flag for more (comma-separated in the environment)",
            "NAME:SIZE",
            repeat=True,
        ),
    )
    nbd_max_connections: int = field(
        default=64,
        metadata=meta(
            parse_count(1, 1 << 16, "connections"),
            "NBD connections served at once (and as many still negotiating); past it a new one "
            "is closed (logged and counted).  Each served one may make the node hold up to ~80 "
            "MiB of its input (a 32 MiB write payload, requests queued behind it, and the input "
            "buffers it reuses while busy), so this bounds what clients can pin in its memory",
            "N",
        ),
    )
    nbd_read_wait: float = field(
        default=15.0,
        metadata=meta(
            parse_seconds,
            "how long a READ waits for pages whose every copy is out of reach (their peers "
            "frozen, cut off or restarting) before it fails with EIO, asking again every "
            "quarter second; a kernel swapping to the export kills the process whose page "
            "fails, while a page gone for good costs each read the whole wait; keep it under "
            "nbd-client's -t timeout if one is set; 0: fail at once",
            "SECONDS",
        ),
    )
    nbd_drop: tuple[str, ...] = field(
        default=(),
        metadata=meta(
            parse_nbd_drops,
            "free the pages of export NAME, which --nbd-export no longer declares, at start: "
            "its pool goes, in RAM, on peers and on disk; repeat the flag for more "
            "(comma-separated in the environment); a name that holds nothing is logged and "
            "skipped, so the flag may stay after the drop",
            "NAME",
            repeat=True,
        ),
    )
    nbd_allow: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata=meta(
            parse_nbd_allow,
            "let CLIENT (a client certificate's name, as `ramster certs --clients` makes them) "
            "use EXPORT: an export named here serves the clients named for it only, to others "
            "it does not exist; one never named serves every client with a certificate; repeat "
            "the flag for more (comma-separated in the environment); needs TLS and "
            "--tls-client-auth",
            "EXPORT=CLIENT",
            repeat=True,
        ),
    )
    tokens: Path | None = field(
        default=None,
        metadata=meta(
            parse_optional_path,
            "tenants and their bearer tokens (TOML, or JSON by a .json suffix: [tenants.NAME] "
            "tokens = [...], pools = N, pages = N); client calls without a valid "
            "'authorization: Bearer TOKEN' get UNAUTHENTICATED, and a pool is seen by its "
            "tenant only; none: every client is one tenant",
            "FILE",
        ),
    )
    max_pools: int = field(
        default=1024,
        metadata=meta(
            parse_count(1, 1 << 16, "pools"),
            "pools one tenant may have (every client, without --tokens); a tenant's 'pools' "
            "in the tokens file overrides it; past it CreatePool is RESOURCE_EXHAUSTED",
            "N",
        ),
    )

    max_connections: int = field(
        default=1024,
        metadata=meta(
            parse_count(1, 1 << 16, "connections"),
            "gRPC connections the client port holds at once, and as many the peer port; past "
            "it a new one is closed as soon as it is accepted, so clients that open connections "
            "and leave them half done cannot use up the node's file descriptors",
            "N",
        ),
    )
    max_streams: int = field(
        default=64,
        metadata=meta(
            parse_stream_count,
            "client streams one client may have open at once (a tenant with --tokens, a client "
            "address without), and peer API streams one peer address may; past it a new stream "
            "is RESOURCE_EXHAUSTED",
            "N",
        ),
    )


def clustered(settings: Settings) -> bool:
    """Whether the node takes part in a cluster: it has seeds, or serves the peer API so that
    nodes started later can join it."""
    return bool(settings.peers) or settings.peer_listen is not None


def advertised(settings: Settings, port: int) -> str:
    """The peer address other nodes are told, once the peer listener is bound to `port`."""
    if settings.peer_advertise is not None:
        return str(settings.peer_advertise)
    host = peer_address(settings).host
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return str(HostPort(host, port))


def peer_address(settings: Settings) -> HostPort:
    """Where the peer API listens: --peer-listen, else the --listen host at port + 1000."""
    if settings.peer_listen is not None:
        return settings.peer_listen
    listen = settings.listen
    port = listen.port + 1000 if listen.port else 0
    if port > 65535:
        raise ValueError(f"--listen {listen} leaves no default peer port: set --peer-listen")
    return HostPort(listen.host, port)


def env_name(name: str) -> str:
    return "RAMSTER_" + name.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unset flags stay out of the namespace (argparse.SUPPRESS)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of settings, keys named like the flags [env RAMSTER_CONFIG]",
    )
    for f in fields(Settings):
        shown = f.metadata["shown"] or f.default or "none"
        default = "" if f.default is MISSING else f"; default {shown}"
        if f.metadata["switch"]:
            parser.add_argument(
                _flag(f.name),
                dest=f.name,
                default=argparse.SUPPRESS,
                action="store_const",
                const="true",
                help=f"{f.metadata['help']} [env {env_name(f.name)}=true]",
            )
            continue
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            default=argparse.SUPPRESS,
            action="append" if f.metadata["repeat"] else "store",
            metavar=f.metadata["metavar"],
            help=f"{f.metadata['help']} [env {env_name(f.name)}{default}]",
        )


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Settings)}
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return values


def resolve(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Settings from explicit flags (by field name), then the environment, then a TOML file
    (--config, else RAMSTER_CONFIG), then defaults."""
    env = os.environ if env is None else env
    names = [f.name for f in fields(Settings)]
    config_file = config_file or env.get("RAMSTER_CONFIG") or None
    layers: list[tuple[Callable[[str], str], Mapping[str, Any]]] = [
        (lambda n: f"flag {_flag(n)}", flags),
        (
            lambda n: f"environment {env_name(n)}",
            {n: env[env_name(n)] for n in names if env_name(n) in env},
        ),
    ]
    if config_file:
        layers.append((lambda n: f"config file {config_file}: {n}", _read_toml(config_file)))
    chosen: dict[str, Any] = {}
    for f in fields(Settings):
        source = next(((label, values) for label, values in layers if f.name in values), None)
        if source is None:
            continue
        label, values = source
        try:
            chosen[f.name] = f.metadata["parse"](values[f.name])
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{label(f.name)}: {exc}") from None
    return replace(Settings(), **chosen)
