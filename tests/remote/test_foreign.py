# The holder's store of long blobs (a sealed raw page is 4142 bytes, more than a slot takes):
# kept in two slots, both or neither, joined on the way out, never joined with a stale tail,
# and not counted twice.
from __future__ import annotations

import os

from ramster.remote import ForeignStore, OwnerTag
from ramster.remote.foreign import MAX_BLOB, MAX_SPLIT
from ramster.zcache.codec import PAGE_SIZE

OWNER = OwnerTag("owner", "i" * 32)
SIZES = [1, MAX_BLOB, MAX_BLOB + 1, PAGE_SIZE, PAGE_SIZE + 46, MAX_SPLIT]  # 4142: a sealed raw page


def test_long_blobs_come_back_whole_and_count_once() -> None:
    store = ForeignStore(64)
    blobs = [os.urandom(size) for size in SIZES]
    slots = list(range(10, 10 + len(blobs)))
    assert store.put(OWNER, 1, 3, slots, blobs) == [True] * len(blobs)
    assert store.get(OWNER, 1, 3, slots) == blobs
    store.cache.verify()
    assert store.pages == len(blobs) and store.pages_by_owner() == {"owner": len(blobs)}
    moved = OwnerTag("owner", "j" * 32)  # back from a restart: every page moves, tails too
    assert sorted(store.reclaim(moved, 2)) == [(3, slot) for slot in slots]
    assert store.get(moved, 2, 3, slots) == blobs


def test_a_put_over_a_long_blob_leaves_no_stale_tail() -> None:
    """A slot that held a long blob and then takes one of exactly MAX_BLOB bytes (as long as a
    long blob's head) must not give back the old tail joined to it."""
    store = ForeignStore(64)
    assert store.put(OWNER, 1, 3, [7, 8], [os.urandom(PAGE_SIZE + 46)] * 2) == [True, True]
    new = [os.urandom(MAX_BLOB), os.urandom(MAX_SPLIT)]
    assert store.put(OWNER, 1, 3, [7, 8], new) == [True, True]
    assert store.get(OWNER, 1, 3, [7, 8]) == new
    assert store.pages == 2


def test_a_reclaim_that_merges_pools_leaves_no_stale_tail() -> None:
    """Two incarnations' pools with the same slot merge on a reclaim, the moved page winning:
    a short one moved over a long one must not come back joined with the long one's tail."""
    store = ForeignStore(64)
    old, new = OwnerTag("owner", "a" * 32), OwnerTag("owner", "b" * 32)
    short = os.urandom(MAX_BLOB)
    assert store.put(old, 1, 3, [5], [short]) == [True]
    assert store.put(new, 1, 3, [5], [os.urandom(MAX_SPLIT)]) == [True]
    assert store.reclaim(new, 1) == [(3, 5)]
    assert store.get(new, 1, 3, [5]) == [short]
    assert store.pages == 1


def test_a_flushed_long_blob_leaves_nothing() -> None:
    store = ForeignStore(64)
    assert store.put(OWNER, 1, 3, [1, 2], [os.urandom(MAX_SPLIT), b"short"]) == [True, True]
    assert store.flush(OWNER, 1, 3, [1]) == 1
    assert store.get(OWNER, 1, 3, [1, 2]) == [None, b"short"]
    assert store.flush(OWNER, 1, 3, [2]) == 1
    assert store.pages == 0 and not store.pools and store.cache.frames == 0


def test_a_long_blob_with_room_for_half_is_refused_whole() -> None:
    """Its head is stored, its tail finds the store full: the head goes too."""
    store = ForeignStore(10, owner_share=1.0)
    a, b, c = (OwnerTag(name, "i") for name in "abc")
    assert store.put(a, 1, 3, list(range(8)), [os.urandom(MAX_BLOB)] * 8) == [True] * 8
    assert store.put(b, 1, 3, [0], [os.urandom(MAX_BLOB)]) == [True]
    assert store.cache.frames == 9  # one frame left: a long blob needs two
    assert store.put(c, 1, 3, [5], [os.urandom(MAX_SPLIT)]) == [False]
    assert store.get(c, 1, 3, [5]) == [None]
    assert store.cache.frames == 9 and store.pages == 9 and store.owners() == {"a", "b"}
