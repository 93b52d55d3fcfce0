"""A lone one-row job: one statement on PostgreSQL (worker/db/oneshot.py), a transaction on SQLite.

Every test runs on both backends and checks the same observable outcome (rows, ledger, reply),
so the one-statement path is held to exactly what the transaction path does. Where it matters,
the test also checks which path ran, from the SQL the engine sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.tables import items
from worker.db.executor import Executor
from worker.db.ledger import ensure_ledger, ledger
from worker.db.oneshot import AUTOCOMMIT, duplicate, eligible, run
from worker.db.schema import Schema, reflect_schema
from worker.job.compiler import compile_job
from worker.job.models import Job, parse_entry
from worker.job.replies import Reply


@pytest.fixture
async def schema(engine: AsyncEngine) -> Schema:
    async with engine.begin() as connection:
        await ensure_ledger(connection)
    return await reflect_schema(engine)


def job(document: dict[str, Any]) -> Job:
    parsed = parse_entry(
        {b"job": json.dumps(document).encode()}, entry_id="1-0", max_job_bytes=1 << 16
    )
    assert isinstance(parsed, Job), parsed
    return parsed


async def execute(executor: Executor, schema: Schema, document: dict[str, Any]) -> Reply:
    parsed = job(document)
    return await executor.execute(parsed, compile_job(parsed, schema))


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL texts the engine sends while the block runs."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


async def qty(engine: AsyncEngine, item: int) -> int:
    async with engine.connect() as connection:
        statement = sa.select(items.c.qty).where(items.c.id == item)
        return int((await connection.execute(statement)).scalar_one())


async def stored(engine: AsyncEngine, job_id: str) -> Reply | None:
    async with engine.connect() as connection:
        statement = sa.select(ledger.c.reply).where(ledger.c.job_id == job_id)
        text = (await connection.execute(statement)).scalar_one_or_none()
    return None if text is None else Reply.model_validate_json(text)


async def test_a_lone_key_job_is_one_statement_on_postgresql(
    engine: AsyncEngine, schema: Schema, backend: str
) -> None:
    executor = Executor(engine, worker="w1")
    with statements(engine) as sent:
        reply = await execute(executor, schema, {"id": "a", "table": "items", "inc": {"qty": 2},
                                                 "key": {"id": 1}})  # fmt: skip
    assert (reply.status, reply.rowcount, reply.replayed) == ("ok", 1, False)
    assert await qty(engine, 1) == 12
    if backend == "postgresql":
        (only,) = sent
        assert only.startswith("WITH applied AS")
        assert "INSERT INTO update_worker_ledger" in only
    else:
        # One transaction: the UPDATE, then the ledger INSERT.
        assert [text.split()[0] for text in sent] == ["BEGIN", "UPDATE", "INSERT"]
    recorded = await stored(engine, "a")
    assert recorded is not None
    assert (recorded.status, recorded.rowcount, recorded.worker) == ("ok", 1, "w1")


async def test_a_redelivery_replays_and_changes_nothing(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="w1")
    document = {"id": "b", "table": "items", "inc": {"qty": 1}, "key": {"id": 3}}
    first = await execute(executor, schema, document)
    second = await execute(Executor(engine, worker="w2"), schema, document)
    assert (first.replayed, second.replayed) == (False, True)
    assert (second.rowcount, second.worker) == (1, "w2")
    assert await qty(engine, 3) == 26


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite has no such path
async def test_the_ledger_key_refuses_a_recorded_id_and_undoes_the_update(
    engine: AsyncEngine, schema: Schema
) -> None:
    document = {"id": "h", "table": "items", "inc": {"qty": 1}, "key": {"id": 1}}
    await execute(Executor(engine, worker="w1"), schema, document)
    (statement,) = compile_job(job(document), schema).statements
    async with AsyncSession(engine.execution_options(**AUTOCOMMIT)) as session:
        with pytest.raises(sa.exc.IntegrityError) as raised:
            await run(session, statement, job(document), replies=("{}", "{}"))
    assert duplicate(raised.value)
    assert await qty(engine, 1) == 11  # once, from the first run


async def test_a_missing_row_records_rowcount_zero_and_replays_it(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="w1")
    document = {"id": "c", "table": "items", "inc": {"qty": 1}, "key": {"id": 99}}
    first = await execute(executor, schema, document)
    async with engine.begin() as connection:  # the row appears: the id still holds its answer
        await connection.execute(items.insert().values(id=99, name="Late", qty=0))
    again = await execute(executor, schema, document)
    assert (first.status, first.rowcount) == ("ok", 0)
    assert (again.status, again.rowcount, again.replayed) == ("ok", 0, True)
    assert await qty(engine, 99) == 0
    recorded = await stored(engine, "c")
    assert recorded is not None
    assert recorded.rowcount == 0


async def test_a_guard_refusing_no_row_is_recorded_as_expectation_failed(
    engine: AsyncEngine, schema: Schema
) -> None:
    executor = Executor(engine, worker="w1")
    document = {"id": "d", "table": "items", "inc": {"qty": 1}, "key": {"id": 98},
                "expect": {"rows": 1}}  # fmt: skip
    reply = await execute(executor, schema, document)
    assert reply.error is not None
    assert reply.error.code == "expectation_failed"
    assert "expected exactly 1 row(s), matched 0" in reply.error.message
    recorded = await stored(engine, "d")
    assert recorded is not None
    assert recorded.error is not None
    assert recorded.error.code == "expectation_failed"


async def test_max_rows_zero_on_a_key_refuses_the_matching_row(
    engine: AsyncEngine, schema: Schema, backend: str
) -> None:
    document = {"id": "e", "table": "items", "inc": {"qty": 1}, "key": {"id": 1},
                "expect": {"max_rows": 0}}  # fmt: skip
    assert not eligible(compile_job(job(document), schema))  # a rollback may be needed
    reply = await execute(Executor(engine, worker="w1"), schema, document)
    assert reply.error is not None
    assert reply.error.code == "expectation_failed"
    assert await qty(engine, 1) == 10


async def test_many_deliveries_of_one_id_at_once_apply_it_once(
    engine: AsyncEngine, schema: Schema
) -> None:
    document = {"id": "f", "table": "items", "inc": {"qty": 1}, "key": {"id": 4}}
    executors = [Executor(engine, worker=f"w{index}") for index in range(4)]
    replies = await asyncio.gather(
        *(execute(executors[index % 4], schema, document) for index in range(12))
    )
    assert sorted(reply.replayed for reply in replies) == [False] + [True] * 11
    assert {(reply.status, reply.rowcount) for reply in replies} == {("ok", 1)}
    assert await qty(engine, 4) == 6


async def test_a_constraint_of_the_table_is_an_integrity_error_not_a_replay(
    engine: AsyncEngine, schema: Schema
) -> None:
    document = {"id": "g", "table": "items", "set": {"name": None}, "key": {"id": 2}}
    reply = await execute(Executor(engine, worker="w1"), schema, document)
    assert reply.error is not None
    assert (reply.error.code, reply.replayed) == ("integrity_error", False)
    recorded = await stored(engine, "g")
    assert recorded is not None
    assert recorded.error is not None
    assert recorded.error.code == "integrity_error"


async def test_other_jobs_keep_the_transaction_path(engine: AsyncEngine, schema: Schema) -> None:
    for document in (
        {"table": "items", "inc": {"qty": 1}, "key": {"id": 1}, "returning": ["qty"]},
        {"table": "items", "inc": {"qty": 1}, "where": {"id": 1}},
        {"updates": [{"table": "items", "inc": {"qty": 1}, "key": {"id": 1}}] * 2},
    ):
        assert not eligible(compile_job(job(document), schema)), document
    assert eligible(compile_job(job({"updates": [{"table": "items", "inc": {"qty": 1},
                                                  "key": {"id": 1}}]}), schema))  # fmt: skip
