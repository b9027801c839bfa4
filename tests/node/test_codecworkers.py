# The native codec workers (node/codecworkers.py over native/pool.rs): their results are the
# codec's own, byte for byte, for many jobs in flight at once; a job holds its input buffers
# until it has finished; a cancelled job still finishes and leaves nothing behind; workers that
# are shut down fail what waits and refuse new work; a new event loop takes the workers over;
# opens do not wait behind encodes; and the threads are named as the codec workers are, in
# /proc, the encoders at a lower priority than the loop.
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from node.codecworkers import NICE, CodecWorkers
from node.threadcpu import CODEC_PREFIX
from ramster.zcache import (
    PAGE_SIZE,
    CorruptPage,
    PageEncoder,
    PoolKind,
    SealedPages,
    ZCache,
    ZCacheConfig,
)
from ramster.zcache._codec import CodecPool, encode_pages, open_zpages_at

ENCODERS = (PageEncoder(threshold=2048, store_raw=False), PageEncoder(3000, store_raw=True))


def mixed(sample_pages: list[bytes], count: int) -> list[bytes]:
    """Compressible pages, same-filled pages and incompressible ones, interleaved."""
    noise = [os.urandom(PAGE_SIZE) for _ in range(8)]
    out = []
    for i in range(count):
        kind = i % 5
        if kind == 3:
            out.append(bytes([i % 251]) * PAGE_SIZE)
        elif kind == 4:
            out.append(noise[i % len(noise)])
        else:
            out.append(sample_pages[i % len(sample_pages)])
    return out


async def test_many_jobs_at_once_give_the_codecs_own_results(sample_pages: list[bytes]) -> None:
    workers = CodecWorkers(2)
    pages = mixed(sample_pages, 640)
    keys = [(7, i) for i in range(len(pages))]
    try:
        for encoder in ENCODERS:
            parts = [slice(at, at + 40) for at in range(0, len(pages), 40)]
            views = [memoryview(p) for p in pages]  # views are read where they are
            jobs = [workers.encode(encoder, keys[part], views[part]) for part in parts]
            encoded = [z for part in await asyncio.gather(*jobs) for z in part]
            assert encoded == encode_pages(keys, pages, encoder.threshold, encoder.store_raw)
            runs = [[b"".join(pages[part])] for part in parts]  # a job's pages in one buffer
            jobs = [workers.encode(encoder, keys[p], r) for p, r in zip(parts, runs, strict=True)]
            assert [z for part in await asyncio.gather(*jobs) for z in part] == encoded
        zpaged = [(k, z) for k, z in zip(keys, encoded, strict=True) if z and len(z) > 8]
        tampered = bytearray(zpaged[5][1])
        tampered[-1] ^= 1
        zpaged[5] = (zpaged[5][0], bytes(tampered))
        sealed = SealedPages([k for k, _ in zpaged], [None] * len(zpaged))
        for i, (_, z) in enumerate(zpaged):
            sealed.wait(i, z)
        want = open_zpages_at(sealed.waiting_keys(), sealed.zpages, sealed.starts)
        opened = await workers.open(sealed)
        assert opened is sealed and (sealed.opened, sealed.corrupt) == (len(zpaged), 1)
        assert isinstance(sealed.pages[5], CorruptPage) and "checksum" in str(sealed.pages[5])
        assert [p for i, p in enumerate(sealed.pages) if i != 5] == [
            w for i, w in enumerate(want) if i != 5
        ]
    finally:
        workers.shutdown()


async def test_an_engines_get_opens_in_the_workers_as_on_the_loop(
    sample_pages: list[bytes],
) -> None:
    engine = ZCache(ZCacheConfig(pool_limit_frames=4096))
    pool = engine.create_pool(PoolKind.PERSISTENT, store_raw=True)
    pages = mixed(sample_pages, 200)
    keys = [(1, i) for i in range(len(pages))]
    engine.put_batch(pool, keys, pages)
    workers = CodecWorkers(1)
    try:
        sealed = await workers.open(engine.read_sealed(pool, [*keys, (2, 0)]))
        assert engine.opened(sealed) == [*pages, None]
    finally:
        workers.shutdown()
        engine.close()


async def test_a_job_holds_its_input_until_it_has_finished(sample_pages: list[bytes]) -> None:
    workers = CodecWorkers(1)
    page = bytearray(sample_pages[0])
    try:
        job = workers.encode(ENCODERS[0], [(1, 0)] * 64, [page] * 64)  # type: ignore[list-item]
        with pytest.raises(BufferError):  # exported: it cannot move while a worker reads it
            page.extend(b"x")
        await job
        page.extend(b"x")  # released once finished
    finally:
        workers.shutdown()


