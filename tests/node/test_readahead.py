# Readahead of remote gets: which gets read ahead (a stream continued, also after a jump back),
# which do not (a jump, the chunked engine's re-checks inside a batch, more than MAX_RUNNING at
# once), that a get of pages being read ahead waits for that fetch, and that a failed fetch
# ahead is harmless.
from __future__ import annotations

import asyncio

from node.readahead import MAX_RUNNING, RA_MAX, RA_MIN, ReadAhead

Keys = list[tuple[int, int]]


def run(oid: int, start: int, count: int) -> Keys:
    return [(oid, i) for i in range(start, start + count)]


class Fetches:
    def __init__(self, hold: bool = False, fail: bool = False) -> None:
        self.asked: list[tuple[int, Keys]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.fail = fail

    async def __call__(self, pool: int, keys: Keys) -> None:
        self.asked.append((pool, keys))
        await self.release.wait()
        if self.fail:
            raise ConnectionError("holder gone")


async def test_a_continued_stream_reads_the_next_window_ahead() -> None:
    fetches = Fetches()
    ahead = ReadAhead(fetches)
    ahead.advance(3, run(1, 0, 100))  # a first get: the stream starts, nothing ahead
    await ahead.drain()
    assert fetches.asked == []
    ahead.advance(3, run(1, 100, 100))  # continues it: the next 100 pages are fetched
    await ahead.drain()
    assert fetches.asked == [(3, run(1, 200, 100))]
    ahead.advance(3, run(1, 200, 100))  # the get of what was read ahead reads on
    for part in range(200, 300, 8):  # the engine's re-checks of that get's chunks
        ahead.advance(3, run(1, part, 8))
    await ahead.drain()
    assert fetches.asked[1:] == [(3, run(1, 300, 100))]
    assert ahead.pages == 200


async def test_a_stream_read_again_from_an_earlier_page_reads_ahead_once_it_continues() -> None:
    """The end of an object first, then its start in order (a client that reads back the
    newest pages, then the oldest): the jump back starts the stream over."""
    fetches = Fetches()
    ahead = ReadAhead(fetches)
    ahead.advance(3, run(1, 1000, 100))
    ahead.advance(3, run(1, 1100, 100))
    await ahead.drain()
    assert fetches.asked == [(3, run(1, 1200, 100))]
    ahead.advance(3, run(1, 0, 100))  # back to the start: nothing ahead yet
    ahead.advance(3, run(1, 40, 8))  # a re-check inside that get moves nothing
    await ahead.drain()
    assert len(fetches.asked) == 1
    ahead.advance(3, run(1, 100, 100))  # continues from the new place
    await ahead.drain()
    assert fetches.asked[1:] == [(3, run(1, 200, 100))]


async def test_windows_are_bounded_and_jumps_and_scattered_keys_read_nothing() -> None:
    fetches = Fetches()
    ahead = ReadAhead(fetches)
    for start in range(10):  # single pages in order: RA_MIN ahead, more only half way
        ahead.advance(3, run(1, start, 1))
    ahead.advance(3, run(1, 1000, 1))  # a jump
    ahead.advance(3, [(1, 1001), (1, 1005)])  # not consecutive
    ahead.advance(3, [(1, 1001), (2, 1002)])  # two objects
    ahead.advance(4, run(1, 0, 1000))
    ahead.advance(4, run(1, 1000, 1000))  # a huge get: at most RA_MAX ahead
    await ahead.drain()
    assert [len(keys) for _, keys in fetches.asked] == [RA_MIN, RA_MIN // 2, RA_MAX]
    assert fetches.asked[0][1][0] == (1, 2)  # after the first get that continued the stream
    assert fetches.asked[1][1][0] == (1, 2 + RA_MIN)  # then on from where that one ended


async def test_a_get_of_pages_being_read_ahead_waits_for_that_fetch() -> None:
    fetches = Fetches(hold=True)
    ahead = ReadAhead(fetches)
    ahead.advance(3, run(1, 0, 64))
    ahead.advance(3, run(1, 64, 64))
    await asyncio.sleep(0)
    task = ahead.pending(3, run(1, 128, 64))
    assert task is not None and not task.done()
    assert ahead.pending(3, run(1, 500, 64)) is None
    assert ahead.pending(4, run(1, 128, 64)) is None
    fetches.release.set()
    await task
    assert ahead.pending(3, run(1, 128, 64)) is None


async def test_at_most_max_running_fetches_ahead_and_failures_are_harmless() -> None:
    fetches = Fetches(hold=True, fail=True)
    ahead = ReadAhead(fetches)
    for oid in range(MAX_RUNNING + 3):  # as many streams, each continued once
        ahead.advance(3, run(oid, 0, 32))
        ahead.advance(3, run(oid, 32, 32))
    await asyncio.sleep(0)
    assert len(fetches.asked) == MAX_RUNNING  # the others were skipped, not queued
    fetches.release.set()
    await ahead.drain()  # every one failed, quietly
    ahead.advance(3, run(0, 64, 32))  # the stream goes on
    await ahead.drain()
    assert len(fetches.asked) == MAX_RUNNING + 1
