# The driver: performs the ramster layer's actions through a transport, with asyncio, and feeds
# back what happened as events (ramster/remote/events.py).
#
# The layer decides; the driver only moves bytes and reports back.  It talks to peers through a
# `Transport` (node/peering.py implements it with gRPC; tests with an in-memory network), so
# this loop is the same code in production and in the policy tests.  Two background tasks that
# never wait for each other:
#
# - the heartbeat task, every heartbeat interval whatever else is queued: the layer's probes
#   (every member, and every seed that is not one) concurrently, each with its own deadline,
#   their replies as Heard or Silent; then a Tick (silent peers go down, members gone for good
#   are forgotten); then the Reclaims the layer asks for (members that answer for the first time
#   say what they still hold for us);
# - the pump task: the layer's actions (per peer its Flushes, then its Sends, and a Fetch for
#   repairs), pass after pass while calls succeed; when a pass gets nothing through it sleeps
#   until the layer queues new work or a heartbeat interval passes.  A peer whose call failed
#   is a suspect, and the layer gives it no flush, send or repair until it answers a heartbeat
#   again: retries are paced by heartbeats, never a spin.  A zpage that a pass sends to several
#   peers (its replicas) is sealed once (Transport.seal), and its blob goes to every one.
#
# Gets of remote pages call `prefetch()` first (the node's chunked engine once per batch): the
# copies the layer wants are fetched from live holders, grouped by holder in calls of
# FETCH_BATCH slots that are all in flight together, opened from their seal by the transport
# (zcache checks each one's checksum and key again when it opens it), and handed back (Fetched)
# for zcache's synchronous load; a holder that times out, fails or returns damaged bytes is
# skipped for the next one.
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from node.readahead import ReadAhead
from ramster.remote.events import (
    Fetch,
    Fetched,
    Flush,
    Flushed,
    FlushItem,
    Heard,
    Reclaim,
    Reclaimed,
    Refused,
    Send,
    Sent,
    Silent,
    Tick,
    Wanted,
)
from ramster.remote.layer import MemberEvents, RamsterLayer
from ramster.remote.membership import PeerEvent, PeerInfo

log = logging.getLogger("ramster.remote")
PREFETCH_ROUNDS = 3
FETCH_BATCH = 128  # slots per GetZpages call; a batch's calls run concurrently


class Transport(Protocol):
    async def heartbeat(self, address: str, verify: bool = True) -> PeerInfo:
        """Who answers at `address`.  With `verify` (a member), only once it has shown that it
        is the node it claims; without (a seed heartbeated to discover members), anyone of the
        cluster may answer."""
        ...

    def seal(self, pool_id: int, location: int, zpage: bytes) -> bytes:
        """`zpage`, the version of its page that `location` numbers, as it travels to holders:
        GrpcTransport seals it under the owner's key, bound to pool and location but not to a
        holder, so one blob serves every copy."""
        ...

    async def put(
        self, address: str, epoch: int, pool_id: int, blobs: list[bytes], locations: list[int]
    ) -> list[bool]:
        """Place sealed zpages (`seal`'s blobs of the versions `locations` number) on a peer;
        per blob whether it was stored."""
        ...

    async def get(
        self, address: str, epoch: int, pool_id: int, locations: list[int]
    ) -> list[bytes | None]:
        """The copies a peer holds of the versions `locations` number: None where it has none,
        b"" where what it has is not that version (damaged).  The transport verifies:
        GrpcTransport opens the owner's seal, which authenticates every byte."""
        ...

    async def flush(self, address: str, items: tuple[FlushItem, ...]) -> None: ...

    async def reclaim(self, address: str, epoch: int) -> set[tuple[int, int]]:
        """(pool id, slot) of every copy the peer holds for us."""
        ...


