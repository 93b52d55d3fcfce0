"""Group commits on both backends: many single-row jobs in one transaction, with the same
answers as one job at a time, and one bad job never failing its neighbours."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.tables import items
from worker.db import fencing
from worker.db.executor import Executor
from worker.db.groups import groupable
from worker.db.ledger import ensure_ledger, ledger, record_many
from worker.db.schema import Schema, reflect_schema
from worker.errors import Fenced
from worker.job.compiler import compile_job
from worker.job.models import Job, parse_entry
from worker.job.plans import Plan
from worker.job.replies import Reply


@pytest.fixture
async def schema(engine: AsyncEngine) -> Schema:
    async with engine.begin() as connection:
        await ensure_ledger(connection)
    return await reflect_schema(engine)


def compiled(schema: Schema, document: dict[str, Any]) -> tuple[Job, Plan]:
    parsed = parse_entry(
        {b"job": json.dumps(document).encode()}, entry_id="1-0", max_job_bytes=65536
    )
    assert isinstance(parsed, Job), parsed
    return parsed, compile_job(parsed, schema)


def inc(job_id: str, item_id: int, **extra: Any) -> dict[str, Any]:
    return {"id": job_id, "table": "items", "key": {"id": item_id}, "inc": {"qty": 1}, **extra}


async def quantities(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as connection:
        return list(
            (await connection.execute(sa.select(items.c.qty).order_by(items.c.id))).scalars()
        )


async def ledger_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            (await connection.execute(sa.select(sa.func.count()).select_from(ledger))).scalar_one()
        )


def test_only_real_single_row_by_key_jobs_are_groupable(schema: Schema) -> None:
    assert groupable(*compiled(schema, inc("a", 1)))
    assert not groupable(*compiled(schema, inc("b", 1, dry_run=True)))
    assert not groupable(
        *compiled(schema, {"id": "c", "table": "items", "inc": {"qty": 1}, "where": {"id": 1}})
    )
    assert not groupable(
        *compiled(
            schema,
            {
                "id": "d",
                "updates": [{k: v for k, v in inc("x", n).items() if k != "id"} for n in (1, 2)],
            },
        )
    )


async def test_a_group_answers_like_one_job_at_a_time(engine: AsyncEngine, schema: Schema) -> None:
    executor = Executor(engine, worker="g")
    # Item 9 does not exist: rowcount 0 is an answer, not an error (key implies max_rows=1).
    group = [compiled(schema, inc(f"g-{n}", 1 + n % 4)) for n in range(12)] + [
        compiled(schema, inc("g-none", 9))
    ]
    replies = await run_group(executor, group)
    assert [(reply.id, reply.status, reply.rowcount, reply.replayed) for reply in replies] == [
        *((f"g-{n}", "ok", 1, False) for n in range(12)),
        ("g-none", "ok", 0, False),
    ]
    assert await quantities(engine) == [10 + 3, 0 + 3, 25 + 3, 5 + 3]
    assert await ledger_count(engine) == 13
    again = await run_group(executor, group)  # all finished: replayed, nothing applied
    assert all(reply.replayed for reply in again)
    assert [reply.rowcount for reply in again] == [reply.rowcount for reply in replies]
    assert await quantities(engine) == [13, 3, 28, 8]


async def test_repeated_and_finished_ids_in_a_group_are_replayed_or_conflict(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="g")
    await executor.execute(*compiled(schema, inc("done", 2)))
    group = [
        compiled(schema, inc("twice", 1)),
        compiled(schema, inc("done", 2)),
        compiled(schema, inc("twice", 1)),
        compiled(schema, {**inc("twice", 1), "inc": {"qty": 5}}),  # same id, other payload
    ]
    replies = await run_group(executor, group)
    assert [(reply.status, reply.replayed) for reply in replies[:3]] == [
        ("ok", False),
        ("ok", True),
        ("ok", True),
    ]
    assert replies[3].error is not None
    assert replies[3].error.code == "id_conflict"
    assert await quantities(engine) == [11, 1, 25, 5]


async def test_one_failing_job_rolls_the_group_back_and_the_rest_still_succeed(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="g")
    group = [
        compiled(schema, inc("ok-1", 1)),
        compiled(schema, inc("guarded", 9, expect={"rows": 1})),  # no item 9: the guard fails
        compiled(
            schema, {"id": "bad-value", "table": "items", "key": {"id": 3}, "set": {"name": None}}
        ),
        compiled(schema, inc("ok-2", 4)),
    ]
    replies = await run_group(executor, group)
    codes = [reply.error.code if reply.error else reply.status for reply in replies]
    assert codes == ["ok", "expectation_failed", "integrity_error", "ok"]
    assert await quantities(engine) == [11, 0, 25, 6]
    assert await ledger_count(engine) == 4  # verdicts about jobs are recorded too


async def test_concurrent_groups_over_the_same_rows_never_deadlock(
    engine: AsyncEngine, schema: Schema
) -> None:
    """Random rows in every order: groups lock them in key order, so none waits in a cycle."""
    executor = Executor(engine, worker="g", max_attempts=1)  # a deadlock would show as unavailable
    rng = random.Random(5)
    groups = [
        [compiled(schema, inc(f"c-{g}-{n}", rng.randint(1, 4))) for n in range(25)]
        for g in range(8)
    ]
    results = await asyncio.gather(*(run_group(executor, group) for group in groups))
    replies = [reply for group in results for reply in group]
    assert {(reply.status, reply.replayed, reply.attempts) for reply in replies} == {
        ("ok", False, 1)
    }
    assert sum(await quantities(engine)) == 40 + 8 * 25


async def test_jobs_on_one_row_apply_in_the_order_they_came_whatever_their_shape(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="g")
    group = [
        compiled(schema, inc("first", 1)),  # 10 -> 11
        compiled(schema, {"id": "second", "table": "items", "key": {"id": 1}, "set": {"qty": 100}}),
        compiled(schema, {**inc("third", 1), "inc": {"qty": 5}, "returning": ["qty", "name"]}),
        compiled(schema, inc("elsewhere", 2, returning=["qty"])),
    ]
    replies = await run_group(executor, group)
    assert [reply.rowcount for reply in replies] == [1, 1, 1, 1]
    assert replies[2].returning == [{"qty": 105, "name": "Apple"}]
    assert replies[3].returning == [{"qty": 1}]
    assert (await quantities(engine))[:2] == [105, 1]


async def test_a_group_returns_what_one_job_at_a_time_returns(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="g", max_returning=0)
    alone = await executor.execute(*compiled(schema, inc("alone", 3, returning=["qty", "price"])))
    [together, missing] = await run_group(executor, [
        compiled(schema, inc("together", 3, returning=["qty", "price"])),
        compiled(schema, inc("missing", 99, returning=["qty"])),
    ])  # fmt: skip
    assert (alone.rowcount, alone.returning) == (together.rowcount, together.returning) == (1, [])
    assert (missing.rowcount, missing.returning) == (0, [])


async def run_group(executor: Executor, group: list[tuple[Job, Plan]]) -> list[Reply]:
    """execute_group, where every job runs (no order key held up by a transient failure)."""
    replies = await executor.execute_group(group)
    assert all(reply is not None for reply in replies)
    return [reply for reply in replies if reply is not None]


async def test_a_group_larger_than_one_statement_holds_commits_as_one_group(
    engine: AsyncEngine, schema: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A group of 1,000 (the largest WORKER_GROUP_SIZE) on distinct rows: more rows than one
    statement takes (SQLite allows 500 terms in a compound SELECT), so it runs in chunks, and
    commits as a group rather than falling back to one job at a time."""
    async with engine.begin() as connection:
        await connection.execute(
            items.insert(), [{"id": n, "name": f"n{n}", "qty": 0} for n in range(100, 1100)]
        )
    executor = Executor(engine, worker="g")
    with caplog.at_level(logging.INFO, logger="worker.db.groups"):
        replies = await run_group(
            executor, [compiled(schema, inc(f"big-{n}", n)) for n in range(100, 1100)]
        )
    assert not [record.message for record in caplog.records if "rolled back" in record.message]
    assert [(reply.status, reply.rowcount) for reply in replies] == [("ok", 1)] * 1000
    assert (await quantities(engine))[4:] == [1] * 1000
    assert await ledger_count(engine) == 1000


