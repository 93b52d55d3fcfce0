"""Which partitions this worker serves, and the takeovers (DESIGN.md §11, Owners).

On every tick (a few per second) the worker renews its leases, looks at every partition's
owner and at the live workers (their records in ``<prefix>:meta``), hands over the partitions
assigned to another live worker and takes the free ones assigned to it (or orphaned). A
takeover is: the lease, then the database fence raised (worker/db/fencing.py), then every entry
pending in the partition claimed, to be served first and in stream order, and only then new
entries. A handover stops reading the partition, lets its running units finish, and drops the
lease, so the next owner finds nothing half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.db import fencing
from worker.errors import classify
from worker.ops.metrics import Metrics
from worker.stream import deployment
from worker.stream.names import Entry
from worker.stream.owners import Leases, plan
from worker.stream.reading import Reader
from worker.stream.transport import Transport

log = logging.getLogger(__name__)


async def _nothing_runs(_partition: int, _timeout_s: float) -> None:
    return None


#: How long a takeover waits for a paused old owner's transactions before ending them.
TAKEOVER_WAIT_S: Final = 1.0
#: How long a handover waits for the partition's running units (then its lease goes anyway;
#: the database fence keeps a unit still running from committing after the next owner's).
_HANDOVER_WAIT_S: Final = 60.0
#: On stop the units were drained already: handovers finish at once, or are cut short.
_STOP_HANDOVER_S: Final = 5.0


@dataclass
class Ownership:
    leases: Leases
    reader: Reader
    transport: Transport
    engine: AsyncEngine
    metrics: Metrics
    #: Partitions served now -> the generation this worker raised their fence to.
    generations: dict[int, int] = field(default_factory=dict)
    #: Entries claimed at takeovers, to serve before anything new, in order.
    backlog: deque[Entry] = field(default_factory=deque)
    #: Waits (at most the given seconds) for the partition's running units (the service's).
    settle: Callable[[int, float], Awaitable[None]] = _nothing_runs
    #: Set once the first tick has taken this worker's share: it is serving.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    _handing_over: set[int] = field(default_factory=set)
    _handovers: set[asyncio.Task[None]] = field(default_factory=set)
    #: Partitions being taken over -> new entries read from them meanwhile (see `serving`).
    _taking: dict[int, list[Entry]] = field(default_factory=dict)

    @property
    def tick_s(self) -> float:
        return min(0.25, self.leases.lease_ms / 10_000)

    def owned(self) -> list[int]:
        return sorted(self.generations)

    def serving(self, entries: list[Entry]) -> list[Entry]:
        """Of ``entries`` just read, those to run now: the ones of partitions served.

        A partition can be taken over again by this very worker (its lease lapsed unnoticed,
        during a pause) while it is still read under the old generation: the lease names the
        same worker. An entry read after that takeover's claim is in no claim, and run under
        the old generation it would be fenced and then left pending for good. So entries
        read while their partition is being taken over wait for the takeover, and are served
        right after what it claimed (they are newer than all of it)."""
        now = []
        for entry in entries:
            if (waiting := self._taking.get(entry.partition)) is not None:
                waiting.append(entry)
            elif entry.partition in self.generations:
                now.append(entry)
        return now

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop``; then hand every partition over (SIGTERM: at once). Leases are
        renewed by a loop of their own, so a slow takeover never lets the others lapse."""
        renewing = asyncio.create_task(self._renew_until(stop), name="lease renewal")
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception as error:  # noqa: BLE001 - logged; the next tick tries again
                    log.warning("ownership: %s", classify(error).message)
                self.settled.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.tick_s)
        finally:
            await self.release_all()
            await renewing

    async def _renew_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                for number in await self.leases.renew():
                    self.lost(number)
            except Exception as error:  # noqa: BLE001 - logged; renewed on the next round
                log.warning("ownership: renewing leases: %s", classify(error).message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.tick_s)

    async def tick(self) -> None:
        """Look at every partition's owner and the live workers; take and hand over."""
        owners = await self.leases.survey()
        live = {record.consumer for record in
                await deployment.records(self.transport.redis, self.transport.names)
                if record.live}  # fmt: skip
        free_for_s = self.leases.free_for_s()
        steps = plan(me=self.leases.me, owners=owners, live=live, free_for_s=free_for_s,
                     orphan_after_s=deployment.LIVE_S)  # fmt: skip
        for number in steps.release:
            await self.hand_over(number)
        for number in steps.take:
            if number not in self._handing_over:
                await self.take(number)

    async def take(self, number: int) -> bool:
        if not await self.leases.acquire(number):
            return False
        read_meanwhile = self._taking[number] = []
        try:
            generation = await fencing.take(self.engine, number, wait_s=TAKEOVER_WAIT_S)
            try:
                claim = await self.reader.claim_all(number)
            except ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise  # a failover's errors too: the takeover fails and is tried again
                # The stream or group vanished (a DEL, a Redis restart without persistence).
                await self.transport.ensure_groups(self.leases.partitions)
                claim = await self.reader.claim_all(number)
            if claim.deleted:
                await self.transport.drop_deleted(number, claim.deleted)
        except BaseException:
            # Whatever was claimed or read meanwhile stays pending: the next owner claims it.
            await self.leases.release(number)
            raise
        finally:
            del self._taking[number]
        claimed = {entry.id for entry in claim.entries}
        self.backlog.extend(claim.entries)
        self.backlog.extend(entry for entry in read_meanwhile if entry.id not in claimed)
        self.generations[number] = generation
        self.metrics.takeovers.inc()
        log.info("partition %d: taken over (generation %d, %d pending entr(y/ies) first)",
                 number, generation, len(claim.entries))  # fmt: skip
        return True

    def lost(self, number: int, why: str = "lease lost") -> None:
        """The lease is gone (expired, or another worker has it): serve the partition no more.
        Units still running there are fenced by the database if a new owner took over."""
        if self.generations.pop(number, None) is not None:
            log.warning("partition %d: %s; no longer served here", number, why)
        self._forget_backlog(number)

    async def fenced(self, stale: Mapping[int, int]) -> None:
        """A unit ran under these generations (partition -> generation) and found newer ones.
        Where this worker still serves a partition under that generation, it missed the
        change of owner: it serves the partition no more, and gives up its lease if Redis
        still names it, so that a takeover (perhaps its own) claims the entries left pending
        here instead of their waiting under a stale generation for good."""
        for number, generation in sorted(stale.items()):
            if self.generations.get(number) != generation or number in self._taking:
                continue  # handed over, lost, or taken again (or being taken) by this worker
            self.lost(number, f"fenced out of generation {generation}")
            try:
                await self.leases.release(number)  # only if the lease still names this worker
            except Exception as error:  # noqa: BLE001 - no longer renewed, it lapses anyway
                log.warning("partition %d: releasing its lease: %s", number,
                            classify(error).message)  # fmt: skip

    async def hand_over(self, number: int) -> None:
        """Stop reading ``number``; once its running units are done, drop its lease (kept
        renewed until then). In the background: a slow job must not hold up the ticks."""
        if number in self._handing_over:
            return
        self.generations.pop(number, None)
        self._forget_backlog(number)
        self._handing_over.add(number)

        async def finish() -> None:
            try:
                await self.settle(number, _HANDOVER_WAIT_S)
                await self.leases.release(number)
                log.info("partition %d: handed over", number)
            finally:
                self._handing_over.discard(number)

        task = asyncio.create_task(finish(), name=f"hand over partition {number}")
        self._handovers.add(task)
        task.add_done_callback(self._handovers.discard)

    async def release_all(self) -> None:
        """On stop, after the drain (nothing runs any more): every lease goes now, so others
        take over at once."""
        for number in sorted(self.leases.held):
            await self.hand_over(number)
        if self._handovers:
            _, late = await asyncio.wait(set(self._handovers), timeout=_STOP_HANDOVER_S)
            for task in late:
                task.cancel()
            for number in sorted(self.leases.held):  # their lease must not wait for expiry
                with contextlib.suppress(Exception):
                    await self.leases.release(number)

    def _forget_backlog(self, number: int) -> None:
        if any(entry.partition == number for entry in self.backlog):
            self.backlog = deque(entry for entry in self.backlog if entry.partition != number)
