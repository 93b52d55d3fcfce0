"""End to end through the real Redis and both databases, with in-process workers."""

from __future__ import annotations

import asyncio
import json
import time
import types
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory, eventually
from tests.model_app import FIXED_NOW, Base
from worker.client import UpdateClient
from worker.job.replies import Reply
from worker.ops.metrics import Metrics
from worker.service import startup
from worker.stream import deployment
from worker.stream.client import connect
from worker.stream.names import Names
from worker.stream.reading import Reader
from worker.stream.transport import Transport


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def wait_for_message(pubsub: Any, *, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await pubsub.get_message(
            ignore_subscribe_messages=True, timeout=deadline - time.monotonic()
        )
        if message is not None:
            return json.loads(message["data"])  # type: ignore[no-any-return]
    raise TimeoutError("no reply published")


async def nothing_pending(redis: Redis, stream: str) -> bool:
    return int((await redis.xpending(stream, "update-workers"))["pending"]) == 0


async def test_a_plain_redis_producer_gets_its_reply_on_the_channel_and_under_the_result_key(
    start_worker: WorkerFactory, redis: Redis, prefix: str
) -> None:
    await start_worker()
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{prefix}:replies")
    job = {
        "id": "plain-1",
        "table": "books",
        "set": {"genre": "sci-fi"},
        "where": {"genre": "fiction"},
    }
    await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(job)})
    published = await wait_for_message(pubsub)
    stored = json.loads(await redis.get(f"{prefix}:result:plain-1") or b"null")
    await pubsub.aclose()
    assert published == stored
    assert {key: published[key] for key in ("id", "status", "rowcount", "dry_run", "replayed", "attempts")} == {
        "id": "plain-1", "status": "ok", "rowcount": 3, "dry_run": False, "replayed": False, "attempts": 1,
    }  # fmt: skip
    assert set(published) == {
        "id",
        "status",
        "rowcount",
        "dry_run",
        "replayed",
        "attempts",
        "duration_ms",
        "worker",
    }
    assert 0 < await redis.ttl(f"{prefix}:result:plain-1") <= 86_400
    # Acked (on a cluster the ack follows the publish), and answered entries are deleted.
    await eventually(lambda: nothing_pending(redis, f"{prefix}:jobs"))
    assert await redis.xlen(f"{prefix}:jobs") == 0


async def test_client_update_submit_result_and_replay(
    start_worker: WorkerFactory, prefix: str, engine: AsyncEngine, redis_url: str
) -> None:
    await start_worker()
    async with UpdateClient(redis_url, prefix=prefix) as client:
        reply = await client.update(
            "users", key={"id": 1}, set={"name": "John Doe", "age": 30}, id="seed-orm"
        )
        assert (reply.status, reply.rowcount) == ("ok", 1)
        again = await client.update(
            "users", key={"id": 1}, set={"name": "John Doe", "age": 30}, id="seed-orm"
        )
        assert (again.status, again.rowcount, again.replayed) == ("ok", 1, True)
        conflict = await client.update("users", key={"id": 1}, set={"age": 99}, id="seed-orm")
        assert conflict.error is not None
        assert conflict.error.code == "id_conflict"
        job_id = await client.submit(
            {
                "table": "books",
                "set": {"genre": "sci-fi"},
                "where": {"genre": "fiction"},
                "returning": ["book_id"],
            }
        )
        reply = await client.result(job_id, timeout=10)
        assert reply.returning == [{"book_id": 1}, {"book_id": 3}, {"book_id": 5}]
    async with engine.connect() as connection:
        assert (
            await connection.execute(sa.text("SELECT age FROM users WHERE id = 1"))
        ).scalar() == 30


