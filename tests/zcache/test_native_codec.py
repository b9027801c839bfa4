# The native batch codec (native/codec.rs) against codec.py's single-page paths: each reads what
# the other writes, byte for byte; every damaged zpage is named corrupt (never a crash, never a
# wrong page), hostile LZ4 payloads under a valid checksum included; bad arguments are errors.
from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import lz4.block
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramster.zcache import PAGE_SIZE
from ramster.zcache._codec import encode_pages, open_zpages_at
from ramster.zcache.codec import HEADER_SIZE, compress, make_zpage, open_zpage

THRESHOLD = 3072
KEY = (0xFEDC_BA98_7654_3210, 0xFFFF_FFFE)  # both halves of the checksum seed in use
Key = tuple[int, int]


def open_joined(keys: list[Key], zpages: Sequence[bytes | memoryview]) -> list[bytes | str]:
    """The zpages back to back in one buffer, as a get's copies are."""
    starts = list(accumulate((memoryview(z).nbytes for z in zpages), initial=0))[:-1]
    return open_zpages_at(keys, b"".join(zpages), starts)


def open_each(keys: list[Key], zpages: list[bytes]) -> list[bytes | str]:
    """Each zpage in a buffer of its own, whose end is the zpage's."""
    return [open_zpages_at([k], z, [0])[0] for k, z in zip(keys, zpages, strict=True)]


def test_native_zpages_are_codec_zpages(sample_pages: list[bytes]) -> None:
    keys = [(KEY[0] - i, i) for i in range(len(sample_pages))]
    encoded = encode_pages(keys, sample_pages, THRESHOLD, True)
    for (oid, index), page, zpage in zip(keys, sample_pages, encoded, strict=True):
        assert zpage is not None
        assert open_zpage(zpage, oid, index) == page
        payload = zpage[HEADER_SIZE:]
        raw = len(compress(page)) > THRESHOLD
        assert len(payload) == PAGE_SIZE if raw else len(payload) <= THRESHOLD
        assert zpage == make_zpage(oid, index, payload)  # same header and checksum
    assert open_joined(keys, encoded) == sample_pages  # type: ignore[arg-type]


def test_codec_zpages_open_natively(sample_pages: list[bytes]) -> None:
    keys = [(7, i) for i in range(len(sample_pages))]
    zpages = [make_zpage(o, i, compress(p)) for (o, i), p in zip(keys, sample_pages, strict=True)]
    zpages[-1] = make_zpage(7, len(zpages) - 1, sample_pages[-1])  # stored raw
    assert open_joined(keys, zpages) == sample_pages
    views = [memoryview(b"xx" + z)[2:] for z in zpages]  # views at an offset, not copies
    assert open_joined(keys, views) == sample_pages


