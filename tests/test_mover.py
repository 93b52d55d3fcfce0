"""The ingest mover on the real Redis: every entry in its partition exactly once and in order,
whatever a stalled mover does when it comes back (DESIGN.md §11)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis

from worker.job.order import partition_of
from worker.stream.mover import Mover
from worker.stream.names import Names, text

PARTITIONS = 4
GROUP = "update-workers"


def mover(
    redis: Redis, prefix: str, name: str, *, lease_ms: int = 10_000, batch: int = 50
) -> Mover:
    return Mover(redis, Names(prefix), me=name, group=GROUP, partitions=PARTITIONS,
                 lease_ms=lease_ms, batch=batch)  # fmt: skip


async def produce(redis: Redis, prefix: str, count: int) -> list[str]:
    """``count`` jobs over 12 rows, and a few entries that are no job; their ingest ids."""
    async with redis.pipeline(transaction=False) as pipe:
        for number in range(count):
            body: Any = {"job": json.dumps({"table": "items", "key": {"id": number % 12},
                                                        "inc": {"qty": 1}, "id": f"j{number}"})}  # fmt: skip
            if number % 97 == 0:
                body = {"payload": f"not a job {number}"}
            pipe.xadd(f"{prefix}:jobs", body)
        return [text(entry_id) for entry_id in await pipe.execute()]


async def partition_contents(redis: Redis, prefix: str) -> dict[int, list[str]]:
    """Each partition stream's entries, as the ingest ids they came from, in stream order."""
    found: dict[int, list[str]] = defaultdict(list)
    for number in range(PARTITIONS):
        entries: Any = await redis.xrange(Names(prefix).partition(number))
        for _, fields in entries:
            found[number].append(text(fields[b"src"]))
    return found


def expected_partition(redis_id: str, ingest: dict[str, dict[bytes, bytes]]) -> int:
    fields = ingest[redis_id]
    if b"job" not in fields:
        return partition_of(redis_id, PARTITIONS)
    key = json.loads(fields[b"job"])["key"]["id"]
    return partition_of(f"items:{key}", PARTITIONS)


async def assert_moved_once_in_order(redis: Redis, prefix: str, ingest_ids: list[str],
                                     ingest: dict[str, dict[bytes, bytes]]) -> None:  # fmt: skip
    contents = await partition_contents(redis, prefix)
    moved = [entry_id for entries in contents.values() for entry_id in entries]
    assert sorted(moved) == sorted(ingest_ids)  # every entry, none twice
    assert len(set(moved)) == len(moved)
    for number, entries in contents.items():
        assert entries == sorted(entries, key=lambda i: tuple(map(int, i.split("-"))))  # in order
        assert all(expected_partition(entry_id, ingest) == number for entry_id in entries)
    assert await redis.xlen(f"{prefix}:jobs") == 0  # moved entries leave the ingest
    assert (await redis.xpending(f"{prefix}:jobs", GROUP))["pending"] == 0


async def snapshot(redis: Redis, prefix: str) -> dict[str, dict[bytes, bytes]]:
    entries: Any = await redis.xrange(f"{prefix}:jobs")
    return {text(entry_id): fields for entry_id, fields in entries}


async def drain(one: Mover) -> None:
    while (await one.step()).holding and await one.redis.xlen(f"{one.names.stream}") > 0:
        pass


async def stalled_then_taken_over(
    redis: Redis, prefix: str
) -> tuple[Mover, list[tuple[str, Any]], Mover]:
    """An old mover that read a batch and stalled past its lease, and the new mover that then
    took the lease: ``(old, its unmoved batch, new)``."""
    old = mover(redis, prefix, "old", lease_ms=200)
    await old.ensure_group()
    assert await old.acquire()
    stale = await old.read()
    assert stale
    await asyncio.sleep(0.3)  # the lease's own TTL runs out in Redis: the stall
    new = mover(redis, prefix, "new")
    assert await new.acquire()
    return old, stale, new


async def test_one_mover_moves_everything_once_in_order(redis: Redis, prefix: str) -> None:
    ids = await produce(redis, prefix, 600)
    ingest = await snapshot(redis, prefix)
    only = mover(redis, prefix, "m1")
    await only.ensure_group()
    assert await only.acquire()
    assert not await mover(redis, prefix, "m2").acquire()  # one mover at a time
    await drain(only)
    await assert_moved_once_in_order(redis, prefix, ids, ingest)