async def test_a_group_stores_every_column_type_as_one_job_at_a_time_does(
    engine: AsyncEngine, schema: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """Grouped updates bind their values in bulk (arrays on PostgreSQL): every type, and
    NULL, ends up stored exactly as when each job runs alone."""
    values = [
        {"name": "Plum", "price": "3.455", "weight": 0.25, "active": False, "tag": None,
         "born": "2025-02-03", "seen_at": "2025-02-03T04:05:06+02:00"},
        {"name": "Fig", "price": None, "weight": None, "active": None, "tag": "dried",
         "born": None, "seen_at": None},
    ]  # fmt: skip
    executor = Executor(engine, worker="g")
    group = [compiled(schema, {"id": f"grouped-{n}", "table": "items", "key": {"id": n + 1},
                               "set": value}) for n, value in enumerate(values)]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="worker.db.groups"):
        assert [reply.rowcount for reply in await run_group(executor, group)] == [1, 1]
    assert not [record.message for record in caplog.records if "rolled back" in record.message]
    for n, value in enumerate(values):
        job = {"id": f"alone-{n}", "table": "items", "key": {"id": n + 3}, "set": value}
        assert (await executor.execute(*compiled(schema, job))).rowcount == 1
    async with engine.connect() as connection:
        rows = (await connection.execute(sa.select(items).order_by(items.c.id))).all()
    stored = [tuple(row)[1:] for row in rows]
    assert [row[0] for row in stored] == ["Plum", "Fig", "Plum", "Fig"]
    assert [row[:1] + row[2:] for row in stored[:2]] == [row[:1] + row[2:] for row in stored[2:]]