async def test_many_jobs_through_several_workers_each_apply_once(
    start_worker: WorkerFactory, prefix: str, engine: AsyncEngine, backend: str, redis_url: str
) -> None:
    for index in range(3):
        await start_worker(consumer=f"w{index}", concurrency=4)
    async with UpdateClient(redis_url, prefix=prefix) as client:
        ids = [await client.submit({"id": f"inc-{n % 150}", "table": "items", "inc": {"qty": 1}, "key": {"id": 1 + n % 150 % 4}})
               for n in range(200)]  # fmt: skip  # 50 re-sent duplicates
        replies = [await client.result(job_id, timeout=30) for job_id in ids]
    assert all(reply.status == "ok" for reply in replies), [r.error for r in replies if r.error]
    async with engine.connect() as connection:
        total = (await connection.execute(sa.text("SELECT SUM(qty) FROM items"))).scalar()
        ledger_rows = (
            await connection.execute(sa.text("SELECT COUNT(*) FROM update_worker_ledger"))
        ).scalar()
    assert total == 40 + 150  # seed quantities plus one per distinct id
    assert ledger_rows == 150


async def test_garbage_goes_to_the_dead_letter_stream_and_the_worker_carries_on(
    start_worker: WorkerFactory, redis: Redis, prefix: str, redis_url: str
) -> None:
    await start_worker()
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{prefix}:replies")
    entry_id = text(await redis.xadd(f"{prefix}:jobs", {"job": b"\x00not json{"}))
    no_field = text(await redis.xadd(f"{prefix}:jobs", {"payload": "x"}))
    invalid = {
        "id": "has-id",
        "table": "books",
        "set": {"genre": "x"},
        "where": {"genre": {"regex": "."}},
    }
    await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(invalid)})
    replies = {}
    for _ in range(3):
        reply = await wait_for_message(pubsub)
        replies[reply["id"]] = reply
    await pubsub.aclose()
    assert replies[entry_id]["error"]["code"] == "invalid_job"
    assert "not JSON" in replies[entry_id]["error"]["message"]
    assert replies[no_field]["error"]["code"] == "invalid_job"
    assert replies["has-id"]["error"]["code"] == "invalid_job"
    assert "unknown operator `regex`" in replies["has-id"]["error"]["message"]
    letters: list[Any] = await redis.xrange(f"{prefix}:dead") or []
    dead: dict[str, Any] = {text(fields[b"entry_id"]): fields for _, fields in letters}
    assert set(dead) == {entry_id, no_field}  # the parsable-but-invalid job is replied, not dead
    assert dead[entry_id][b"job"] == b"\x00not json{"
    assert dead[entry_id][b"reason"] == b"unparsable"
    assert dead[entry_id][b"error_code"] == b"invalid_job"
    assert b"not JSON" in dead[entry_id][b"error"]
    assert json.loads(dead[no_field][b"fields"]) == {"payload": "x"}
    await eventually(lambda: nothing_pending(redis, f"{prefix}:jobs"))
    async with UpdateClient(redis_url, prefix=prefix) as client:
        assert (await client.update("users", key={"id": 1}, set={"age": 2})).status == "ok"


async def test_jobs_sent_before_the_first_worker_starts_are_served(
    start_worker: WorkerFactory, redis: Redis, prefix: str, redis_url: str
) -> None:
    await redis.xadd(
        f"{prefix}:jobs",
        {"job": json.dumps({"id": "early", "table": "users", "key": {"id": 1}, "set": {"age": 3}})},
    )
    await start_worker()
    async with UpdateClient(redis_url, prefix=prefix) as client:
        assert (await client.result("early", timeout=10)).rowcount == 1


@pytest.mark.slow
async def test_a_blocking_read_longer_than_the_default_socket_timeout_does_not_raise(
    redis: Redis, prefix: str
) -> None:
    transport = Transport(
        connect(REDIS_URL, block_ms=6000), Names(prefix), group="g", consumer="c", result_ttl=60
    )
    await transport.ensure_groups(1)
    reader = Reader(transport.redis, Names(prefix), group="g", consumer="c")
    started = time.monotonic()
    await reader.wait({0: "0-0"}, block_ms=6000)  # how a worker waits for new entries
    assert time.monotonic() - started >= 5.9
    await transport.aclose()


