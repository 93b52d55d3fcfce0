"""Partition owners (DESIGN.md §11): leases, and sharing the partitions evenly.

Each partition has at most one owner: the worker named in ``<prefix>:{p<n>}:owner``, a key
with a TTL of ``lease_ms`` that its owner renews on every tick (a few times per lease). A
lease is only a claim on Redis; what makes a stale owner harmless is the database fence
(worker/db/fencing.py), which every new owner raises before it serves the partition.

Sharing: the live workers, sorted by name, are each assigned the partitions n with
``n mod (live workers)`` equal to their rank, so each holds ⌈P / live⌉ or one fewer. A worker
takes the free partitions assigned to it, hands over those assigned to another live worker,
and takes any partition left free for ``orphan_after_s`` (as long as a worker stays live
without a heartbeat, so a dead worker's partitions never wait for a stuck assignment, while a
partition in the middle of a handover is not snatched by a third worker).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from worker.stream.client import AnyRedis
from worker.stream.names import Names, text
from worker.stream.scripts import Call, run_each

_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Plan:
    take: list[int]
    release: list[int]


def assignment(partitions: int, members: Collection[str]) -> dict[int, str]:
    """Who should own each partition, among ``members``."""
    ranked = sorted(members)
    return {number: ranked[number % len(ranked)] for number in range(partitions)}


def plan(
    *,
    me: str,
    owners: Mapping[int, str | None],
    live: Collection[str],
    free_for_s: Mapping[int, float],
    orphan_after_s: float,
) -> Plan:
    """What ``me`` should take and hand over, given each partition's current owner."""
    members = set(live) | {me}
    wanted = assignment(len(owners), members)
    release = [n for n, owner in owners.items()
               if owner == me and wanted[n] != me and wanted[n] in live]  # fmt: skip
    orphaned = {n for n, free in free_for_s.items() if free >= orphan_after_s}
    take = [n for n, owner in owners.items()
            if owner is None and (wanted[n] == me or n in orphaned)]  # fmt: skip
    return Plan(take=take, release=release)


@dataclass
class Leases:
    """This worker's leases on partitions, in Redis."""

    redis: AnyRedis
    names: Names
    me: str
    partitions: int
    lease_ms: int
    _free_since: dict[int, float] = field(default_factory=dict)
    #: Held partition -> its acquisition, numbered: a renewal that started before the
    #: partition was acquired again (a takeover runs beside the renewals) must not count the
    #: new lease as lost because the old one had lapsed.
    _acquisitions: dict[int, int] = field(default_factory=dict)
    _acquired: int = 0

    def __post_init__(self) -> None:
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    async def survey(self) -> dict[int, str | None]:
        """Every partition's owner now (None: free); also notes since when each is free."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for number in range(self.partitions):
                pipe.get(self.names.owner(number))
            found: list[Any] = await pipe.execute()
        owners = {number: None if value is None else text(value)
                  for number, value in enumerate(found)}  # fmt: skip
        now = time.monotonic()
        for number, owner in owners.items():
            if owner is None:
                self._free_since.setdefault(number, now)
            else:
                self._free_since.pop(number, None)
        return owners

    @property
    def held(self) -> set[int]:
        return set(self._acquisitions)

    def free_for_s(self) -> dict[int, float]:
        now = time.monotonic()
        return {number: now - since for number, since in self._free_since.items()}

    async def renew(self) -> list[int]:
        """Extend every held lease; the partitions whose lease was lost (expired, taken)."""
        began = dict(sorted(self._acquisitions.items()))
        if not began:
            return []
        calls: list[Call] = [([self.names.owner(number)], [self.me, self.lease_ms])
                             for number in began]  # fmt: skip
        results = await run_each(self.redis, self._renew, calls)
        lost = [number for (number, acquisition), renewed in
                zip(began.items(), results, strict=True)
                if not renewed and self._acquisitions.get(number) == acquisition]  # fmt: skip
        for number in lost:
            del self._acquisitions[number]
        return lost

    async def acquire(self, number: int) -> bool:
        taken = await self.redis.set(self.names.owner(number), self.me, nx=True, px=self.lease_ms)
        if taken:
            self._acquired += 1
            self._acquisitions[number] = self._acquired
            self._free_since.pop(number, None)
        return bool(taken)

    async def release(self, number: int) -> None:
        self._acquisitions.pop(number, None)
        await self._release(keys=[self.names.owner(number)], args=[self.me])