async def test_a_fenced_group_applies_and_records_nothing(
    engine: AsyncEngine, schema: Schema
) -> None:
    """The fence is read with the ledger lookup, in one statement: a generation that is not
    the partition's any more stops the whole group; the current one lets it through."""
    async with engine.begin() as connection:
        await fencing.ensure_partitions(connection, 2)
    generation = await fencing.take(engine, 1, wait_s=1.0)
    executor = Executor(engine, worker="g")
    group = [compiled(schema, inc(f"f-{n}", 1 + n % 2)) for n in range(4)]
    with pytest.raises(Fenced) as raised:
        await executor.execute_group(group, fences={0: 0, 1: generation - 1})
    assert raised.value.partitions == [1]
    assert await quantities(engine) == [10, 0, 25, 5]
    assert await ledger_count(engine) == 0
    replies = await executor.execute_group(group, fences={0: 0, 1: generation})
    assert [reply.rowcount if reply else None for reply in replies] == [1, 1, 1, 1]
    assert await quantities(engine) == [12, 2, 25, 5]
    again = await executor.execute_group(group, fences={0: 0, 1: generation})
    assert all(reply and reply.replayed for reply in again)  # found by the same statement


async def test_the_ledger_insert_counts_only_the_ids_it_recorded(engine: AsyncEngine) -> None:
    """A group learns that another delivery recorded one of its ids first from this count."""
    async with engine.begin() as connection:
        await ensure_ledger(connection)
    async with AsyncSession(engine) as session, session.begin():
        assert await record_many(session, [("taken", "h", "{}")]) == 1
    rows = [("fresh-1", "h", "{}"), ("taken", "h", "{}"), ("fresh-2", "h", "{}")]
    async with AsyncSession(engine) as session, session.begin():
        assert await record_many(session, rows) == 2
    async with engine.connect() as connection:
        stored = await connection.execute(sa.select(ledger.c.job_id).order_by(ledger.c.job_id))
        assert [job_id for (job_id,) in stored] == ["fresh-1", "fresh-2", "taken"]