async def test_a_cancelled_job_still_finishes_and_leaves_nothing(
    sample_pages: list[bytes],
) -> None:
    workers = CodecWorkers(1)
    pages = sample_pages[:64]
    keys = [(1, i) for i in range(len(pages))]
    try:
        dropped = workers.encode(ENCODERS[1], keys, pages)
        dropped.cancel()
        kept = await workers.encode(ENCODERS[1], keys, pages)  # finishes after the first
        assert list(kept) == encode_pages(keys, pages, 3000, True)
        assert workers.pending() == 0
    finally:
        workers.shutdown()


async def test_shut_down_workers_fail_what_waits_and_refuse_more(
    sample_pages: list[bytes],
) -> None:
    workers = CodecWorkers(1)
    keys = [(1, i) for i in range(256)]
    pages = (sample_pages * 4)[:256]
    waiting = [workers.encode(ENCODERS[0], keys, pages) for _ in range(20)]
    workers.shutdown()
    assert all(w.done() for w in waiting)
    for w in waiting:  # the finished ones were never taken: each fails the same way
        with pytest.raises(RuntimeError, match="shut down"):
            w.result()
    with pytest.raises(RuntimeError, match="the codec pool is closed"):
        workers.encode(ENCODERS[0], keys, pages)
    workers.shutdown()  # twice is harmless


def test_a_new_loop_takes_the_workers_over(sample_pages: list[bytes]) -> None:
    workers = CodecWorkers(1)
    keys = [(1, i) for i in range(32)]

    async def encode() -> list[bytes | None]:
        return list(await workers.encode(ENCODERS[0], keys, sample_pages[:32]))

    try:
        first = asyncio.run(encode())
        assert asyncio.run(encode()) == first == encode_pages(keys, sample_pages[:32], 2048, False)
    finally:
        workers.shutdown()


def test_bad_input_is_refused_at_submit(sample_pages: list[bytes]) -> None:
    pool = CodecPool(1, "t")
    try:
        with pytest.raises(ValueError, match="page 1 is 100 bytes"):
            pool.encode([(1, 0), (1, 1)], [sample_pages[0], b"x" * 100], 2048, True)
        with pytest.raises(ValueError, match="keys and pages differ in number"):
            pool.encode([(1, 0)], [], 2048, True)
        with pytest.raises(ValueError, match="keys and offsets differ in number"):
            pool.open([], b"x", [0])
        with pytest.raises(TypeError):
            pool.open([(1, 0)], 12, [0])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="needs a thread"):
            CodecPool(0, "t")
        assert len(pool) == 0
    finally:
        pool.close()


def codec_threads() -> list[str]:
    """The /proc names of this process's live codec worker threads."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # ended meanwhile
            continue
    return sorted(n for n in names if n.startswith(CODEC_PREFIX))


def settled(expected: list[str]) -> list[str]:
    """codec_threads() once it is `expected`, or after 10 s.  A joined thread's /proc entry
    goes only once the kernel reaps it, a moment after the join returns (a CI run on a loaded
    machine saw one left), and a new thread names itself once it runs."""
    deadline = time.monotonic() + 10
    while (names := codec_threads()) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return names


def thread_nices() -> dict[str, int]:
    """The nice value of each of this process's threads, by name."""
    nices = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as comm:
                nices[comm.read().strip()] = int(fields[16])  # field 19 of proc(5)
        except OSError:  # ended meanwhile
            continue
    return nices


def test_the_worker_threads_are_named_as_codec_workers_the_encoders_nicer() -> None:
    before = codec_threads()
    workers = CodecWorkers(2)
    try:
        new = [f"{CODEC_PREFIX}_0", f"{CODEC_PREFIX}_1", f"{CODEC_PREFIX}r0"]
        assert settled(sorted([*before, *new])) == sorted([*before, *new])
        assert not any(t.name.startswith(CODEC_PREFIX) for t in threading.enumerate())
        nices, mine = thread_nices(), os.getpriority(os.PRIO_PROCESS, 0)
        assert [nices[name] for name in new] == [min(mine + NICE, 19), min(mine + NICE, 19), mine]
    finally:
        workers.shutdown()
    assert settled(before) == before  # joined


async def test_opens_do_not_wait_behind_encodes(sample_pages: list[bytes]) -> None:
    engine = ZCache(ZCacheConfig(pool_limit_frames=1024))
    pool = engine.create_pool(PoolKind.PERSISTENT)
    keys = [(1, i) for i in range(64)]
    engine.put_batch(pool, keys, sample_pages[:64])
    workers = CodecWorkers(1)
    pages = (sample_pages * 8)[:512]
    try:  # the one encoder has ~0.1 s of work queued when the open comes
        more = [(2, i) for i in range(512)]
        encodes = [workers.encode(ENCODERS[0], more, pages) for _ in range(40)]
        sealed = await workers.open(engine.read_sealed(pool, keys))  # in one FIFO: last
        assert sum(not e.done() for e in encodes) > len(encodes) // 2
        assert engine.opened(sealed) == sample_pages[:64]
        await asyncio.gather(*encodes)
    finally:
        workers.shutdown()
        engine.close()
