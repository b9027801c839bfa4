# Real memory pages without a corpus file: the resident anonymous memory of a live process.
#
# The demo needs realistic pages on any Linux machine, with no download and no file to ship, so
# it reads them where they are: the private writable mappings with no backing file ([heap],
# [stack], anonymous) listed in /proc/PID/maps, pages present per /proc/PID/pagemap, read through
# /proc/PID/mem.  A Python process's heap (objects, dicts, bytecode, strings) compresses much like
# the python-app corpus.  `ramster corpus snapshot` writes another process's pages to a corpus
# file (reading another process needs ptrace rights over it: the same user, or root); the demo
# reads its own, sampled before it builds a zcache so the arena is not among them.
from __future__ import annotations

import random
import struct

PAGE = 4096


def _anon_ranges(pid: int | str) -> list[tuple[int, int]]:
    ranges = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split()
            perms = parts[1]
            path = parts[5] if len(parts) > 5 else ""
            if "w" not in perms or "p" not in perms or (path and path not in ("[heap]", "[stack]")):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def own_memory_pages(max_pages: int, seed: int = 1) -> list[bytes]:
    """Up to `max_pages` resident anonymous pages of this process (a seeded sample, in order)."""
    return process_pages("self", max_pages, seed)


def process_pages(pid: int | str, max_pages: int, seed: int = 1) -> list[bytes]:
    """Up to `max_pages` resident anonymous pages of process `pid` ("self": this one), a seeded
    sample in address order; OSError if the process is gone or not ours to read."""
    addresses = []
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for lo, hi in _anon_ranges(pid):
            pagemap.seek((lo // PAGE) * 8)
            entries = pagemap.read((hi - lo) // PAGE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if entry >> 63:
                    addresses.append(lo + i * PAGE)
    if len(addresses) > max_pages:
        addresses = sorted(random.Random(seed).sample(addresses, max_pages))
    pages = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for address in addresses:
            try:
                mem.seek(address)
                page = mem.read(PAGE)
            except OSError:
                continue
            if len(page) == PAGE:
                pages.append(page)
    return pages