async def test_a_stalled_mover_that_comes_back_after_a_takeover_is_fenced(
    redis: Redis, prefix: str
) -> None:
    """A reads a batch and stalls past its lease; B takes over, moves A's batch (claimed from
    the pending list) and the rest; A wakes up and moves its batch: refused or skipped."""
    ids = await produce(redis, prefix, 400)
    ingest = await snapshot(redis, prefix)
    old, stale, new = await stalled_then_taken_over(redis, prefix)
    assert new.generation == old.generation + 1
    await drain(new)
    late = await old.move(stale)
    assert (late.holding, late.moved) == (False, 0)
    assert await old.read() is None  # and it can read nothing more
    await assert_moved_once_in_order(redis, prefix, ids, ingest)


async def test_a_stalled_mover_moving_before_the_new_one_writes_is_absorbed(
    redis: Redis, prefix: str
) -> None:
    """The other order: A's late moves land first (B has not written those partitions yet),
    in order, and A acks them: B never sees them again. Or B claimed them already: its marks
    skip them. Either way, once."""
    ids = await produce(redis, prefix, 400)
    ingest = await snapshot(redis, prefix)
    old, stale, new = await stalled_then_taken_over(redis, prefix)
    late = await old.move(stale)
    assert late.moved == len(stale)  # nothing newer was there: its moves were still in order
    await drain(new)
    await assert_moved_once_in_order(redis, prefix, ids, ingest)


async def test_entries_a_dead_worker_read_from_the_ingest_are_moved(
    redis: Redis, prefix: str
) -> None:
    """Entries pending in the ingest group under any consumer (an older worker, a mover that
    died) are moved by the next mover, first and in order."""
    ids = await produce(redis, prefix, 100)
    ingest = await snapshot(redis, prefix)
    await redis.xgroup_create(f"{prefix}:jobs", GROUP, id="0")
    await redis.xreadgroup(GROUP, "died", {f"{prefix}:jobs": ">"}, count=30)
    fresh = mover(redis, prefix, "fresh", batch=7)
    assert await fresh.acquire()
    await drain(fresh)
    await assert_moved_once_in_order(redis, prefix, ids, ingest)


async def test_a_batch_both_movers_hold_is_moved_once(redis: Redis, prefix: str) -> None:
    """B has claimed A's batch but not moved it; A wakes up and moves it first; B's moves of
    the same entries are then skipped by the marks."""
    ids = await produce(redis, prefix, 300)
    ingest = await snapshot(redis, prefix)
    old, stale, new = await stalled_then_taken_over(redis, prefix)
    claimed = await new.read()
    assert [entry_id for entry_id, _ in claimed or []] == [entry_id for entry_id, _ in stale]
    assert (await old.move(stale)).moved == len(stale)
    again = await new.move(claimed or [])
    assert (again.moved, again.skipped, again.holding) == (0, len(stale), True)
    await drain(new)
    await assert_moved_once_in_order(redis, prefix, ids, ingest)


async def test_an_entry_goes_where_the_worker_reads_its_job(redis: Redis, prefix: str) -> None:
    """An entry with two `job` fields is read by the worker by its last one (a stream entry's
    fields become a dict): the mover places it by that one too."""
    first = json.dumps({"table": "items", "key": {"id": 1}, "inc": {"qty": 1}})
    last = next(json.dumps({"table": "items", "key": {"id": row}, "inc": {"qty": 1}})
                for row in range(2, 50)
                if partition_of(f"items:{row}", PARTITIONS) != partition_of("items:1", PARTITIONS))  # fmt: skip
    await redis.execute_command("XADD", f"{prefix}:jobs", "*", "job", first, "job", last)
    only = mover(redis, prefix, "m1")
    await only.ensure_group()
    assert await only.acquire()
    await drain(only)
    placed = {number for number, ids in (await partition_contents(redis, prefix)).items() if ids}
    assert placed == {partition_of(f"items:{json.loads(last)['key']['id']}", PARTITIONS)}


