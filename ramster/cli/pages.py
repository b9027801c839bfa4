# `ramster put`, `ramster get` and `ramster flush`: a file as the pages of one object.
#
# put splits a file into 4096-byte pages (the last zero-padded) stored at indexes start, start+1,
# ... and reports the file's length, which get needs (--length) to trim the padding again.  A
# page the node refuses (poor compression, no room) makes put exit 1; a page get cannot return
# (missing, corrupt: its data is lost, or unavailable: no copy in reach now) is a one-line error
# and nothing is written, since the file could not be rebuilt.
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ramster.cli.errors import CliError
from ramster.cli.target import add_key, add_target, connect, nonnegative, page_index
from ramster.client import PAGE_SIZE, PageStatus

WHY_NOT = {
    PageStatus.MISS: "miss: the node has no such page",
    PageStatus.CORRUPT: "corrupt: its data is lost, every copy failed verification",
    PageStatus.UNAVAILABLE: "unavailable: no copy of it can be reached now",
    PageStatus.LOST: "lost: the node crashed since the pool last accepted its losses, and this "
    "page may be one of them (`ramster pools accept-loss POOL` once you know)",
}


def read_input(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None


def as_pages(data: bytes) -> list[bytes]:
    padded = data + bytes(-len(data) % PAGE_SIZE)
    return [padded[i : i + PAGE_SIZE] for i in range(0, len(padded), PAGE_SIZE)]


def _put(args: argparse.Namespace) -> int:
    data = read_input(args.file)
    if not data:
        raise CliError(f"{args.file} is empty: nothing to put")
    pages = as_pages(data)
    with connect(args) as client:
        outcomes = client.put_many(args.pool, args.oid, args.start, pages)
    tally = Counter(o.reason for o in outcomes)
    refused = {r: tally.pop(r) for r in ("poor_compression", "no_room") if r in tally}
    last = args.start + len(pages) - 1
    print(
        f"put {len(data)} bytes as {len(pages)} pages (pool {args.pool}, object {args.oid}, "
        f"pages {args.start}-{last}): " + ", ".join(f"{k} {v}" for k, v in sorted(tally.items()))
    )
    print(f"length {len(data)} (get it back with --pages {len(pages)} --length {len(data)})")
    if refused:
        detail = ", ".join(f"{k} {v}" for k, v in refused.items())
        print(f"refused {sum(refused.values())} pages ({detail})", file=sys.stderr)
        return 1
    return 0


def _get(args: argparse.Namespace) -> int:
    if args.length is not None and args.length > args.pages * PAGE_SIZE:
        raise CliError(f"--length {args.length} is more than {args.pages} pages hold")
    with connect(args) as client:
        result = client.get_many(args.pool, args.oid, args.start, args.pages, args.exclusive)
    bad = [(n, s) for n, s in enumerate(result.statuses) if s is not PageStatus.HIT]
    if bad:
        n, status = bad[0]
        raise CliError(
            f"{len(bad)} of {args.pages} pages cannot be read; the first is page "
            f"{args.start + n} of object {args.oid} in pool {args.pool} ({WHY_NOT[status]})"
        )
    data = b"".join(p for p in result.pages if p is not None)
    if args.length is not None:
        data = data[: args.length]
    try:
        if args.out == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            Path(args.out).write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    if args.out != "-":
        print(f"wrote {len(data)} bytes ({args.pages} pages) to {args.out}")
    return 0


def _flush(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.index is None:
            count = client.flush_object(args.pool, args.oid)
            print(f"flushed {count} pages of object {args.oid} in pool {args.pool}")
        else:
            found = client.flush_page(args.pool, args.oid, args.index)
            what = "flushed" if found else "no page to flush at"
            print(f"{what} page {args.index} of object {args.oid} in pool {args.pool}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "put",
        help="store a file as the pages of one object",
        description="Split FILE ('-' for stdin) into 4096-byte pages, the last zero-padded, and "
        "store them as pages --start, --start+1, ... of object --oid in pool --pool.  Prints the "
        "file's length, which 'ramster get --length' needs to drop the padding.  Exits 1 if the "
        "node refused any page.",
    )
    add_target(p)
    add_key(p)
    p.add_argument("--start", type=page_index, default=0, help="index of the first page")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_put)

    p = commands.add_parser(
        "get",
        help="read the pages of one object back into a file",
        description="Read pages --start .. --start+N-1 of object --oid in pool --pool and write "
        "them to OUT ('-' for stdout), cut to --length bytes if given.  Fails, writing nothing, "
        "if any page is missing, corrupt (its data is lost) or unavailable (no copy in reach).",
    )
    add_target(p)
    add_key(p)
    p.add_argument("--pages", type=nonnegative, required=True, metavar="N", help="pages to read")
    p.add_argument("--length", type=nonnegative, metavar="L", help="bytes to keep (file length)")
    p.add_argument("--start", type=page_index, default=0, help="index of the first page")
    p.add_argument(
        "--exclusive", action="store_true", help="remove the pages from the node as they are read"
    )
    p.add_argument("out", metavar="OUT")
    p.set_defaults(func=_get)

    p = commands.add_parser(
        "flush",
        help="drop one page, or every page of an object",
        description="Drop page --index of object --oid in pool --pool, or every page of the "
        "object when --index is not given.",
    )
    add_target(p)
    add_key(p)
    p.add_argument("--index", type=page_index, help="one page to drop (default: all)")
    p.set_defaults(func=_flush)
