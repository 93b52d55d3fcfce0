"""Reading the partitions a worker owns (DESIGN.md §11), fenced by their leases.

A read is a script per partition that checks the partition's lease names this worker before
it runs XREADGROUP, so an owner that lost its lease (paused, cut off) can be handed nothing
after its successor's takeover. That matters for order: anything an old owner was handed
before the takeover is pending under it, and the new owner claims all of it, in stream order,
before it reads anything new. Scripts cannot block, so when nothing is new the worker waits
with a plain XREAD BLOCK past each partition's last delivered id, then reads again.

After a wait that saw new entries, only the partitions it saw them in are read; the others
were seen empty by the wait. Once those reads have emptied their partitions too, the next read
asks nothing of Redis: it hands back every partition as idle, and the wait that follows (one
XREAD, past the same ids) returns at once for anything added meanwhile. So a lone job costs
one script and one XREAD, not a script per owned partition while it runs.

On a Redis Cluster one XREAD cannot name streams of different slots, so the wait is one
blocked XREAD per partition; each is kept until it returns, across waits (a fresh set per wait
would leave the earlier ones blocked, a connection each, until their BLOCK ran out).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.stream.client import AnyRedis, is_cluster
from worker.stream.names import Claim, Entry, Names, read_streams, text
from worker.stream.scripts import Call, run_each

# KEYS: partition stream, its lease. ARGV: lease value (this worker), group, consumer, count,
# and whether to look up where the group stands. Returns false when the lease is not ours;
# {1, entries} for new entries; {0} when there is nothing new, or {0, the last id the group
# was handed} when asked (once per takeover: after that, only this worker reads it).
_READ: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return false end
local read = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4],
                        'STREAMS', KEYS[1], '>')
if read then return {1, read[1][2]} end
if ARGV[5] ~= 'info' then return {0} end
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local fields = {}
  for i = 1, #group, 2 do fields[group[i]] = group[i + 1] end
  if fields['name'] == ARGV[2] then return {0, fields['last-delivered-id']} end
end
return {0, '0-0'}
"""
_CLAIM_PAGE: Final = 500
# KEYS: partition stream. ARGV: group, consumer, start id, count. Does not count a delivery.
_CLAIM: Final = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'COUNT', ARGV[4], 'JUSTID')
"""


@dataclass
class Batch:
    entries: list[Entry] = field(default_factory=list)
    #: Partitions whose lease turned out not to be ours any more.
    lost: list[int] = field(default_factory=list)
    #: For partitions with nothing new: the last id handed out, to wait past.
    idle: dict[int, str] = field(default_factory=dict)


class Reader:
    def __init__(self, redis: AnyRedis, names: Names, *, group: str, consumer: str) -> None:
        self.redis, self.names, self._group, self._consumer = redis, names, group, consumer
        self._read = redis.register_script(_READ)
        #: Partition -> the last id the group handed out there (to this worker, its reader).
        self._last: dict[int, str] = {}
        self._claim = redis.register_script(_CLAIM)
        #: Partitions a wait saw new entries in: the next read asks only them.
        self._woken: set[int] = set()
        #: Partitions seen empty, past their ``_last``, since the last wait that saw entries:
        #: when they are all the owned ones, the next read needs no round trip.
        self._resting: set[int] = set()
        #: On a cluster: partition -> its blocked XREAD, kept across waits until it returns.
        self._watches: dict[int, asyncio.Future[Any]] = {}

    async def read(self, partitions: Collection[int], *, count: int) -> Batch:
        """New entries of ``partitions`` (in stream order within each), at most about
        ``count`` in all. Right after a :meth:`wait` that saw new entries, only the
        partitions it saw them in."""
        woken, self._woken = self._woken & set(partitions), set()
        resting, self._resting = self._resting, set()
        owned = sorted(woken or partitions)
        batch = Batch()
        if not owned:
            return batch
        if not woken and resting.issuperset(owned) and self._last.keys() >= resting:
            batch.idle = {number: self._last[number] for number in owned}
            return batch
        each = max(1, math.ceil(count / len(owned)))
        calls: list[Call] = [
            ([self.names.partition(number), self.names.owner(number)],
             [self._consumer, self._group, self._consumer, each,
              "info" if number not in self._last else "-"])
            for number in owned
        ]  # fmt: skip
        answers = await run_each(self.redis, self._read, calls)
        for number, answer in zip(owned, answers, strict=True):
            if not answer:
                batch.lost.append(number)
                self._last.pop(number, None)
            elif int(answer[0]) == 1:
                batch.entries += [Entry(id=text(entry_id), fields=_fields(flat), partition=number)
                                  for entry_id, flat in answer[1]]  # fmt: skip
                self._last[number] = batch.entries[-1].id
                if woken and len(answer[1]) < each:  # emptied, like the ones the wait saw empty
                    resting.add(number)
            else:
                if len(answer) > 1:
                    self._last[number] = text(answer[1])
                batch.idle[number] = self._last.get(number, "$")
                if woken:
                    resting.add(number)
        if woken:
            self._resting = resting
        return batch

    async def wait(self, idle: Mapping[int, str], *, block_ms: int) -> None:
        """Return once any of the ``idle`` partitions has an entry past its last delivered
        id, or after ``block_ms``."""
        if not idle:
            return
        if is_cluster(self.redis):
            woken = await self._wait_each(idle, block_ms=block_ms)
        else:
            streams: dict[Any, Any] = {self.names.partition(number): last
                                       for number, last in idle.items()}  # fmt: skip
            found = await self.redis.xread(streams, count=1, block=block_ms)
            named = {self.names.partition(number): number for number in idle}
            woken = {named[text(stream)] for stream, _ in read_streams(found)}
        self._woken = woken
        # Only a wait that saw entries vouches for the rest: after a quiet one, the next read
        # asks every partition (and so checks every lease) again.
        if woken:
            self._resting = {number for number in idle if number in self._last} - woken

    async def _wait_each(self, idle: Mapping[int, str], *, block_ms: int) -> set[int]:
        for number, last in idle.items():
            if number not in self._watches:
                streams: dict[Any, Any] = {self.names.partition(number): last}
                self._watches[number] = asyncio.ensure_future(
                    self.redis.xread(streams, count=1, block=block_ms)
                )
        await asyncio.wait(set(self._watches.values()), return_when=asyncio.FIRST_COMPLETED)
        woken: set[int] = set()
        failure: BaseException | None = None
        for number, watch in list(self._watches.items()):
            if watch.done():
                del self._watches[number]
                if watch.cancelled():
                    continue
                if (error := watch.exception()) is not None:
                    failure = failure or error
                elif watch.result():
                    woken.add(number)
        if failure is not None:
            raise failure
        return woken

    async def close(self) -> None:
        """Stop the blocked reads a cluster's waits left behind."""
        watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            watch.cancel()
        if watches:
            await asyncio.wait(watches)

    async def claim_all(self, number: int) -> Claim:
        """Every entry pending in partition ``number``, whoever was handed it, now this
        worker's, in stream order: what a new owner serves before anything new.

        Claimed with JUSTID, which does not count a delivery: a takeover is no attempt at the
        job (churn among owners would otherwise dead-letter healthy jobs). The delivery is
        counted when a worker starts the entry (:meth:`count_start`)."""
        stream = self.names.partition(number)
        self._last.pop(number, None)  # a takeover: where the group stands is looked up again
        self._resting.discard(number)
        ids: list[str] = []
        deleted: list[str] = []
        cursor = "0-0"
        while True:
            # A script, for XAUTOCLAIM ... JUSTID's whole reply (redis-py keeps only the ids).
            args: list[str | int] = [self._group, self._consumer, cursor, _CLAIM_PAGE]
            cursor_raw, claimed, *rest = await self._claim(keys=[stream], args=args)
            deleted += [text(entry_id) for entry_id in (rest[0] if rest else [])]
            ids += [text(entry_id) for entry_id in claimed]
            cursor = text(cursor_raw)
            if cursor == "0-0":
                break
        entries: list[Entry] = []
        for start in range(0, len(ids), _CLAIM_PAGE):
            page = ids[start : start + _CLAIM_PAGE]
            counts = await _pending_counts(self.redis, stream, self._group, self._consumer, page)
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry_id in page:
                    pipe.xrange(stream, entry_id, entry_id)
                found: list[Any] = await pipe.execute()
            for entry_id, rows in zip(page, found, strict=True):
                if not rows:
                    deleted.append(entry_id)  # trimmed meanwhile
                    continue
                starts = counts.get(entry_id, 1) + 1  # with the start about to be counted
                entries.append(Entry(id=entry_id, fields=rows[0][1], partition=number,
                                     deliveries=starts, claimed=True))  # fmt: skip
        return Claim(entries=entries, deleted=deleted)

    async def count_start(self, entries: list[Entry]) -> None:
        """Count a delivery of each claimed entry as its worker starts it (XCLAIM without
        JUSTID), so an entry that kills every worker that runs it ends as a dead letter."""
        by_stream: dict[str, list[str]] = {}
        for entry in entries:
            by_stream.setdefault(self.names.partition(entry.partition), []).append(entry.id)
        for stream, entry_ids in by_stream.items():
            claimed: Any = entry_ids
            await self.redis.xclaim(stream, self._group, self._consumer, 0, claimed)


async def _pending_counts(redis: AnyRedis, stream: str, group: str, consumer: str,
                          entry_ids: list[str]) -> dict[str, int]:  # fmt: skip
    if not entry_ids:
        return {}
    rows = await redis.xpending_range(stream, group, entry_ids[0], entry_ids[-1],
                                      len(entry_ids), consumername=consumer)  # fmt: skip
    return {text(row["message_id"]): int(row["times_delivered"]) for row in rows}


def _fields(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[index]: flat[index + 1] for index in range(0, len(flat), 2)}
