"""Hostile jobs against a running worker and a real database (both backends): every case gets
its documented code, or a dead letter when no id is recoverable; no row changes; the worker
stays up, a valid job afterwards succeeds, and nothing is left pending."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory, eventually
from tests.tables import items, test_metadata
from worker.client import UpdateClient
from worker.demo import seed_metadata

INJECTION = "items; DROP TABLE items; --"
#: (job id, the job, the code its reply must carry)
CASES: list[tuple[str, Any, str]] = [
    ("h-table", {"table": INJECTION, "set": {"qty": 1}, "all": True}, "unknown_table"),
    ("h-ledger", {"table": "update_worker_ledger", "set": {"reply": "x"}, "all": True}, "unknown_table"),
    ("h-fence", {"table": "update_worker_partitions", "set": {"generation": 0}, "all": True}, "unknown_table"),
    ("h-catalog", {"table": "pg_catalog.pg_authid", "set": {"rolsuper": True}, "all": True}, "unknown_table"),
    ("h-set-column", {"table": "items", "set": {"qty = 0, name": "x"}, "key": {"id": 1}}, "unknown_column"),
    ("h-where-column", {"table": "items", "set": {"qty": 1}, "where": {"1=1 OR id": 1}}, "unknown_column"),
    ("h-operator", {"table": "items", "set": {"qty": 1}, "where": {"id": {"regex": ".*"}}}, "invalid_job"),
    ("h-no-filter", {"table": "items", "set": {"qty": 0}}, "missing_filter"),
    ("h-empty-filter", {"table": "items", "set": {"qty": 0}, "where": {}}, "missing_filter"),
    ("h-all-and-where", {"table": "items", "set": {"qty": 0}, "all": True, "where": {"id": 1}}, "invalid_job"),
    ("h-primary-key", {"table": "items", "set": {"id": 99}, "key": {"id": 1}}, "forbidden_column"),
    ("h-inc-text", {"table": "items", "inc": {"name": 1}, "key": {"id": 1}}, "invalid_job"),
    ("h-type", {"table": "items", "set": {"qty": "lots"}, "key": {"id": 1}}, "data_error"),
    ("h-quote-value", {"table": "items", "set": {"born": "2024-01-01'; DROP TABLE items; --"},
                       "key": {"id": 1}}, "data_error"),
    ("h-depth", {"table": "items", "set": {"qty": 0},
                 "where": json.loads('{"not":' * 33 + '{"id":1}' + "}" * 33)}, "invalid_job"),
    ("h-in-size", {"table": "items", "set": {"qty": 0}, "where": {"id": {"in": list(range(10_001))}}},
     "invalid_job"),
    ("h-batch-size", {"updates": [{"table": "items", "set": {"qty": 0}, "key": {"id": 1}}] * 101},
     "invalid_job"),
    ("h-columns", {"table": "items", "set": {f"c{n}": 0 for n in range(257)}, "key": {"id": 1}},
     "invalid_job"),
    ("h-returning", {"table": "items", "set": {"qty": 10}, "key": {"id": 1}, "returning": ["password"]},
     "unknown_column"),
    ("h-unknown-field", {"table": "items", "set": {"qty": 10}, "key": {"id": 1}, "sql": "DROP"},
     "invalid_job"),
    ("h-guard", {"table": "items", "inc": {"qty": 1}, "where": {"qty": {"gte": 0}},
                 "expect": {"max_rows": 1}}, "expectation_failed"),
    ("h-batch-half", {"updates": [{"table": "items", "inc": {"qty": 1}, "key": {"id": 1}},
                                  {"table": "items", "set": {"qty": "x"}, "key": {"id": 2}}]}, "data_error"),
]  # fmt: skip
#: Entries with no recoverable id: dead letters, with an invalid_job reply under the entry id.
DEAD: list[bytes] = [
    b"\x00\xff not even utf-8",
    b'{"id": "' + b"x" * 201 + b'", "table": "items", "set": {"qty": 1}, "all": true}',
    b'{"id": "a b;c", "table": "items", "set": {"qty": 1}, "all": true}',
    b'{"table": "items", "set": {"qty": 1}, "key": {"id": 1}}' + b" " * 70_000,
    b"[" * 100_000,
    b'"just a string"',
    b'{"id":"h-keys-dup","table":"items","set":{"qty":1},"set":{"qty":2},"key":{"id":1}}',
]


async def snapshot(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    async with engine.connect() as connection:
        return {
            table.name: [tuple(row) for row in await connection.execute(sa.select(table).order_by(*table.primary_key))]
            for metadata in (seed_metadata, test_metadata)
            for table in metadata.sorted_tables
        }  # fmt: skip


async def test_a_hostile_batch_changes_nothing_and_gets_its_codes(
    start_worker: WorkerFactory, engine: AsyncEngine, redis: Redis, prefix: str
) -> None:
    before = await snapshot(engine)
    await start_worker()
    stream = f"{prefix}:jobs"
    for job_id, job, _ in CASES:
        raw = job if isinstance(job, str) else json.dumps({"id": job_id, **job})
        await redis.xadd(stream, {"job": raw})
    dead_ids = [await redis.xadd(stream, {"job": raw}) for raw in DEAD]
    await redis.xadd(stream, {"payload": "no job field"})
    codes: dict[str, str] = {}

    async def answered() -> bool:
        for job_id, _, _ in CASES:
            if job_id not in codes and (stored := await redis.get(f"{prefix}:result:{job_id}")):
                reply = json.loads(stored)
                codes[job_id] = reply["error"]["code"] if reply["status"] == "error" else "ok"
        return len(codes) == len(CASES)

    with contextlib.suppress(TimeoutError):  # the comparison below names what is missing
        await eventually(answered, timeout=30)
    assert codes == {job_id: code for job_id, _, code in CASES}

    async def all_dead() -> bool:
        return int(await redis.xlen(f"{prefix}:dead")) == len(DEAD) + 1

    await eventually(all_dead, timeout=30)
    letters: Any = await redis.xrange(f"{prefix}:dead")
    assert {fields[b"entry_id"] for _, fields in letters} >= set(dead_ids)
    assert {fields[b"reason"] for _, fields in letters} == {b"unparsable"}
    for entry_id in dead_ids:  # each still got an invalid_job reply, under its entry id
        name = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        stored: Any = await redis.get(f"{prefix}:result:{name}")
        assert json.loads(stored)["error"]["code"] == "invalid_job"
    assert await snapshot(engine) == before  # not one row changed
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:  # the worker is still serving
        reply = await client.update("items", inc={"qty": 1}, key={"id": 1}, timeout=20)
    assert (reply.status, reply.rowcount) == ("ok", 1)

    async def drained() -> bool:
        pending = await redis.xpending(stream, "update-workers")
        return int(pending["pending"]) == 0 and int(await redis.xlen(stream)) == 0

    await eventually(drained)


async def test_values_with_quotes_semicolons_and_comments_are_stored_verbatim(
    start_worker: WorkerFactory, engine: AsyncEngine, backend: str, prefix: str
) -> None:
    await start_worker()
    texts = [
        "O'Reilly",
        "x'; DROP TABLE items; --",
        '"quoted"',
        "a -- b /* c */",
        "%_\\",
        "💥\u202e",
    ]
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        for text in texts:
            reply = await client.update(
                "items", set={"name": text}, key={"id": 2}, returning=["name"]
            )
            assert reply.returning == [{"name": text}]
            async with engine.connect() as connection:
                stored = (
                    await connection.execute(sa.select(items.c.name).where(items.c.id == 2))
                ).scalar()
            assert stored == text
            found = await client.update("items", inc={"qty": 1}, where={"name": text})
            assert found.rowcount == 1  # and it matches itself as a bound value, not as SQL
        nul = await client.update("items", set={"name": "a\x00b"}, key={"id": 3})
    if backend == "postgresql":  # PostgreSQL text cannot hold NUL: refused, not retried
        assert nul.error is not None
        assert (nul.error.code, nul.attempts) == ("data_error", 1)
    else:
        assert nul.status == "ok"
        async with engine.connect() as connection:
            assert (
                await connection.execute(sa.select(items.c.name).where(items.c.id == 3))
            ).scalar() == "a\x00b"


async def test_policy_settings_hold_through_a_running_worker(
    start_worker: WorkerFactory, engine: AsyncEngine, prefix: str
) -> None:
    before = await snapshot(engine)
    await start_worker(max_rows_default=2, allow_all=False)
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        capped = await client.update("books", set={"genre": "x"}, where={"genre": "fiction"})
        unfiltered = await client.update("books", set={"genre": "x"}, all=True)
        own_cap = await client.update("books", set={"genre": "x"}, where={"genre": "fiction"},
                                      expect={"max_rows": 3})  # fmt: skip
    assert capped.error is not None
    assert capped.error.code == "expectation_failed"  # 3 fiction books, over the default cap of 2
    assert unfiltered.error is not None
    assert unfiltered.error.code == "missing_filter"
    assert (own_cap.status, own_cap.rowcount) == ("ok", 3)  # a job's own cap wins
    after = await snapshot(engine)
    assert {table: rows for table, rows in after.items() if table != "books"} == {
        table: rows for table, rows in before.items() if table != "books"
    }
