"""Scripts in pipelines (worker/stream/scripts.py), on the real Redis: one round trip, and a
script Redis does not know yet is loaded and exactly its failed calls sent again."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from worker.stream.scripts import run_each


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
