# The driver: runs the ramster layer's plans through a transport, with asyncio.
#
# The layer decides; the driver only moves bytes and reports back.  It talks to peers through a
# `Transport` (node/ implements it with gRPC; tests with an in-memory network), so this loop is
# the same code in production and in the policy tests.  Two background tasks that never wait for
# each other:
#
# - the heartbeat task, every heartbeat interval whatever else is queued: a heartbeat to every
#   member and to every seed that is not one (concurrently, each with its own deadline; replies
#   teach new members), then marks silent peers down and forgets members gone for good, then
#   asks each peer that answers for the first time what it still holds (`Reclaim`);
# - the pump task: flushes and sends of evicted zpages (per peer, in that order) and repairs
#   (fetch a surviving copy, place it again), pass after pass while calls succeed; when a pass
#   gets nothing through it sleeps until the layer queues new work or a heartbeat interval
#   passes.  A peer whose call failed is a suspect, and the layer gives it no flush, send or
#   repair until it answers a heartbeat again: retries are paced by heartbeats, never a spin.
#
# Gets of remote pages call `prefetch()` first (the node's chunked engine once per batch): the
# copies are fetched from live holders, grouped by holder in calls of FETCH_BATCH keys that are
# all in flight together, verified against their checksum and key, and staged for zcache's
# synchronous load; a holder that times out, fails or returns damaged bytes is skipped for the
# next one.
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from ramster.remote.layer import FetchSource, RamsterLayer, SendPlan
from ramster.remote.membership import PeerEvent, PeerInfo
from ramster.zcache import ZCache
from ramster.zcache.codec import zpage_key, zpage_length

log = logging.getLogger("ramster.remote")
PREFETCH_ROUNDS = 3
FETCH_BATCH = 128  # keys per GetZpages call; a batch's calls run concurrently


class Transport(Protocol):
    async def heartbeat(self, address: str, verify: bool = True) -> PeerInfo:
        """Who answers at `address`.  With `verify` (a member), only once it has shown that it
        is the node it claims; without (a seed heartbeated to discover members), anyone of the
        cluster may answer."""
        ...

    async def put(
        self, address: str, epoch: int, pool_id: int, zpages: list[bytes], locations: list[int]
    ) -> list[bool]:
        """Place zpages (each the version of its page that `locations` numbers) on a peer;
        per zpage whether it was stored."""
        ...

    async def get(
        self,
        address: str,
        epoch: int,
        pool_id: int,
        keys: list[tuple[int, int]],
        locations: list[int],
    ) -> list[bytes | None]:
        """The copies a peer holds of the versions `locations` number, None where it has none
        (a copy that is not that version may come back damaged: the caller verifies)."""
        ...

    async def flush(self, address: str, items: list[tuple[int, int, int, int]]) -> None: ...

    async def reclaim(self, address: str, epoch: int) -> set[tuple[int, int, int]]: ...


