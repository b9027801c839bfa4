# Sealed remote pages: what a holder keeps is unreadable, and a copy it flips, forges or replays
# (an older version of the same key) does not open, so the owner counts it damaged and the next
# copy serves; a reply whose sizes do not add up is a failed call.  The transport and the peer
# service run for real over gRPC on loopback.
from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from node.sealing import (
    OVERHEAD,
    SEALING_KEY_FILE,
    Sealer,
    SealingKeyError,
    load_sealing_key,
)
from ramster.remote.foreign import MAX_SPLIT
from ramster.v1 import peer_pb2 as pb
from ramster.v1 import peer_pb2_grpc
from ramster.zcache.codec import HEADER_SIZE, PAGE_SIZE, compress, make_zpage, open_zpage
from tests.security.conftest import KEY, Pair


def zpages_of(pages: list[bytes]) -> list[bytes]:
    return [make_zpage(5, i, compress(p)) for i, p in enumerate(pages)]


def test_a_seal_opens_only_for_its_owner_pool_and_version() -> None:
    sealer = Sealer(KEY, "n1")
    zpage = make_zpage(5, 9, b"payload" * 50)
    location = 7 << 32 | 77
    blob = sealer.seal(3, location, zpage)
    assert len(blob) == len(zpage) + OVERHEAD
    assert b"payload" not in blob
    assert sealer.open(3, location, blob) == zpage
    # another pool, another slot, an older or newer version of the same slot
    for where in [(4, location), (3, 7 << 32 | 78), (3, 6 << 32 | 77), (3, 8 << 32 | 77)]:
        assert sealer.open(*where, blob) is None
    assert Sealer(KEY, "n2").open(3, location, blob) is None  # another owner's seal
    assert Sealer(bytes(32), "n1").open(3, location, blob) is None  # another key
    for at in (0, 12, len(blob) - 1):
        flipped = bytearray(blob)
        flipped[at] ^= 0x40
        assert sealer.open(3, location, bytes(flipped)) is None
    assert sealer.open(3, location, blob[: OVERHEAD - 1]) is None
    assert sealer.seal(3, location, zpage)[:12] != blob[:12]  # never the same nonce twice


def test_the_sealing_key_is_made_once_private_and_checked(tmp_path: Path) -> None:
    key = load_sealing_key(tmp_path)
    path = tmp_path / SEALING_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_sealing_key(tmp_path) == key and len(key) == 32
    os.chmod(path, 0o644)
    with pytest.raises(SealingKeyError, match="readable by others"):
        load_sealing_key(tmp_path)
    os.chmod(path, 0o600)
    path.write_bytes(key[:16])
    with pytest.raises(SealingKeyError, match="damaged"):
        load_sealing_key(tmp_path)


async def test_holder_keeps_only_sealed_blobs_and_owner_reads_them_back(
    pair: Pair, compressible_pages: list[bytes]
) -> None:
    zpages = zpages_of(compressible_pages[:20])
    locations = [2 << 32 | slot for slot in range(100, 120)]
    assert await pair.put(3, zpages, locations) == [True] * 20
    held = pair.holder.get(pair.owner, 1, 3, list(range(100, 120)))  # filed by slot
    for zpage, blob in zip(zpages, held, strict=True):
        assert blob is not None and len(blob) == len(zpage) + OVERHEAD
        assert zpage[HEADER_SIZE:][:64] not in blob  # no plaintext stretch of the payload
    assert await pair.transport.get(pair.address, 1, 3, locations) == zpages
    got = await pair.transport.get(pair.address, 1, 3, [2 << 32 | 99])
    assert got == [None]  # not held