class RemoteDriver:
    def __init__(
        self,
        layer: RamsterLayer,
        transport: Transport,
        locations: Callable[[int, list[tuple[int, int]]], list[int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layer = layer
        self.transport = transport
        self.locations = locations  # the layer's locations of keys zcache evicted to it
        self.clock = clock
        self.rounds = 0
        self.heartbeats = 0  # heartbeat rounds done
        self._work = asyncio.Event()
        self._reclaiming: set[str] = set()
        self.ahead = ReadAhead(self._fetch_missing)
        layer.wake = self._work.set

    def _handle(self, event: Heard | Silent | Tick) -> None:
        self._log(self.layer.handle(event))

    @staticmethod
    def _log(events: MemberEvents) -> None:
        for address, event in events:
            if event is PeerEvent.CONFLICT:
                log.error("peer %s uses our node id: ignored", address)
            elif event is PeerEvent.DOWN:
                log.warning("peer %s down", address)
            else:
                log.info("peer %s %s", address, event.value)

    async def run(self) -> None:
        """Heartbeat and pump forever, as two tasks (cancel to stop)."""
        await asyncio.gather(self._heartbeats(), self._pumping())

    async def _heartbeats(self) -> None:
        interval = self.layer.config.heartbeat_interval
        reclaims: set[asyncio.Task[None]] = set()
        while True:
            started = self.clock()
            await self.heartbeat()
            for action in self.layer.reclaims():
                if action.address not in self._reclaiming:
                    task = asyncio.create_task(self.reclaim(action))
                    reclaims.add(task)
                    task.add_done_callback(reclaims.discard)
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    async def _pumping(self) -> None:
        interval = self.layer.config.heartbeat_interval
        while True:
            self._work.clear()
            if not await self.pump():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._work.wait(), interval)

    async def round(self) -> None:
        """One heartbeat round, the reclaims it calls for, then pump passes while they get
        anything through (the in-memory policy tests step the cluster with this)."""
        await self.heartbeat()
        for action in self.layer.reclaims():
            await self.reclaim(action)
        while await self.pump():
            pass
        self.rounds += 1

    async def heartbeat(self) -> None:
        """Every probe the layer wants, concurrently; then the clock's Tick."""
        probes = self.layer.probes()
        replies = await asyncio.gather(
            *(self.transport.heartbeat(p.address, p.verify) for p in probes),
            return_exceptions=True,
        )
        now = self.clock()
        for probe, reply in zip(probes, replies, strict=True):
            if isinstance(reply, PeerInfo):
                self._handle(Heard(probe.address, reply, now))
            else:
                self._handle(Silent(probe.address))
        self._handle(Tick(self.clock()))
        self.heartbeats += 1

    async def reclaim(self, action: Reclaim) -> None:
        """Ask a peer what it still holds for us and let the layer match it."""
        self._reclaiming.add(action.address)
        try:
            copies = await self.transport.reclaim(action.address, action.epoch)
        except Exception as exc:
            log.info("reclaim from %s failed: %s", action.address, exc)
            self._handle(Silent(action.address))
            return
        finally:
            self._reclaiming.discard(action.address)
        stats = self.layer.stats
        before = stats.orphans_flushed
        self.layer.handle(Reclaimed(action.address, frozenset(copies)))
        log.info(
            "peer %s holds %d of our pages; %d unknown ones flushed",
            action.address,
            len(copies),
            stats.orphans_flushed - before,
        )

    async def pump(self) -> bool:
        """One pass over the layer's actions; whether any call got through.  Each peer's work
        runs in order, flushes then sends: if its flushes fail, its sends are not made (they
        are refused, and placed elsewhere).  A zpage the pass sends to several peers (its
        replicas) is sealed once, for all of them."""
        flushes: dict[str, list[Flush]] = {}
        sends: dict[str, list[Send]] = {}
        work = []
        for action in self.layer.actions(self.clock()):
            if isinstance(action, Flush):
                flushes.setdefault(action.address, []).append(action)
            elif isinstance(action, Send):
                sends.setdefault(action.address, []).append(action)
            elif isinstance(action, Fetch):
                work.append(self._fetch(action))
        sealed: dict[int, bytes] = {}  # the pass's blobs, by location
        work += [
            self._peer_work(flushes.get(a, []), sends.get(a, []), sealed)
            for a in {*flushes, *sends}
        ]
        return any(await asyncio.gather(*work))

    async def _peer_work(
        self, flushes: list[Flush], sends: list[Send], sealed: dict[int, bytes]
    ) -> bool:
        for flush in flushes:
            try:
                await self.transport.flush(flush.address, flush.items)
            except Exception:
                self.layer.handle(Flushed(flush, ok=False))
                for send in sends:
                    self.layer.handle(Refused(send))
                return False
            self.layer.handle(Flushed(flush, ok=True))
        ok = bool(flushes)
        for send in sends:
            ok = await self._send(send, sealed) or ok
        return ok

    async def _send(self, send: Send, sealed: dict[int, bytes]) -> bool:
        try:
            stored = await self._put(send, sealed)
        except Exception as exc:
            log.info("send to %s failed: %s", send.address, exc)
            self.layer.handle(Refused(send))
            return False
        self.layer.handle(Sent(send, tuple(stored)))
        return True

    async def _put(self, send: Send, sealed: dict[int, bytes]) -> list[bool]:
        """Put a Send's zpages, one call per pool they belong to, each sealed once per pass
        (`sealed`, by location: its blob binds no holder)."""
        seal = self.transport.seal
        by_pool: dict[int, tuple[list[int], list[bytes], list[int]]] = {}
        for i, (location, pool_id, zpage) in enumerate(send.items):
            blob = sealed.get(location)
            if blob is None:
                blob = sealed[location] = seal(pool_id, location, zpage)
            group = by_pool.get(pool_id)
            if group is None:
                group = by_pool[pool_id] = ([], [], [])
            group[0].append(i)
            group[1].append(blob)
            group[2].append(location)
        stored = [False] * len(send.items)
        for pool_id, (idx, blobs, locations) in by_pool.items():
            got = await self.transport.put(send.address, send.epoch, pool_id, blobs, locations)
            for i, ok in zip(idx, got, strict=True):
                stored[i] = ok
        return stored

    async def _fetch(self, fetch: Fetch) -> bool:
        """Perform a Fetch and hand the layer what came back; whether anything did."""
        damaged: list[tuple[int, str]] = []
        copies = await self._fetch_many(fetch.wanted, damaged)
        self.layer.handle(Fetched(fetch, copies, tuple(damaged)))
        return bool(copies)

    async def _fetch_many(
        self, wanted: tuple[Wanted, ...], damaged: list[tuple[int, str]]
    ) -> dict[int, bytes]:
        """The first intact copy of each location among its sources: every location asks its
        first source, those that failed ask their next.  A round's keys are grouped by holder
        and cut into calls of FETCH_BATCH keys, all in flight at once."""
        found: dict[int, bytes] = {}
        pending = [(loc, pool, sources) for loc, pool, sources in wanted if sources]
        while pending:
            groups: dict[tuple[str, int, int], list[int]] = {}
            for location, pool_id, sources in pending:
                first = sources[0]
                groups.setdefault((first.address, first.epoch, pool_id), []).append(location)
            calls = [
                self._get_group(group, items[start : start + FETCH_BATCH], damaged)
                for group, items in groups.items()
                for start in range(0, len(items), FETCH_BATCH)
            ]  # one call (a single get) is awaited as it is: no task to schedule
            replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
            for reply in replies:
                found.update(reply)
            pending = [
                (loc, pool, sources[1:])
                for loc, pool, sources in pending
                if loc not in found and len(sources) > 1
            ]
        return found

    async def _get_group(
        self, group: tuple[str, int, int], locations: list[int], damaged: list[tuple[int, str]]
    ) -> dict[int, bytes]:
        address, epoch, pool_id = group
        try:
            zpages = await self.transport.get(address, epoch, pool_id, locations)
        except Exception as exc:
            log.info("fetch of %d zpages from %s failed: %s", len(locations), address, exc)
            self._handle(Silent(address))
            return {}
        out = {}
        for location, zpage in zip(locations, zpages, strict=True):
            if zpage:
                out[location] = zpage
            elif zpage is not None:
                log.warning("peer %s returned a damaged copy", address)
                damaged.append((location, address))
        return out

    async def prefetch(
        self, pool_id: int, keys: list[tuple[int, int]]
    ) -> Callable[[], bool] | None:
        """Fetch the remote copies a get of `keys` is about to load, then read ahead if the
        get continues a stream (node/readahead.py).

        While this awaits, the pump may settle a zpage that was still in the outbox (its bytes
        are then only on peers), and a holder may time out on a loaded machine, so the keys are
        looked at again after each fetch, a few times, until every remote copy they need is
        local: a page answers UNAVAILABLE only when every holder failed every round.

        Once nothing is left to fetch, a check that stays true while every copy these keys (or
        any of them) need is still local: until the layer drops a local copy (local_losses), so
        the chunks of a get need not look again.  None if some copy could not be fetched."""
        ahead = self.ahead.pending(pool_id, keys)
        if ahead is not None:  # these pages are being fetched already (done, failed or not)
            await asyncio.wait([ahead])
        done = False
        for _ in range(PREFETCH_ROUNDS):
            if not await self._fetch_missing(pool_id, keys):
                done = True
                break
        self.ahead.advance(pool_id, keys)
        if not done:
            return None
        layer, losses = self.layer, self.layer.local_losses
        return lambda: layer.local_losses == losses

    async def _fetch_missing(self, pool_id: int, keys: list[tuple[int, int]]) -> bool:
        """Fetch the remote copies of `keys` that are not local; whether any were wanted."""
        fetch = self.layer.fetch_for([loc for loc in self.locations(pool_id, keys) if loc])
        if fetch is None:
            return False
        await self._fetch(fetch)
        return True
