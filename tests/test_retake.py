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


async def test_an_entry_read_during_its_own_workers_retake_is_served_after_the_claim(
    redis: Redis, prefix: str, engine: AsyncEngine
) -> None:
    names = Names(prefix)
    transport = Transport(redis, names, group="g", consumer=ME, result_ttl=60)
    await transport.ensure_groups(1)
    async with engine.begin() as connection:
        await fencing.ensure_partitions(connection, 1)
    reader = Reader(redis, names, group="g", consumer=ME)
    leases = Leases(redis, names, me=ME, partitions=1, lease_ms=10_000)
    ownership = Ownership(leases=leases, reader=reader, transport=transport, engine=engine,
                          metrics=Metrics())  # fmt: skip
    stream = names.partition(0)

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
