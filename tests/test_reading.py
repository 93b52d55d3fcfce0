"""Reading the owned partitions: after a wait that saw new entries, the partitions it saw
empty are not read again one by one; the next wait covers them. Real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
from redis.asyncio import Redis

from worker.stream import reading, scripts
from worker.stream.names import Names, text
from worker.stream.reading import Reader
from worker.stream.transport import Transport

ME = "worker-a"
PARTITIONS = [0, 1, 2]


@pytest.fixture
async def reader(redis: Redis, prefix: str) -> Reader:
    names = Names(prefix)
    await Transport(redis, names, group="g", consumer=ME, result_ttl=60).ensure_groups(3)
    for number in PARTITIONS:
        await redis.set(names.owner(number), ME)
    return Reader(redis, names, group="g", consumer=ME)


@pytest.fixture
def asked_of(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The partitions each read script went to, call by call."""
    asked: list[int] = []
    run_each = scripts.run_each

    async def counting(redis: Redis, script: Any, calls: Any) -> list[Any]:
        asked.extend(len(keys) and int(text(keys[0]).split("{p")[1].split("}")[0])
                     for keys, _ in calls)  # fmt: skip
        return await run_each(redis, script, calls)

    monkeypatch.setattr(reading, "run_each", counting)
    return asked


async def add(redis: Redis, reader: Reader, number: int, job_id: str) -> str:
    stream = reader.names.partition(number)
    return text(await redis.xadd(stream, {"job": json.dumps({"id": job_id})}))


async def test_after_a_wake_the_quiet_partitions_are_left_to_the_next_wait(
    redis: Redis, reader: Reader, asked_of: list[int]
) -> None:
    first = await reader.read(PARTITIONS, count=30)
    assert first.entries == []
    assert sorted(first.idle) == PARTITIONS
    woke = await add(redis, reader, 0, "a")
    await reader.wait(first.idle, block_ms=5000)

    asked_of.clear()
    read = await reader.read(PARTITIONS, count=30)
    assert [entry.id for entry in read.entries] == [woke]
    assert asked_of == [0], "only the partition the wait saw entries in"

    late = await add(redis, reader, 1, "b")  # arrives after the wait: the next wait sees it
    asked_of.clear()
    quiet = await reader.read(PARTITIONS, count=30)
    assert quiet.entries == []
    assert asked_of == [], "no round trip: every partition was seen empty"
    assert quiet.idle == {0: woke, 1: first.idle[1], 2: first.idle[2]}

    await reader.wait(quiet.idle, block_ms=5000)  # returns at once: ``late`` is past its id
    read = await reader.read(PARTITIONS, count=30)
    assert [entry.id for entry in read.entries] == [late]
    assert asked_of == [1]


async def test_a_partition_not_emptied_by_its_read_is_read_again(
    redis: Redis, reader: Reader, asked_of: list[int]
) -> None:
    idle = (await reader.read(PARTITIONS, count=3)).idle
    added = [await add(redis, reader, 2, f"j{index}") for index in range(5)]
    await reader.wait(idle, block_ms=5000)
    first = await reader.read(PARTITIONS, count=3)  # 3 of 5
    asked_of.clear()
    rest = await reader.read(PARTITIONS, count=3)
    assert [entry.id for entry in first.entries] == added[:3]
    assert sorted(asked_of) == PARTITIONS, "a full read: partition 2 was not emptied"
    assert [entry.id for entry in rest.entries] == added[3:4]  # a third of the count each


async def test_after_a_quiet_wait_every_lease_is_checked_again(
    redis: Redis, reader: Reader, asked_of: list[int]
) -> None:
    idle = (await reader.read(PARTITIONS, count=30)).idle
    await add(redis, reader, 0, "a")
    await reader.wait(idle, block_ms=5000)
    read = await reader.read(PARTITIONS, count=30)
    await redis.set(reader.names.owner(1), "someone-else")
    await reader.wait((await reader.read(PARTITIONS, count=30)).idle, block_ms=50)  # quiet
    asked_of.clear()
    after = await reader.read(PARTITIONS, count=30)
    assert len(read.entries) == 1
    assert after.lost == [1]
    assert sorted(asked_of) == PARTITIONS


async def test_a_takeover_between_wait_and_read_looks_the_partition_up_again(
    redis: Redis, reader: Reader, asked_of: list[int]
) -> None:
    idle = (await reader.read(PARTITIONS, count=30)).idle
    await add(redis, reader, 0, "a")
    await reader.wait(idle, block_ms=5000)
    await reader.read(PARTITIONS, count=30)
    await reader.claim_all(2)  # where the group stands on 2 is unknown again
    asked_of.clear()
    after = await reader.read(PARTITIONS, count=30)
    assert sorted(asked_of) == PARTITIONS
    assert sorted(after.idle) == PARTITIONS
