# The page index against a plain dict: batches of sets (handle 0 removes), pops and gets over
# keys that cluster in a few chunks of a few objects, in any order and with repeats, as the
# native batch paths (native/index.rs) take them; after every batch the structure holds no
# empty chunk or object, and its count is the dict's size.
from __future__ import annotations

from array import array

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ramster.zcache.index import CHUNK, PageIndex

keys = st.tuples(st.sampled_from([0, 7, 2**64 - 1]), st.integers(0, 3 * CHUNK) | st.just(2**32 - 1))
batches = st.lists(
    st.tuples(
        st.sampled_from(["set", "pop", "get"]),
        st.lists(st.tuples(keys, st.integers(0, 3)), max_size=3 * CHUNK),
    ),
    max_size=12,
)


def check_shape(index: PageIndex, model: dict[tuple[int, int], int]) -> None:
    assert index.count == len(model)
    for obj in index.objects.values():
        assert obj, "an object without chunks was kept"
        for chunk in obj.values():
            assert len(chunk) == CHUNK and any(chunk), "an empty chunk was kept"
    assert {(o, i): h for o, i, h in index.items()} == model


@settings(max_examples=150, deadline=None)
@given(batches)
def test_batches_match_a_dict(ops: list[tuple[str, list[tuple[tuple[int, int], int]]]]) -> None:
    index, model = PageIndex(), dict[tuple[int, int], int]()
    for op, items in ops:
        batch = [k for k, _ in items]
        if op == "set":
            handles = [h for _, h in items]
            displaced = []
            for k, h in items:
                old = model.pop(k, 0)
                if old:
                    displaced.append(old)
                if h:
                    model[k] = h
            assert index.set_many(batch, handles) == displaced
        elif op == "pop":
            assert index.pop_many(batch) == [model.pop(k, 0) for k in batch]
        else:
            assert index.get_many(batch) == [model.get(k, 0) for k in batch]
        check_shape(index, model)


def test_a_chunk_emptied_and_refilled_in_one_batch_is_kept() -> None:
    index = PageIndex()
    index.set_many([(1, 5)], [9])
    assert index.set_many([(1, 5), (1, 6), (2, 0), (1, 5)], [0, 0, 0, 4]) == [9]
    assert index.get_many([(1, 5), (1, 6), (2, 0)]) == [4, 0, 0] and index.count == 1
    assert index.pop_many([(1, 5), (1, 5)]) == [4, 0]
    assert index.objects == {} and index.count == 0


@pytest.mark.parametrize(
    "bad",
    [[(1,)], [(1, 2, 3)], [[1, 2]], [(-1, 0)], [(0, 2**32)], [(2**64, 0)], [("a", 0)], [None]],
)
def test_malformed_keys_are_errors_that_change_nothing(bad: list[tuple[int, int]]) -> None:
    index = PageIndex()
    index.set_many([(0, 1)], [3])
    batch = [(0, 1), (0, 2), *bad]  # good keys first: an update must not half happen
    for call in (index.get_many, index.pop_many, lambda k: index.set_many(k, [1] * len(k))):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            call(batch)
    assert index.get_many([(0, 1), (0, 2)]) == [3, 0] and index.count == 1
    with pytest.raises(OverflowError):
        index.set_many([(0, 2)], [2**63])
    assert index.count == 1


def test_mismatched_handles_and_foreign_chunks_are_refused() -> None:
    index = PageIndex()
    with pytest.raises(ValueError, match="as many handles as keys"):
        index.set_many([(0, 1), (0, 2)], [1])
    index.objects[0] = {0: array("q", [0] * 8)}  # not a chunk of 64 handles
    with pytest.raises(ValueError, match="64 handles"):
        index.get_many([(0, 1)])
    index.objects[0] = {0: array("d", [0.0] * CHUNK)}  # not handles at all
    with pytest.raises(ValueError, match="table holds"):
        index.pop_many([(0, 1)])


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.integers(0, 4 * CHUNK), st.integers(0, 3), max_size=3 * CHUNK),
    st.integers(0, 4 * CHUNK),
    st.integers(1, 3 * CHUNK),
)
@example({i: 3 for i in range(2 * CHUNK)}, 10, 2 * CHUNK)  # full chunks: the fast path
@example({i: i % 2 for i in range(2 * CHUNK)}, 0, 3 * CHUNK)  # every other page
def test_states_match_a_dict(pages: dict[int, int], start: int, length: int) -> None:
    """states() reads what get() reads, chunk by chunk: 0 absent, 1 held (handle 0 is none)."""
    index = PageIndex()
    index.set_many([(5, i) for i in pages], list(pages.values()))
    want = bytes(1 if pages.get(i) else 0 for i in range(start, start + length))
    assert index.states(5, start, start + length) == want
    assert index.states(6, start, start + length) == bytes(length)  # an object with none