async def caught_up(redis: Redis, prefix: str, name: str = "m1") -> Mover:
    """A mover holding the lease that has moved everything: its next turn waits."""
    one = mover(redis, prefix, name)
    await one.ensure_group()
    assert await one.acquire()
    await drain(one)
    assert (await one.step()).moved == 0  # nothing new: it knows where to wait past
    return one


async def test_a_job_a_wait_finds_is_moved_and_acked_in_the_same_turn(
    redis: Redis, prefix: str
) -> None:
    """On a single Redis the entries a wait finds are read, moved and acked by one script:
    the turn that woke up has already placed them (the split path moves them a turn later)."""
    one = await caught_up(redis, prefix)
    ids = await produce(redis, prefix, 3)
    ingest = await snapshot(redis, prefix)
    assert await one._turn(tick_s=1.0, idle_block_ms=1000)
    await assert_moved_once_in_order(redis, prefix, ids, ingest)
    more = await produce(redis, prefix, 2)  # it waits past them: the next wake finds only new
    ingest |= await snapshot(redis, prefix)
    assert await one._turn(tick_s=1.0, idle_block_ms=1000)
    await assert_moved_once_in_order(redis, prefix, ids + more, ingest)


async def test_entries_the_group_hands_out_other_than_the_ones_found_stay_and_are_claimed(
    redis: Redis, prefix: str
) -> None:
    """Between the wait and the script, one entry is deleted: the script moves the entries
    up to it, leaves the ones after it pending under the mover, and the next turn claims and
    moves them, in order. Entries found that the group had handed out already (a stale wait)
    are never moved out of turn either."""
    one = await caught_up(redis, prefix)
    ids = await produce(redis, prefix, 6)
    found: Any = await redis.xread({f"{prefix}:jobs": "0-0"}, count=100)
    entries = [(text(entry_id), fields) for entry_id, fields in found[0][1]]
    await redis.xdel(f"{prefix}:jobs", ids[2])
    ingest = await snapshot(redis, prefix)
    done = await one.move_found(entries)
    assert (done.moved + done.skipped, done.holding) == (2, True)
    assert (await redis.xpending(f"{prefix}:jobs", GROUP))["pending"] == 3
    await drain(one)
    kept = [entry_id for entry_id in ids if entry_id != ids[2]]
    await assert_moved_once_in_order(redis, prefix, kept, ingest)

    later = await produce(redis, prefix, 4)
    ingest |= await snapshot(redis, prefix)
    await redis.xreadgroup(GROUP, one.me, {f"{prefix}:jobs": ">"}, count=2)  # handed, unmoved
    stale = [(entry_id, ingest[entry_id]) for entry_id in later]
    assert (await one.move_found(stale)).moved == 0  # the group hands out the other two
    await drain(one)
    await assert_moved_once_in_order(redis, prefix, kept + later, ingest)


async def test_a_mover_that_lost_its_lease_or_was_fenced_reads_nothing_in_the_script(
    redis: Redis, prefix: str
) -> None:
    await produce(redis, prefix, 5)
    old, _, new = await stalled_then_taken_over(redis, prefix)  # the 5 are pending under old
    fresh = await produce(redis, prefix, 3)
    ingest = await snapshot(redis, prefix)
    entries = [(entry_id, ingest[entry_id]) for entry_id in fresh]
    lost = await old.move_found(entries)
    assert (lost.holding, lost.moved, old.holding) == (False, 0, False)
    assert (await redis.xpending(f"{prefix}:jobs", GROUP))["pending"] == 5  # none handed out
    assert await partition_contents(redis, prefix) == {}

    fenced = mover(redis, prefix, "fenced")  # holds the lease, but a newer mover wrote
    await new.release()
    assert await fenced.acquire()
    number = expected_partition(fresh[0], ingest)
    await redis.hset(Names(prefix).moved(number), "generation", fenced.generation + 1)
    done = await fenced.move_found(entries)
    assert (done.holding, done.moved, fenced.holding) == (False, 0, False)
    assert (await redis.xpending(f"{prefix}:jobs", GROUP))["pending"] == 5
    assert await partition_contents(redis, prefix) == {}
    assert await redis.xlen(f"{prefix}:jobs") == 8  # nothing acked or deleted