def test_same_filled_and_refused_pages(incompressible_pages: list[bytes]) -> None:
    words = [bytes(8), b"\x01\x02\x03\x04\x05\x06\x07\x08", b"\xff" * 8]
    pages = [w * (PAGE_SIZE // 8) for w in words] + incompressible_pages[:2]
    keys = [(1, i) for i in range(len(pages))]
    assert encode_pages(keys, pages, THRESHOLD, False) == [*words, None, None]
    raw = encode_pages(keys, pages, THRESHOLD, True)[3:]
    assert [len(z) for z in raw if z] == [HEADER_SIZE + PAGE_SIZE] * 2
    almost = bytearray(pages[0])
    almost[-1] = 1  # one byte off same-filled: a zpage, not a word
    (zpage,) = encode_pages([(1, 0)], [bytes(almost)], THRESHOLD, False)
    assert zpage is not None and open_zpage(zpage, 1, 0) == almost


def damaged(zpage: bytes) -> dict[str, bytes]:
    flipped = bytearray(zpage)
    flipped[HEADER_SIZE + 5] ^= 0x10
    longer = bytearray(zpage)
    longer[4:6] = (len(zpage) - HEADER_SIZE + 1).to_bytes(2, "little")
    return {
        "flipped payload bit": bytes(flipped),
        "truncated": zpage[:-3],
        "header only, cut": zpage[: HEADER_SIZE - 1],
        "empty": b"",
        "length past the end": bytes(longer),
        "other key": make_zpage(KEY[0], KEY[1] + 1, zpage[HEADER_SIZE:]),
    }


def test_damaged_zpages_are_named_corrupt(compressible_pages: list[bytes]) -> None:
    (zpage,) = encode_pages([KEY], compressible_pages[:1], THRESHOLD, False)
    assert zpage is not None
    cases = damaged(zpage)
    answers = open_each([KEY] * len(cases), list(cases.values()))
    for (case, _), answer in zip(cases.items(), answers, strict=True):
        assert isinstance(answer, str), case
        assert f"oid={KEY[0]} index={KEY[1]}" in answer, (case, answer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PAGE_SIZE + 64))
def test_hostile_payloads_under_a_valid_checksum(payload: bytes) -> None:
    """A payload a peer or a disk could craft, checksummed correctly: a page of exactly
    PAGE_SIZE bytes or a clear refusal, and the same verdict as the lz4 package."""
    if len(payload) >= 1 << 16:
        return
    (answer,) = open_each([KEY], [make_zpage(*KEY, payload)])
    if len(payload) == PAGE_SIZE:
        assert answer == payload
        return
    try:
        expected: bytes | None = lz4.block.decompress(payload, PAGE_SIZE)
    except lz4.block.LZ4BlockError:
        expected = None
    if expected is not None and len(expected) == PAGE_SIZE:
        assert answer == expected
    else:
        assert isinstance(answer, str)


def test_a_crafted_overlong_stream_is_refused() -> None:
    """LZ4 that would write past a page (a long literal run, then a far match)."""
    literals = b"\xf0" + b"\xff" * 17 + b"\x00" + b"A" * (15 + 255 * 17)
    for payload in (literals, compress(bytes(PAGE_SIZE)) + b"\x00\x00\x00"):
        (answer,) = open_each([KEY], [make_zpage(*KEY, payload)])
        assert isinstance(answer, str)


def test_pages_in_runs_encode_as_one_page_each(sample_pages: list[bytes]) -> None:
    """A buffer of several whole pages back to back (a request's payload) is those pages."""
    pages = [*sample_pages[:5], bytes(PAGE_SIZE), sample_pages[5]]
    keys = [(4, i) for i in range(len(pages))]
    runs = [b"".join(pages[:3]), memoryview(bytearray(b"".join(pages[3:6]))), pages[6]]
    assert encode_pages(keys, runs, THRESHOLD, True) == encode_pages(keys, pages, THRESHOLD, True)
    with pytest.raises(ValueError, match="differ in number: 6 keys, 7 pages"):
        encode_pages(keys[:6], runs, THRESHOLD, True)
    with pytest.raises(ValueError, match="page 0 is 0 bytes, not whole pages"):
        encode_pages([], [b""], THRESHOLD, True)


def test_bad_arguments_are_errors(sample_pages: list[bytes]) -> None:
    with pytest.raises(ValueError, match="differ in number"):
        encode_pages([(1, 0)], sample_pages[:2], THRESHOLD, True)
    with pytest.raises(ValueError, match="page 1 is 4095 bytes"):
        encode_pages([(1, 0), (1, 1)], [sample_pages[0], sample_pages[1][1:]], THRESHOLD, True)
    with pytest.raises(ValueError, match="not contiguous"):
        encode_pages([(1, 0)], [memoryview(sample_pages[0] * 2)[::2]], THRESHOLD, True)
    with pytest.raises(ValueError, match="page 0 is not bytes"):
        encode_pages([(1, 0)], [memoryview(sample_pages[0]).cast("I")], THRESHOLD, True)
    with pytest.raises(ValueError, match="buffer 0 is not bytes"):
        open_zpages_at([(1, 0)], memoryview(sample_pages[0]).cast("I"), [0])
    with pytest.raises(OverflowError):
        encode_pages([(1, 1 << 32)], sample_pages[:1], THRESHOLD, True)
    with pytest.raises(TypeError):
        open_zpages_at([(1, 0)], "not bytes", [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in number"):
        open_zpages_at([], b"", [0])


def test_zpages_opened_where_they_lie(sample_pages: list[bytes]) -> None:
    """open_zpages_at reads each zpage at its offset in one buffer, up to its own length; one
    whose length runs past the buffer, or that starts past it, is corrupt."""
    keys = [(3, i) for i in range(4)]
    zpages = encode_pages(keys, sample_pages[:4], THRESHOLD, True)
    assert all(z is not None for z in zpages)
    arena = bytearray(b"\xaa" * 5)
    offsets = []
    for zpage in zpages:
        assert zpage is not None
        offsets.append(len(arena))
        arena += zpage + b"\x55" * 7  # slot padding after each
    view = memoryview(arena)
    assert open_zpages_at(keys, view, offsets) == sample_pages[:4]
    cut = view[: offsets[3] + HEADER_SIZE + 10]
    last = open_zpages_at(keys[3:], cut, offsets[3:])
    past = open_zpages_at(keys[:1], view, [len(arena) + 100])
    assert isinstance(last[0], str) and isinstance(past[0], str)
    with pytest.raises(ValueError, match="differ in number"):
        open_zpages_at(keys, view, offsets[:2])
