# Index handles: one 64-bit integer per stored page, its top byte saying where the page lives.
#
#     ZPAGE    in the pool's allocator (zbud or zsmalloc), compressed, with its 18-byte header
#     RAW      in a frame of its own, uncompressed (store-raw policy for incompressible pages)
#     SAME     only its repeated 8-byte word, in the shared same-filled table
#     EVICTED  outside RAM: the low bits are a location the evictor (chain) gave for it
#     EVICTED_READ  the same, and read once since it was evicted: the next get brings it home
#              if the pool has room
#
# The two evicted kinds are the highest, so `kind >= EVICTED` asks "evicted?".
#
# The low 56 bits are the allocator's handle, the word slot or the evictor's location.
from __future__ import annotations

KIND_SHIFT = 56
HANDLE_MASK = (1 << KIND_SHIFT) - 1
ZPAGE = 1
RAW = 2
SAME = 3
EVICTED = 4
EVICTED_READ = 5
ZPAGE_TAG = ZPAGE << KIND_SHIFT
RAW_TAG = RAW << KIND_SHIFT
SAME_TAG = SAME << KIND_SHIFT
EVICTED_TAG = EVICTED << KIND_SHIFT
EVICTED_READ_TAG = EVICTED_READ << KIND_SHIFT
