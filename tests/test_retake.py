"""A worker that takes over a partition it was still reading (its lease lapsed unnoticed, as
in a pause): an entry its loop reads between the takeover's claim and the new generation is
served after the claimed ones, under the new generation, never left pending.

Real Redis and both databases, in one process: the race is pinned by reading right after the
takeover's claim, where the worker's own loop can land."""

from __future__ import annotations

import json

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.db import fencing
from worker.ops.metrics import Metrics
from worker.service.ownership import Ownership
from worker.stream.names import Claim, Names, text
from worker.stream.owners import Leases
from worker.stream.reading import Reader
from worker.stream.transport import Transport

ME = "worker-a"


async def own_partition(redis: Redis, prefix: str, engine: AsyncEngine) -> tuple[Ownership, Names]:
    """An ownership of one partition (its stream, group and fence row made), not yet taken."""
    names = Names(prefix)
    transport = Transport(redis, names, group="g", consumer=ME, result_ttl=60)
    reader = Reader(redis, names, group="g", consumer=ME)
    leases = Leases(redis, names, me=ME, partitions=1, lease_ms=10_000)
    ownership = Ownership(leases=leases, reader=reader, transport=transport, engine=engine,
                          metrics=Metrics())  # fmt: skip
    await transport.ensure_groups(1)
    async with engine.begin() as connection:
        await fencing.ensure_partitions(connection, 1)
    return ownership, names


async def test_an_entry_read_during_its_own_workers_retake_is_served_after_the_claim(
    redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    ownership, names = await own_partition(redis, prefix, engine)
    reader, stream = ownership.reader, names.partition(0)

    async def add(job_id: str) -> str:
        return text(await redis.xadd(stream, {"job": json.dumps({"id": job_id})}))

    assert await ownership.take(0)
    first_generation = ownership.generations[0]
    before = await add("before")
    # Read (and started) under the first generation: pending under this worker.
    read = await reader.read([0], count=10)
    assert [entry.id for entry in ownership.serving(read.entries)] == [before]
    await redis.delete(names.owner(0))  # the lease lapsed; the worker did not notice

    during: list[str] = []
    claim_all = reader.claim_all

    async def claim_then_read(number: int) -> Claim:
        claim = await claim_all(number)
        during.append(await add("during"))  # a new entry, and the loop reads it right now
        read = await reader.read([0], count=10)
        assert ownership.serving(read.entries) == [], "held back until the takeover ends"
        return claim

    reader.claim_all = claim_then_read  # type: ignore[method-assign]
    assert await ownership.take(0)

    assert ownership.generations[0] > first_generation
    assert [(entry.id, entry.claimed) for entry in ownership.backlog] == [
        (before, True),  # pending from the first ownership: claimed
        (during[0], False),  # read during the takeover: served right after, in stream order
    ]


async def test_a_worker_fenced_out_under_its_current_generation_gives_the_partition_up(
    redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """Its fence was raised while Redis still names it the owner: it stops serving the
    partition and frees the lease, so that the next takeover claims what it left pending."""
    ownership, names = await own_partition(redis, prefix, engine)
    assert await ownership.take(0)
    stale = ownership.generations[0]
    left = text(await redis.xadd(names.partition(0), {"job": json.dumps({"id": "left"})}))
    read = await ownership.reader.read([0], count=10)
    assert [entry.id for entry in ownership.serving(read.entries)] == [left]
    await fencing.take(engine, 0, wait_s=1.0)  # raised behind this worker's back

    await ownership.fenced({0: stale})
    assert ownership.owned() == []
    assert ownership.leases.held == set()
    assert (await ownership.leases.survey())[0] is None
    await ownership.tick()  # its own partition again: a takeover
    assert ownership.generations[0] > stale + 1
    assert [(entry.id, entry.claimed) for entry in ownership.backlog] == [(left, True)]


async def test_a_fence_on_a_generation_already_replaced_changes_nothing(
    redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    ownership, _ = await own_partition(redis, prefix, engine)
    assert await ownership.take(0)
    current = ownership.generations[0]
    await ownership.fenced({0: current - 1})  # a unit of an earlier ownership of its own
    assert ownership.generations == {0: current}
    assert ownership.leases.held == {0}


async def test_a_fence_met_during_its_own_workers_retake_leaves_the_new_lease(
    redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    """The takeover raised the fence a unit of the lapsed ownership then met: the unit's
    entries are in the takeover's claim, and the lease it just acquired stays."""
    ownership, names = await own_partition(redis, prefix, engine)
    assert await ownership.take(0)
    stale = ownership.generations[0]
    await redis.delete(names.owner(0))  # the lease lapsed; the worker did not notice
    claim_all = ownership.reader.claim_all

    async def claim_then_fenced(number: int) -> Claim:
        await ownership.fenced({0: stale})  # a unit of the old generation, fenced right now
        return await claim_all(number)

    ownership.reader.claim_all = claim_then_fenced  # type: ignore[method-assign]
    assert await ownership.take(0)
    assert ownership.generations[0] == stale + 1
    assert ownership.leases.held == {0}
    assert (await ownership.leases.survey())[0] == ME