class RemoteDriver:
    def __init__(
        self,
        layer: RamsterLayer,
        cache: ZCache,
        transport: Transport,
        locate: Callable[[int], int] = lambda location: location,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layer = layer
        self.cache = cache
        self.transport = transport
        self.locate = locate  # zcache's location -> the layer's (0: another evictor's)
        self.clock = clock
        self.rounds = 0
        self.heartbeats = 0  # heartbeat rounds done
        self._work = asyncio.Event()
        self._reclaiming: set[str] = set()
        layer.wake = self._work.set

    async def run(self) -> None:
        """Heartbeat and pump forever, as two tasks (cancel to stop)."""
        await asyncio.gather(self._heartbeats(), self._pumping())

    async def _heartbeats(self) -> None:
        interval = self.layer.config.heartbeat_interval
        reclaims: set[asyncio.Task[None]] = set()
        while True:
            started = self.clock()
            await self.heartbeat()
            self._expire()
            for address in self._unsynced():
                if address not in self._reclaiming:
                    task = asyncio.create_task(self.reclaim(address))
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
        self._expire()
        for address in self._unsynced():
            await self.reclaim(address)
        while await self.pump():
            pass
        self.rounds += 1

    def _expire(self) -> None:
        now = self.clock()
        for address in self.layer.expire(now):
            log.warning("peer %s down", address)
        for address in self.layer.forget_gone(now):
            log.info("peer %s forgotten", address)

    def _unsynced(self) -> list[str]:
        return [p.address for p in self.layer.membership.peers.values() if p.up and not p.synced]

    async def heartbeat(self) -> None:
        """One heartbeat to every member and to every seed that is not one."""
        membership = self.layer.membership
        members, seeds = list(membership.peers), membership.discovery()
        replies = await asyncio.gather(
            *(self.transport.heartbeat(a) for a in members),
            *(self.transport.heartbeat(a, verify=False) for a in seeds),
            return_exceptions=True,
        )
        now = self.clock()
        for address, reply in zip([*members, *seeds], replies, strict=True):
            peer = membership.peers.get(address)
            if peer is not None:
                peer.asked = True
            if not isinstance(reply, PeerInfo):
                membership.failed(address)
                continue
            if address not in members and reply.address in ("", address):
                # a seed that is the member itself (as configured lists are): a member again
                self.layer.learn([address], now)
            events = (
                self.layer.heard(address, reply, now)
                if address in membership.peers
                else self.layer.learn([reply.address, *reply.members], now)
            )
            for peer_address, event in events:
                level = logging.ERROR if event is PeerEvent.CONFLICT else logging.INFO
                log.log(level, "peer %s %s", peer_address, event.value)
        self.heartbeats += 1

    async def reclaim(self, address: str) -> None:
        """Ask `address` what it still holds for us and let the layer match it."""
        peer = self.layer.membership.peers.get(address)
        if peer is None:
            return
        self._reclaiming.add(address)
        try:
            keys = await self.transport.reclaim(address, peer.epoch)
        except Exception as exc:
            log.info("reclaim from %s failed: %s", address, exc)
            self.layer.membership.failed(address)
            return
        finally:
            self._reclaiming.discard(address)
        held, before = len(keys), self.layer.stats.orphans_flushed
        self.layer.reclaimed(address, keys)
        log.info(
            "peer %s holds %d of our pages; %d unknown ones flushed",
            address,
            held,
            self.layer.stats.orphans_flushed - before,
        )

    async def pump(self) -> bool:
        """One pass over everything the layer queued; whether any call got through.

        Each peer's work runs in order: flushes, then puts.  A flush of a key must
        reach a holder before a newer copy of the same key does, or it would delete that copy;
        so if the flushes fail, that peer's puts are reported failed and placed elsewhere."""
        layer = self.layer
        sends: dict[str, list[SendPlan]] = {}
        for plan in layer.take_sends():
            sends.setdefault(plan.address, []).append(plan)
        flushes = layer.take_flushes(self.clock(), with_sends=sends)
        work = [
            self._peer_work(a, flushes.get(a, []), sends.get(a, [])) for a in {*flushes, *sends}
        ]
        repairs = layer.take_repairs()
        if repairs:
            work.append(self._repairs(repairs))
        return any(await asyncio.gather(*work))

    async def _peer_work(
        self, address: str, flushes: list[tuple[int, int, int, int]], plans: list[SendPlan]
    ) -> bool:
        if flushes and not await self._flush(address, flushes):
            for plan in plans:
                self.layer.sent(plan, [False] * len(plan.items))
            return False
        ok = bool(flushes)
        for plan in plans:
            ok = await self._send(plan) or ok
        return ok

    async def _send(self, plan: SendPlan) -> bool:
        try:
            stored = await self._put_plan(plan)
        except Exception as exc:
            log.info("send to %s failed: %s", plan.address, exc)
            self.layer.membership.failed(plan.address)
            self.layer.sent(plan, [False] * len(plan.items))
            return False
        self.layer.sent(plan, stored)
        return True

    async def _put_plan(self, plan: SendPlan) -> list[bool]:
        """Put a plan's zpages, one call per pool they belong to."""
        by_pool: dict[int, list[int]] = {}
        for i, (_, pool_id, _) in enumerate(plan.items):
            by_pool.setdefault(pool_id, []).append(i)
        stored = [False] * len(plan.items)
        for pool_id, idx in by_pool.items():
            got = await self.transport.put(
                plan.address,
                plan.epoch,
                pool_id,
                [plan.items[i][2] for i in idx],
                [plan.items[i][0] for i in idx],
            )
            for i, ok in zip(idx, got, strict=True):
                stored[i] = ok
        return stored

    async def _flush(self, address: str, items: list[tuple[int, int, int, int]]) -> bool:
        try:
            await self.transport.flush(address, items)
        except Exception:
            self.layer.flushed(address, items, ok=False)
            return False
        self.layer.flushed(address, items, ok=True)
        return True

    async def _repairs(self, repairs: list[tuple[int, list[FetchSource]]]) -> bool:
        copies = await self._fetch_many(repairs)
        for location, _ in repairs:
            self.layer.repaired(location, copies.get(location))
        return bool(copies)

    async def _fetch_many(self, wanted: list[tuple[int, list[FetchSource]]]) -> dict[int, bytes]:
        """The first intact copy of each location among its sources: every location asks its
        first source, those that failed ask their next.  A round's keys are grouped by holder
        and cut into calls of FETCH_BATCH keys, all in flight at once."""
        found: dict[int, bytes] = {}
        pending = [(loc, list(sources)) for loc, sources in wanted if sources]
        while pending:
            groups: dict[tuple[str, int, int], list[tuple[int, FetchSource]]] = {}
            for location, sources in pending:
                first = sources[0]
                groups.setdefault((first.address, first.epoch, first.pool_id), []).append(
                    (location, first)
                )
            calls = [
                self._get_group(group, items[start : start + FETCH_BATCH])
                for group, items in groups.items()
                for start in range(0, len(items), FETCH_BATCH)
            ]  # one call (a single get) is awaited as it is: no task to schedule
            replies = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
            for reply in replies:
                found.update(reply)
            pending = [(loc, sources[1:]) for loc, sources in pending if loc not in found]
            pending = [(loc, sources) for loc, sources in pending if sources]
        return found

    async def _get_group(
        self, group: tuple[str, int, int], items: list[tuple[int, FetchSource]]
    ) -> dict[int, bytes]:
        address, epoch, pool_id = group
        keys = [(src.oid, src.index) for _, src in items]
        try:
            zpages = await self.transport.get(
                address, epoch, pool_id, keys, [location for location, _ in items]
            )
        except Exception as exc:
            log.info("fetch of %d zpages from %s failed: %s", len(keys), address, exc)
            self.layer.membership.failed(address)
            return {}
        out = {}
        for (location, src), zpage in zip(items, zpages, strict=True):
            if zpage is not None and _intact(zpage, src.oid, src.index):
                out[location] = zpage
            elif zpage is not None:
                log.warning("peer %s returned a damaged copy", address)
                self.layer.damaged(location, address)
        return out

    async def prefetch(self, pool_id: int, keys: list[tuple[int, int]]) -> None:
        """Fetch and stage the remote copies a get of `keys` is about to load.

        While this awaits, the pump may settle a zpage that was still in the outbox (its bytes
        are then only on peers), and a holder may time out on a loaded machine, so the keys are
        looked at again after each fetch, a few times, until every remote copy they need is
        local: a page answers UNAVAILABLE only when every holder failed every round."""
        layer = self.layer
        for _ in range(PREFETCH_ROUNDS):
            mine = [self.locate(loc) for loc in self.cache.evicted_locations(pool_id, keys) if loc]
            wanted = [
                (loc, src) for loc in mine if loc for src in [layer.fetch_sources(loc)] if src
            ]
            if not wanted:
                return
            for location, zpage in (await self._fetch_many(wanted)).items():
                layer.stage(location, zpage)


def _intact(zpage: bytes, oid: int, index: int) -> bool:
    return 0 < zpage_length(zpage) == len(zpage) and zpage_key(zpage) == (oid, index)