async def test_flipped_forged_and_replayed_copies_do_not_open(
    pair: Pair, compressible_pages: list[bytes]
) -> None:
    # version 1 of key (5, 0) at location 1:10, then (slot 10 reused) version 2 at 2:10
    (old,) = zpages_of(compressible_pages[:1])
    new = make_zpage(5, 0, compress(compressible_pages[1]))
    other = make_zpage(5, 1, compress(compressible_pages[2]))
    v1, v2, elsewhere = 1 << 32 | 10, 2 << 32 | 10, 2 << 32 | 12
    assert await pair.put(3, [old], [v1]) == [True]
    (replay,) = pair.holder.get(pair.owner, 1, 3, [10])
    assert await pair.put(3, [new, other], [v2, elsewhere]) == [
        True,
        True,
    ]
    assert replay is not None
    (current,) = pair.holder.get(pair.owner, 1, 3, [10])
    assert current is not None
    flipped = bytearray(current)
    flipped[len(flipped) // 2] ^= 1
    (moved,) = pair.holder.get(pair.owner, 1, 3, [12])
    assert moved is not None
    forged = make_zpage(5, 0, compress(b"forged" * 682 + b"!!!!"))
    attacks = {
        "replay of version 1": replay,
        "flipped bit": bytes(flipped),
        "another page's blob": moved,
        "plain zpage": forged,
        "plain zpage with a seal's length": forged + bytes(OVERHEAD),
    }
    for name, blob in attacks.items():
        assert pair.holder.put(pair.owner, 1, 3, [10], [blob]) == [True], name
        got = await pair.transport.get(pair.address, 1, 3, [v2])
        assert got == [b""], name  # damaged: the driver tries the next holder
    pair.holder.put(pair.owner, 1, 3, [10], [current])
    assert await pair.transport.get(pair.address, 1, 3, [v2]) == [new]
    assert open_zpage(new, 5, 0) == compressible_pages[1]


async def test_a_raw_zpage_travels_sealed_and_one_past_what_a_holder_takes_does_not(
    pair: Pair, incompressible_pages: list[bytes], compressible_pages: list[bytes]
) -> None:
    """A raw zpage, 4142 bytes sealed, is more than a holder's slot: the holder keeps it in two
    and gives it back whole.  A blob past MAX_SPLIT is refused without a call."""
    raw = make_zpage(5, 0, incompressible_pages[0])
    assert len(raw) == HEADER_SIZE + PAGE_SIZE
    small = make_zpage(5, 1, compress(compressible_pages[0]))
    assert await pair.put(3, [raw, small], [1, 2]) == [True, True]
    assert pair.holder.pages == 2
    assert await pair.transport.get(pair.address, 1, 3, [1, 2]) == [raw, small]
    too_long = os.urandom(MAX_SPLIT - OVERHEAD + 1)
    calls = pair.holder.moved
    assert await pair.put(3, [too_long], [3]) == [False]
    assert pair.holder.moved == calls and pair.holder.pages == 2


class LyingHolder(peer_pb2_grpc.PeerServicer):
    """A holder whose fetch replies do not match what was asked."""

    def __init__(self, reply: pb.GetZpagesResponse) -> None:
        self.reply = reply

    async def FetchZpages(  # type: ignore[override]
        self, requests: AsyncIterator[pb.GetZpagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetZpagesResponse]:
        async for _ in requests:
            yield self.reply


@pytest.mark.parametrize(
    ("zpages", "sizes", "error"),
    [
        (b"x" * 100, [60, 60], "add up to 120 bytes, the blob has 100"),  # past the bytes
        (b"x" * 100, [60, 30], "add up to 90 bytes, the blob has 100"),  # short of them
        (b"x" * 100, [100], "answered for 1 of 2 slots"),  # fewer answers than slots
    ],
)
async def test_a_holder_reply_that_does_not_add_up_is_a_failed_call(
    pair: Pair, zpages: bytes, sizes: list[int], error: str
) -> None:
    server = grpc.aio.server()
    lying = LyingHolder(pb.GetZpagesResponse(zpages=zpages, sizes=sizes))
    peer_pb2_grpc.add_PeerServicer_to_server(lying, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        with pytest.raises(ValueError, match=error):  # the driver marks the holder failed
            await pair.transport.get(f"127.0.0.1:{port}", 1, 3, [1 << 32 | 10, 1 << 32 | 11])
        lying.reply = pb.GetZpagesResponse(zpages=b"short", sizes=[5, 0])
        got = await pair.transport.get(f"127.0.0.1:{port}", 1, 3, [1 << 32 | 10, 1 << 32 | 11])
        assert got == [b"", None]  # too short to be a seal: damaged; nothing: not held
    finally:
        await server.stop(0)
