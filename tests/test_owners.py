"""Partition leases and the even sharing of partitions (DESIGN.md §11)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis

from worker.stream import owners, scripts
from worker.stream.names import Names
from worker.stream.owners import Leases, assignment, plan


def test_the_assignment_shares_16_partitions_evenly() -> None:
    for members, shares in ((["a"], [16]), (["a", "b"], [8, 8]), (["c", "a", "b"], [6, 5, 5]),
                            ([f"w{n}" for n in range(5)], [4, 3, 3, 3, 3])):  # fmt: skip
        counts = Counter(assignment(16, members).values())
        assert sorted(counts.values(), reverse=True) == shares


def test_a_joining_worker_is_handed_its_share_and_takes_free_ones() -> None:
    everything = dict.fromkeys(range(16), "a")
    mine = plan(me="a", owners=everything, live={"a", "b", "c"}, free_for_s={}, orphan_after_s=1)
    assert len(mine.release) == 10
    assert mine.take == []
    freed = {number: (None if number in mine.release else "a") for number in range(16)}
    joining = plan(me="b", owners=freed, live={"a", "b", "c"}, free_for_s={}, orphan_after_s=1)
    assert len(joining.take) == 5
    assert joining.release == []


def test_a_free_partition_assigned_to_another_is_taken_only_once_orphaned() -> None:
    owners = {0: "a", 1: None}
    wait = plan(me="a", owners=owners, live={"a", "b"}, free_for_s={1: 0.2}, orphan_after_s=1)
    assert wait.take == []  # partition 1 is b's to take
    orphan = plan(me="a", owners=owners, live={"a", "b"}, free_for_s={1: 1.5}, orphan_after_s=1)
    assert orphan.take == [1]


def test_nothing_is_handed_to_a_worker_that_is_not_live() -> None:
    owners = {0: "a", 1: "a"}
    alone = plan(me="a", owners=owners, live={"a"}, free_for_s={}, orphan_after_s=1)
    assert alone.release == []


async def test_leases_are_exclusive_renewed_released_and_lost_on_expiry(
    redis: Redis, prefix: str
) -> None:
    names = Names(prefix)
    first = Leases(redis, names, me="a", partitions=4, lease_ms=300)
    second = Leases(redis, names, me="b", partitions=4, lease_ms=300)
    assert await first.acquire(1)
    assert not await second.acquire(1)
    assert (await second.survey())[1] == "a"
    assert await first.renew() == []
    await first.release(1)
    assert (await second.survey())[1] is None
    assert await second.acquire(1)
    await asyncio.sleep(0.4)  # b stops renewing: its lease's TTL runs out in Redis
    assert await first.acquire(1)
    assert await second.renew() == [1]  # b finds out it lost partition 1
    assert second.held == set()


async def test_a_renewal_that_meets_a_lease_taken_again_meanwhile_keeps_the_new_lease(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewals run beside the takeovers: a renewal that finds a lapsed lease must not
    count as lost the lease a takeover acquired while the renewal's answer was on its way
    (it would never be renewed again, and would lapse under the new owner's feet)."""
    names = Names(prefix)
    leases = Leases(redis, names, me="a", partitions=1, lease_ms=10_000)
    assert await leases.acquire(0)
    await redis.delete(names.owner(0))  # the lease lapsed; nobody noticed yet
    renew_each = scripts.run_each

    async def renewal_then_takeover(*args: Any) -> list[Any]:
        answers = await renew_each(*args)
        assert answers == [0]  # the lapsed lease was not renewed
        assert await leases.acquire(0)  # a takeover, meanwhile
        return answers

    monkeypatch.setattr(owners, "run_each", renewal_then_takeover)
    assert await leases.renew() == []
    assert leases.held == {0}
    monkeypatch.undo()
    assert await leases.renew() == []  # and it is renewed from then on
    assert (await leases.survey())[0] == "a"
