"""The ingest mover (DESIGN.md §11): entries XADDed to ``<prefix>:jobs`` go to their partition
streams, in the order they were added, each exactly once, and never out of order, even when a
mover stalls and comes back after another took over.

One worker at a time moves: the holder of the mover lease ``{<prefix>:jobs}:mover`` (in the
ingest stream's slot), whose value carries a generation that grows at every takeover. Three
scripts make it safe, each confined to one slot, so the same code serves a Redis Cluster:

- **Fenced reads** (ingest slot): the lease is checked in the same script that reads with
  XREADGROUP (or, at a takeover, XAUTOCLAIMs the previous movers' pending entries). Once a
  new mover holds the lease, an old one can read nothing more: the new mover's first look at
  the pending list sees every entry any mover was ever handed.
- **Fenced, idempotent moves** (partition slot): ``<prefix>:{p<n>}:moved`` keeps the newest
  mover generation that wrote into partition n and the last ingest id moved there. A move by
  an older generation is refused (that mover stops); an entry whose ingest id is not past the
  mark is already there (skipped). Every mover moves its entries in ingest order, so a mark
  past an id means that id was moved.
- **Ack** (ingest slot): XACK and XDEL once the moves are done. A crash in between repeats
  moves, which the marks skip. On a cluster, once a replica of each partition's primary also
  has them (worker/stream/replicated.py): a failover must not keep the ack and lose a move.

On a single Redis, where every key lives on one server, the entries a wait finds are read,
moved and acked by one script (``READ_MOVE``) that makes the same three checks in one step:
a lone job crosses the mover in two round trips (the wait, the script) instead of four.

A moved entry keeps its fields and gains ``src``, its ingest entry id: a job without an ``id``
is known by that id, the one its producer's XADD returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from worker.errors import classify
from worker.job.order import partition_of_raw
from worker.stream import mover_lua as lua
from worker.stream.mover_lease import MoverLease
from worker.stream.names import read_streams, text
from worker.stream.replicated import ReplicatedWrites
from worker.stream.scripts import Call, run_each

log = logging.getLogger(__name__)

#: The ingest entry's id in a moved entry.
SOURCE: Final = b"src"
#: On a cluster, how long a replica may take to confirm a round of moves.
_WAIT_REPLICA_MS: Final = 1000


@dataclass
class Moved:
    """What one round of moving did."""

    moved: int = 0
    skipped: int = 0
    #: False once this mover found it no longer holds the lease (it stops moving).
    holding: bool = True


@dataclass(kw_only=True)
class Mover(MoverLease):
    group: str
    partitions: int
    batch: int = 500
    _claim_cursor: str | None = field(default="0-0", init=False)
    #: The last ingest id handed out, once a read found nothing new: what to wait past.
    _last_delivered: str = field(default="$", init=False)
    #: The last read handed out fewer new entries than a batch: the ingest held no more, so
    #: once they are moved the mover waits past them without asking again (one script call
    #: fewer per lone job: its latency).
    _caught_up: bool = field(default=False, init=False)

    _replicated: ReplicatedWrites | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.redis, RedisCluster):
            self._replicated = ReplicatedWrites(self.redis, timeout_ms=_WAIT_REPLICA_MS)
        self._read = self.redis.register_script(lua.READ)
        self._move = self.redis.register_script(lua.MOVE)
        self._read_move = self.redis.register_script(lua.READ_MOVE)

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.names.stream, self.group, id="0", mkstream=True)
        except ResponseError as error:
            if not str(error).startswith("BUSYGROUP"):
                raise

    async def acquire(self) -> bool:
        """Take the mover lease if it is free; the previous movers' pending entries are then
        moved first (see :meth:`step`)."""
        if not await super().acquire():
            return False
        self._claim_cursor = "0-0"
        return True

    async def step(self) -> Moved:
        """Move one batch: the pending entries left by earlier movers first, then new ones."""
        entries = await self.read()
        if entries is None:
            return Moved(holding=False)
        return await self.move(entries)

    async def read(self) -> list[tuple[str, Any]] | None:
        """The next batch, in ingest order; None when this mover no longer holds the lease."""
        if self.token is None:
            return None
        mode = self._claim_cursor or "new"
        args: list[str | int] = [self.token, self.group, self.me, self.batch, mode]
        answer: Any = await self._read(keys=[self.names.stream, self.names.mover], args=args)
        if not answer:
            self.token = None
            return None
        kind, body = text(answer[0]), answer[1] if len(answer) > 1 else []
        self._caught_up = False
        if kind == "claimed":
            cursor = text(body[0])
            self._claim_cursor = None if cursor == "0-0" else cursor
            if deleted := [text(entry_id) for entry_id in (body[2] if len(body) > 2 else [])]:
                await self._ack(deleted)  # their data is gone: nothing to move
            claimed = [(text(entry_id), fields) for entry_id, fields in body[1] if fields]
            return claimed if claimed or self._claim_cursor else await self.read()
        if kind == "idle":
            self._last_delivered = text(body)
            return []
        entries = [(text(entry), fields) for _, found in body or () for entry, fields in found]
        if entries and len(entries) < self.batch:
            self._caught_up, self._last_delivered = True, entries[-1][0]
        return entries

    async def move(self, entries: Sequence[tuple[str, Any]]) -> Moved:
        """Move ``entries`` (from :meth:`read`) to their partitions, then ack them."""
        if not entries:
            return Moved()
        by_partition: dict[int, list[Any]] = defaultdict(list)
        for entry_id, fields in entries:
            pairs = _pairs(fields)
            by_partition[self._route(entry_id, pairs)] += [entry_id, len(pairs) // 2, *pairs]
        calls: list[Call] = [
            ([self.names.partition(number), self.names.moved(number)], [self.generation, *args])
            for number, args in by_partition.items()
        ]
        if self._replicated is not None:
            results = await self._replicated.run(self._move, calls)
        else:
            results = await run_each(self.redis, self._move, calls)
        if any(int(result) < 0 for result in results):
            log.warning("mover generation %d was fenced out by a newer mover; stopping",
                        self.generation)  # fmt: skip
            self.token = None
            return Moved(holding=False)
        moved = sum(int(result) for result in results)
        await self._ack([entry_id for entry_id, _ in entries])
        return Moved(moved=moved, skipped=len(entries) - moved)

    async def run(self, stop: asyncio.Event, *, idle_block_ms: int) -> None:
        """Move while holding the lease, try to take it while not, until ``stop``."""
        tick_s = min(1.0, self.lease_ms / 3000)
        try:
            while not stop.is_set():
                try:
                    if not await self._turn(tick_s, idle_block_ms):
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), tick_s)
                except ResponseError as error:
                    if "NOGROUP" in str(error):
                        # The stream or group vanished (a Redis restart without persistence).
                        log.warning("ingest mover: the group is missing; recreating it")
                        await self.ensure_group()
                        continue
                    if not classify(error).retryable:  # a failover passes; the rest is a bug
                        raise
                    log.warning("ingest mover: %s", classify(error).message)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), tick_s)
                except Exception as error:  # noqa: BLE001 - logged; tried again next turn
                    log.warning("ingest mover: %s", classify(error).message)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), tick_s)
        finally:
            with contextlib.suppress(Exception):
                await self.release()
            if self._replicated is not None:
                await self._replicated.aclose()

    async def _turn(self, tick_s: float, idle_block_ms: int) -> bool:
        """One turn; False when there is nothing to do but wait a tick."""
        if not self.holding:
            return await self.acquire()
        if not await self.renew_when_due(tick_s):
            return False
        if not self._caught_up:
            done = await self.step()
            if not done.holding:
                return False
            if (done.moved or done.skipped) and not self._caught_up:
                return True
        # Nothing new: wait past the last id handed out, at most a tick (the lease renewal).
        block_ms = min(idle_block_ms, int(tick_s * 1000))
        fused = self._replicated is None and self._claim_cursor is None
        count = self.batch if fused else 1
        found: Any = await self.redis.xread(
            {self.names.stream: self._last_delivered}, count=count, block=block_ms
        )
        entries = [(text(entry), fields) for _, got in read_streams(found) for entry, fields in got]
        self._caught_up = False  # the next turn reads, unless the entries found are moved now
        if fused and entries:
            await self.move_found(entries)
        return True

    async def move_found(self, entries: Sequence[tuple[str, Any]]) -> Moved:
        """Read, move and ack ``entries`` in one script (a single Redis): the ones a wait
        found past the last id handed out, so the next the group hands out. A lone job's
        move costs one round trip instead of three."""
        if self.token is None:
            return Moved(holding=False)
        places: dict[int, int] = {}
        args: list[Any] = [self.token, self.group, self.me, self.generation, len(entries)]
        for entry_id, fields in entries:
            number = self._route(entry_id, _pairs(fields))
            args += [entry_id, places.setdefault(number, len(places) + 1)]
        keys = [self.names.stream, self.names.mover]
        for number in places:
            keys += [self.names.partition(number), self.names.moved(number)]
        answer: Any = await self._read_move(keys=keys, args=args)
        if not answer or int(answer[0]) < 0:
            why = "lost the mover lease" if not answer else "was fenced out by a newer mover"
            log.warning("mover generation %d %s; stopping", self.generation, why)
            self.token = None
            return Moved(holding=False)
        moved, skipped, left = int(answer[0]), int(answer[1]), int(answer[2])
        if left:
            self._claim_cursor = "0-0"  # handed out but not the entries routed: claim them
        elif answer[3] and moved + skipped == len(entries) < self.batch:
            self._caught_up, self._last_delivered = True, text(answer[3])
        return Moved(moved=moved, skipped=skipped)

    def _route(self, entry_id: str, pairs: Sequence[bytes]) -> int:
        """The partition of an entry: its last ``job`` field's, as the worker reads it."""
        job = b""
        for index in range(0, len(pairs), 2):
            if pairs[index] == b"job":
                job = pairs[index + 1]
        return partition_of_raw(job, fallback=entry_id, partitions=self.partitions)

    async def drain(self) -> None:
        """Move until the ingest is empty (``run --burst``); waits for the lease if needed."""
        while await self.redis.xlen(self.names.stream):
            if not self.holding and not await self.acquire():
                await asyncio.sleep(0.05)
                continue
            await self.step()

    async def _ack(self, entry_ids: list[str]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.names.stream, self.group, *entry_ids)
            pipe.xdel(self.names.stream, *entry_ids)
            await pipe.execute()


def _pairs(fields: Any) -> list[bytes]:
    """A stream entry's fields as a flat list, from a script's reply (a flat list) or
    redis-py's dict."""
    if isinstance(fields, Mapping):
        return [item for pair in fields.items() for item in pair]
    return list(fields)
