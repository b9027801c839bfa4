# `ramster corpus snapshot`: a corpus file (raw 4096-byte pages back to back, the format every
# benchmark reads) made from the live memory of a running process, so anyone can measure
# RAMster on the memory of their own workloads.  It prints how the pages compress with LZ4, so
# a snapshot of mostly empty or incompressible memory is noticed before it is benchmarked.
from __future__ import annotations

import argparse
from pathlib import Path

import lz4.block

from ramster.atomicfile import replace_file
from ramster.bench.procpages import process_pages
from ramster.cli.errors import CliError
from ramster.cli.target import positive
from ramster.zcache import PAGE_SIZE


def _snapshot(args: argparse.Namespace) -> int:
    try:
        pages = process_pages(args.pid, args.max_pages, args.seed)
    except FileNotFoundError:
        raise CliError(f"no process {args.pid}") from None
    except OSError as exc:
        raise CliError(f"cannot read process {args.pid}'s memory: {exc.strerror or exc}") from None
    if not pages:
        raise CliError(f"process {args.pid} has no resident anonymous pages to read")
    zero = bytes(PAGE_SIZE)
    same = sum(page == page[:1] * PAGE_SIZE for page in pages)
    sizes = [len(lz4.block.compress(p, store_size=False)) for p in pages if p != zero]
    try:
        replace_file(args.out, pages, durable=False)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    mean = sum(sizes) / len(sizes) if sizes else 0
    print(
        f"{args.out}: {len(pages)} pages of process {args.pid}; {same} same-filled, "
        f"LZ4 mean {mean:.0f} bytes per other page ({PAGE_SIZE / mean if mean else 0:.2f}x)"
    )
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    corpus = commands.add_parser(
        "corpus", help="make a page corpus for the benchmarks from a running process"
    )
    actions = corpus.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "snapshot",
        help="write a process's resident anonymous pages to a corpus file",
        description="Read the resident pages of PID's private writable memory without a "
        "backing file (heap, stack, anonymous mappings) through /proc, a seeded sample of at "
        "most --max-pages in address order, and write them to OUT as raw 4096-byte pages.  "
        "Reading another process needs the right to trace it (same user, or root).",
    )
    p.add_argument("pid", type=positive, metavar="PID", help="the process to read")
    p.add_argument("out", type=Path, metavar="OUT", help="the corpus file to write")
    p.add_argument(
        "--max-pages", type=positive, default=8192, metavar="N", help="at most N pages (8192)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the sample (default 1)")
    p.set_defaults(func=_snapshot)
