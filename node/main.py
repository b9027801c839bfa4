# `ramster-node` / `python -m node`: parse settings, set up logging, run one node until signalled.
# Bad settings are one 'ramster-node: error: ...' line and exit status 2; a node that cannot
# start logs why and exits 1; a node stopped by SIGTERM/SIGINT exits 0.
#
# Once the node has started, what startup built (modules, descriptors, the engine's tables) is
# collected once and frozen out of the garbage collector's full passes, since it lives as long as
# the process: a full pass under bulk load stalled the loop 15 ms before, 1.5 ms after.  The
# heap pages the collected garbage leaves free go back to the OS then (node/heap.py).
#
# The GIL is handed over every GIL_SWITCH_SECONDS instead of CPython's 5 ms.  gRPC's asyncio
# server learns of each call in a poller thread that needs the GIL to wake the loop; while the
# loop runs bulk chunks back to back it lets go of the GIL only in its select(), and takes it
# back before that thread has woken, so a small call could wait a whole switch interval to be
# seen.  Measured with `ramster bench latency --clients 1`, 12 alternating runs each on 2 cores:
# loaded single-get p99 median 1.82 ms (2 runs over 2 ms, worst max 10.4 ms) at 5 ms, 1.66 ms
# (1 over 2 ms, worst max 4.7 ms) at 0.5 ms; NBD throughput and bulk pages/s the same.
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

from node.heap import trim_heap
from node.logs import configure, log_event
from node.server import Node, StartupError
from node.settings import Settings, SettingsError, add_arguments, resolve
from ramster import __version__
from ramster.wire import keep_freed_memory

GIL_SWITCH_SECONDS = 0.0005


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ramster-node",
        description="Run a RAMster node: a compressed page cache served over gRPC "
        "(ramster.v1.Tmem, health and reflection), with Prometheus metrics.  Every setting "
        "comes from its flag, else its RAMSTER_* environment variable, else the TOML file "
        "given by --config (keys named like the flags), else its default.  Stops gracefully "
        "on SIGTERM or SIGINT.",
    )
    parser.add_argument("--version", action="version", version=f"ramster-node {__version__}")
    add_arguments(parser)
    return parser


async def serve(settings: Settings) -> None:
    node = Node(settings)
    stop = node.catch_signals()  # before start: a SIGTERM during startup still stops gracefully
    try:
        await node.start()
    except BaseException:
        await node.stop(grace=0)
        raise
    gc.collect()
    gc.freeze()
    trim_heap()
    await stop.wait()
    await node.stop()


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    try:
        settings = resolve(args, config_file=config)
    except SettingsError as exc:
        print(f"ramster-node: error: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    keep_freed_memory()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        log_event("startup_failed", logging.ERROR, error=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
