# `ramster bench engine`: density and speed of one zcache pool on a real page corpus.
#
# Puts N pages (the corpus, cycled) in batches, reads all back and compares them.  Plain LZ4 is
# timed on the very same batches, interleaved with the engine's (compress a batch, put it; later
# decompress a batch into a list of pages, get it), so the put/get speed is judged as a ratio to
# the codec alone under the same machine noise.  The buffers LZ4 decompresses are compressed
# before the run, so they are as cold in the CPU caches as the zcache's frames.  Both are timed in
# CPU time of this process (time.process_time), not wall time: on a small shared machine the
# process is descheduled in the middle of a batch often enough to swamp a ratio measured in
# wall time (0.3 to 0.9 from one run to the next), and neither side waits on anything.
# Metadata per page is measured, not estimated: the growth of resident memory during the put
# phase minus the frames the arena holds (meaningful at large N: small runs only see allocator
# noise).
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import lz4.block

from ramster.bench.report import Progress, rss_bytes
from ramster.zcache import PAGE_SIZE, PoolKind, PutResult, ZCache, ZCacheConfig
from ramster.zcache.codec import same_filled_word

BATCH = 256  # pages per put_batch/get_batch call, as the node batches them


def run(pages: list[bytes], allocator: str, n: int, store_raw: bool = False) -> dict[str, Any]:
    count = len(pages)
    compress, decompress = lz4.block.compress, lz4.block.decompress
    cache = ZCache(ZCacheConfig(pool_limit_frames=n + 64, store_incompressible_raw=store_raw))
    pool = cache.create_pool(PoolKind.PERSISTENT, allocator)
    refused = bytearray(n)
    packed_corpus = [compress(page, store_size=False) for page in pages]  # for LZ4-only gets
    packed_sizes = 0
    packed_pages = 0
    outcomes: Counter[PutResult] = Counter()
    lz4_put = lz4_get = put_time = get_time = 0.0
    progress = Progress("put", n)
    rss0 = rss_bytes()
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        batch = [pages[i % count] for i in range(start, stop)]
        keys = [(0, i) for i in range(start, stop)]
        t0 = time.process_time()
        packed = [compress(page, store_size=False) for page in batch]
        t1 = time.process_time()
        results = cache.put_batch(pool, keys, batch)
        t2 = time.process_time()
        lz4_put += t1 - t0
        put_time += t2 - t1
        outcomes.update(results)
        for offset, (page, result, c) in enumerate(zip(batch, results, packed, strict=True)):
            if result.refused:
                refused[start + offset] = 1
            if same_filled_word(page) is None:
                packed_sizes += min(len(c), PAGE_SIZE)
                packed_pages += 1
        progress.update(stop)
    filled = cache.snapshot()
    metadata = (rss_bytes() - rss0 - filled.size_bytes) / max(1, filled.stored_pages)
    verified = True
    progress = Progress("get", n)
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        packed = [packed_corpus[i % count] for i in range(start, stop)]
        keys = [(0, i) for i in range(start, stop)]
        t0 = time.process_time()
        plain = [decompress(c, uncompressed_size=PAGE_SIZE) for c in packed]
        t1 = time.process_time()
        del plain
        t2 = time.process_time()
        got = cache.get_batch(pool, keys)
        t3 = time.process_time()
        lz4_get += t1 - t0
        get_time += t3 - t2
        for i, got_page in zip(range(start, stop), got, strict=True):
            if got_page != (None if refused[i] else pages[i % count]):
                verified = False
        progress.update(stop)
    report: dict[str, Any] = {
        "corpus_pages": count,
        "allocator": allocator,
        "pages": n,
        "same_filled": outcomes[PutResult.SAME_FILLED],
        "refused": {r.reason: outcomes[r] for r in PutResult if r.refused},
        "stored": outcomes[PutResult.STORED] + outcomes[PutResult.STORED_RAW],
        "stored_raw": outcomes[PutResult.STORED_RAW],
        "frames": filled.frames,
        "pages_per_frame": round(filled.pages_per_frame, 4),
        "bound_pages_per_frame": round(packed_pages * PAGE_SIZE / max(1, packed_sizes), 4),
        "put_pages_per_s": round(n / put_time),
        "get_pages_per_s": round(n / get_time),
        "lz4_compress_pages_per_s": round(n / lz4_put),
        "lz4_decompress_pages_per_s": round(n / lz4_get),
        "put_vs_lz4_compress": round(lz4_put / put_time, 3),
        "get_vs_lz4_decompress": round(lz4_get / get_time, 3),
        "metadata_bytes_per_page": round(metadata, 1),
        "metadata_accounted_bytes_per_page": round(
            cache.metadata_bytes() / max(1, filled.stored_pages), 1
        ),
        "verified": verified,
    }
    cache.close()
    return report
