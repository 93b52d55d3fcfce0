"""Scripts on the real Redis: in pipelines (worker/stream/scripts.py), one round trip, and a
script Redis does not know yet is loaded and exactly its failed calls sent again; and the
reply script of worker/stream/transport.py."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from worker.errors import Unavailable
from worker.job.replies import Reply
from worker.stream.names import Entry, Names, text
from worker.stream.scripts import run_each
from worker.stream.transport import Transport


async def test_a_script_redis_does_not_know_runs_each_call_exactly_once(
    redis: Redis, prefix: str
) -> None:
    # A comment unique to this test: Redis has never seen this script, so EVALSHA fails with
    # NOSCRIPT at first (without running anything), and only a load makes it known.
    script = redis.register_script(
        f"-- {uuid.uuid4().hex}\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
    )
    assert await redis.script_exists(script.sha) == [False]
    calls = [([f"{prefix}:n{index}"], [index + 1]) for index in range(5)]
    assert await run_each(redis, script, calls) == [1, 2, 3, 4, 5]
    assert await redis.script_exists(script.sha) == [True]
    assert await run_each(redis, script, calls) == [2, 4, 6, 8, 10]  # known now: once each
    assert await redis.mget([f"{prefix}:n{index}" for index in range(5)]) == [
        b"2", b"4", b"6", b"8", b"10",
    ]  # fmt: skip


async def test_an_error_in_a_call_is_raised_not_returned(redis: Redis, prefix: str) -> None:
    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    with pytest.raises(ResponseError, match="not an integer"):
        await run_each(redis, script, [([f"{prefix}:a"], [1]), ([f"{prefix}:b"], ["x"])])


async def test_replies_are_stored_published_and_acked_in_one_script(
    redis: Redis, prefix: str
) -> None:
    """Transport.reply_many: 1,200 answers over two partitions (past the script's chunks of
    500 ids), each reply stored and published, the final ones acked and deleted; the one that
    is not final stays pending, and ``ack=False`` acks none."""
    names = Names(prefix)
    transport = Transport(redis, names, group="g", consumer="c", result_ttl=60)
    await transport.ensure_groups(2)
    entries = []
    for number in range(1200):
        partition = number % 2
        entry_id = await redis.xadd(names.partition(partition), {"job": b"{}"})
        entries.append(Entry(id=text(entry_id), fields={}, partition=partition))
    for partition in range(2):
        await redis.xreadgroup("g", "c", {names.partition(partition): ">"}, count=1000)
    unavailable = Reply.failure("j-0", Unavailable("down", reason="test"), worker="c")
    answers = [(entries[0], unavailable, None)] + [
        (entry, Reply(id=f"j-{number}", status="ok", rowcount=1), f"{prefix}:mine")
        for number, entry in enumerate(entries[1:], start=1)
    ]
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(f"{prefix}:mine", names.replies)
        await transport.reply_many(answers)
        heard: set[str] = set()
        deadline = asyncio.get_running_loop().time() + 10
        while len(heard) < 1200 and asyncio.get_running_loop().time() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
            if message is not None:  # None: a subscribe confirmation, or nothing yet
                heard.add(Reply.model_validate_json(message["data"]).id)
    assert heard == {f"j-{number}" for number in range(1200)}
    stored = await redis.mget([names.result(f"j-{number}") for number in range(1200)])
    assert all(stored)
    assert 0 < await redis.ttl(names.result("j-1")) <= 60
    assert [await redis.xlen(names.partition(p)) for p in range(2)] == [1, 0]  # j-0 stays
    assert (await redis.xpending(names.partition(0), "g"))["pending"] == 1
    await transport.reply_many([(entries[0], unavailable, None)], ack=False)
    assert (await redis.xpending(names.partition(0), "g"))["pending"] == 1