async def test_the_group_is_recreated_when_the_stream_vanishes(
    start_worker: WorkerFactory, redis: Redis, prefix: str, redis_url: str
) -> None:
    worker = await start_worker()
    # The ingest and every partition stream vanish, group and all (a DEL, a Redis restart
    # without persistence): the mover and the reads meet NOGROUP and recreate them.
    await redis.delete(f"{prefix}:jobs", *map(worker.reader.names.partition, range(16)))
    async with UpdateClient(redis_url, prefix=prefix) as client:
        for _ in range(100):
            if await redis.exists(f"{prefix}:jobs", worker.reader.names.partition(1)) == 2:
                break
            await asyncio.sleep(0.1)
        assert (
            await client.update("users", key={"id": 1}, set={"age": 4}, timeout=10)
        ).status == "ok"
        # and through the ingest, as a redis-cli producer sends it
        await redis.xadd(f"{prefix}:jobs", {"job": json.dumps(
            {"id": "via-ingest", "table": "users", "key": {"id": 1}, "set": {"age": 5}})})  # fmt: skip
        assert (await client.result("via-ingest", timeout=10)).status == "ok"


async def test_models_apply_onupdate_and_type_decorators(
    start_worker: WorkerFactory, engine: AsyncEngine, prefix: str, redis_url: str
) -> None:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(
            Base.metadata.tables["notes"].insert(),
            [{"id": 1, "body": "x", "tags": ["a"], "updated_at": None}],
        )
    await start_worker(models="tests.model_app:Base")
    async with UpdateClient(redis_url, prefix=prefix) as client:
        reply = await client.update(
            "notes", key={"id": 1}, set={"body": "y", "tags": ["Zed", "Alpha"]}
        )
        assert reply.status == "ok", reply.error
        bad = await client.update("notes", key={"id": 1}, set={"tags": "not-a-list"})
        assert bad.error is not None
        assert bad.error.code == "data_error"
        books = await client.update("books", key={"book_id": 1}, set={"genre": "x"})
        assert books.error is not None
        assert books.error.code == "unknown_table"  # only the models' tables exist for this worker
    async with engine.connect() as connection:
        row = (await connection.execute(sa.text("SELECT body, tags, updated_at FROM notes"))).one()
    assert row.body == "y"
    assert row.tags == "alpha,zed"  # the TypeDecorator's bind processing ran
    assert str(row.updated_at).startswith(str(FIXED_NOW))  # the onupdate= default ran


def test_reply_json_is_what_the_model_says() -> None:
    reply = Reply(id="x", status="ok", rowcount=2)
    assert json.loads(reply.encode()) == {"id": "x", "status": "ok", "rowcount": 2, "dry_run": False,
                                          "replayed": False, "attempts": 1, "duration_ms": 0.0, "worker": ""}  # fmt: skip


async def test_a_helper_loop_ends_even_when_its_call_turns_the_cancel_into_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancel that lands inside a client call may come out as another exception, which the
    heartbeat logs and goes on from: cancelling alone left it beating, and a worker's close
    waited for it for ever (seen once in CI). The stop event ends it at its next turn."""
    calls = 0
    beat = asyncio.Event()

    async def announce(*_: object) -> None:
        nonlocal calls
        calls += 1
        beat.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionError("connection closed while reading") from None

    monkeypatch.setattr(deployment, "announce", announce)
    monkeypatch.setattr(deployment, "HEARTBEAT_S", 0.01)
    stopping = asyncio.Event()
    transport: Any = types.SimpleNamespace(redis=None, names=None)
    beating = asyncio.create_task(startup._heartbeat(transport, "me", None, Metrics(), stopping))  # type: ignore[arg-type]
    await asyncio.wait_for(beat.wait(), 5)  # inside its first call
    await asyncio.wait_for(startup._stop([beating], stopping), 5)
    assert beating.done()
    assert calls == 1
