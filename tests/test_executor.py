"""Jobs against real databases: every test runs on SQLite and on PostgreSQL, twice: straight
through the executor, and end to end through the real Redis and a running worker."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from tests.tables import items
from tests.test_service import wait_for_message
from worker.client import UpdateClient
from worker.db.executor import Executor
from worker.db.ledger import ensure_ledger, ledger
from worker.db.schema import Schema, reflect_schema
from worker.demo import books, users
from worker.errors import WorkerError
from worker.job.compiler import compile_job
from worker.job.models import Job, parse_entry
from worker.job.replies import Reply


class Runner:
    """Parse, compile and execute, the way the service does; through Redis when ``via`` is set."""

    def __init__(self, engine: AsyncEngine, schema: Schema, *, via: str | None = None) -> None:
        self.engine = engine
        self.schema = schema
        self.executor = Executor(engine, worker="test", max_returning=3)
        self.via = via  # a Redis prefix with a worker serving it

    async def __call__(self, document: dict[str, Any]) -> Reply:
        if self.via is not None:
            # A client per job: each has its own reply channel, so duplicates each get a reply.
            async with UpdateClient(REDIS_URL, prefix=self.via) as client:
                if "reply_to" not in document:
                    return await client.result(await client.submit(document), timeout=20)
                # A producer naming its own channel listens there, not on the client's.
                async with Redis.from_url(REDIS_URL) as redis, redis.pubsub() as pubsub:
                    await pubsub.subscribe(document["reply_to"])
                    await client.submit(document)
                    return Reply.model_validate(await wait_for_message(pubsub))
        parsed = parse_entry(
            {b"job": json.dumps(document).encode()}, entry_id="1-0", max_job_bytes=65536
        )
        assert isinstance(parsed, Job), parsed
        try:
            plan = compile_job(parsed, self.schema)
        except WorkerError as error:
            return await self.executor.reject(parsed, error)
        return await self.executor.execute(parsed, plan)

    async def rows(self, table: sa.Table, *columns: str) -> list[tuple[Any, ...]]:
        statement = sa.select(*(table.c[name] for name in columns)).order_by(*table.primary_key)
        async with self.engine.connect() as connection:
            return [tuple(row) for row in await connection.execute(statement)]

    async def ledger_ids(self) -> list[str]:
        async with self.engine.connect() as connection:
            return list(
                (
                    await connection.execute(sa.select(ledger.c.job_id).order_by(ledger.c.job_id))
                ).scalars()
            )


@pytest.fixture(params=["executor", "redis"])
async def run(
    engine: AsyncEngine, start_worker: WorkerFactory, request: pytest.FixtureRequest
) -> Runner:
    async with engine.begin() as connection:
        await ensure_ledger(connection)
    schema = await reflect_schema(engine)
    if request.param == "executor":
        return Runner(engine, schema)
    worker = await start_worker(max_returning=3)
    return Runner(engine, schema, via=worker.settings.prefix)


async def test_one_row_by_key_seed_style(run: Runner) -> None:
    reply = await run(
        {"id": "u1", "table": "users", "key": {"id": 1}, "set": {"name": "John Doe", "age": 30}}
    )
    assert (reply.status, reply.rowcount, reply.replayed, reply.attempts) == ("ok", 1, False, 1)
    assert await run.rows(users, "id", "name", "age") == [(1, "John Doe", 30)]
    assert await run.ledger_ids() == ["u1"]


async def test_set_based_seed_style_counts_three_rows(run: Runner) -> None:
    reply = await run(
        {"id": "b1", "table": "books", "set": {"genre": "sci-fi"}, "where": {"genre": "fiction"}}
    )
    assert reply.rowcount == 3
    assert [genre for (genre,) in await run.rows(books, "genre")] == [
        "sci-fi",
        "non-fiction",
        "sci-fi",
        "non-fiction",
        "sci-fi",
    ]


async def test_rowcount_counts_matched_rows_even_when_nothing_changes(run: Runner) -> None:
    reply = await run(
        {"id": "same", "table": "books", "set": {"genre": "fiction"}, "where": {"genre": "fiction"}}
    )
    assert reply.rowcount == 3


OPERATOR_CASES = [
    ({"name": "Apple"}, [1]),
    ({"tag": None}, [2]),
    ({"qty": {"eq": 10}}, [1]),
    ({"qty": {"neq": 10}}, [2, 3, 4]),
    ({"qty": {"gt": 5}}, [1, 3]),
    ({"qty": {"gte": 5}}, [1, 3, 4]),
    ({"qty": {"lt": 5}}, [2]),
    ({"qty": {"lte": 5}}, [2, 4]),
    ({"id": {"in": [1, 3, 99]}}, [1, 3]),
    ({"id": {"nin": [1, 3]}}, [2, 4]),
    ({"name": {"like": "A%"}}, [1]),  # case-sensitive on both backends
    ({"name": {"nlike": "%a%"}}, [1]),  # only "Apple" has no lowercase a
    ({"name": {"ilike": "a%"}}, [1, 2]),
    ({"name": {"nilike": "%A%"}}, []),
    ({"tag": {"is_null": True}}, [2]),
    ({"tag": {"is_null": False}}, [1, 3, 4]),
    ({"price": {"between": ["1.00", "2.25"]}}, [1, 2]),
    ({"born": {"gte": "2024-02-01"}}, [2, 3]),
    ({"seen_at": {"lt": "2024-02-01T09:30:00"}}, [1]),
    ({"active": True}, [1, 3]),
    ({"weight": {"gt": 0.15}}, [1, 3]),
    ({"or": [{"qty": 0}, {"tag": "veg"}]}, [2, 4]),
    ({"and": [{"active": True}, {"qty": {"gt": 10}}]}, [3]),
    ({"not": {"tag": "fruit"}}, [4]),  # NOT (tag = 'fruit') is unknown for NULL tags, as in SQL
]


@pytest.mark.parametrize(
    ("where", "expected"), OPERATOR_CASES, ids=[json.dumps(w) for w, _ in OPERATOR_CASES]
)
async def test_each_operator_matches_the_same_rows_on_both_backends(
    run: Runner, where: dict[str, Any], expected: list[int]
) -> None:
    reply = await run(
        {
            "table": "items",
            "set": {"tag": "hit"},
            "where": where,
            "returning": ["id"],
            "dry_run": True,
        }
    )
    assert reply.status == "ok", reply.error
    assert reply.rowcount == len(expected)
    assert sorted(row["id"] for row in reply.returning or []) == expected


async def test_returning_values_are_the_same_json_on_both_backends(run: Runner) -> None:
    reply = await run({"table": "items", "inc": {"qty": 1}, "key": {"id": 1},
                       "returning": ["id", "qty", "price", "weight", "active", "tag", "born", "seen_at"]})  # fmt: skip
    assert reply.returning == [{"id": 1, "qty": 11, "price": "1.5", "weight": 0.2, "active": True, "tag": "fruit",
                                "born": "2024-01-01", "seen_at": "2024-01-01T08:00:00"}]  # fmt: skip


async def test_returning_is_capped_but_rowcount_counts_every_row(run: Runner) -> None:
    reply = await run({"table": "items", "inc": {"qty": 1}, "all": True, "returning": ["id"]})
    assert reply.rowcount == 4
    assert reply.returning is not None
    assert len(reply.returning) == 3  # max_returning=3 in this runner


async def test_inc_on_numeric_is_exact(run: Runner) -> None:
    await run({"id": "p", "table": "items", "inc": {"price": 0.1}, "key": {"id": 1}})
    (price,) = (await run.rows(items, "price"))[0]
    assert str(price) in ("1.60", "1.6")


async def test_batch_reports_each_update_and_their_sum(run: Runner) -> None:
    reply = await run({"id": "batch", "updates": [
        {"table": "books", "set": {"genre": "sci-fi"}, "where": {"genre": "fiction"}},
        {"table": "users", "key": {"id": 1}, "set": {"age": 31}, "returning": ["age"]},
    ]})  # fmt: skip
    assert reply.rowcount == 4
    assert [result.model_dump(exclude_none=True) for result in reply.results or []] == [
        {"rowcount": 3},
        {"rowcount": 1, "returning": [{"age": 31}]},
    ]
    assert reply.returning is None


async def test_batch_is_all_or_nothing(run: Runner) -> None:
    reply = await run({"id": "batch-fail", "updates": [
        {"table": "books", "set": {"genre": "sci-fi"}, "where": {"genre": "fiction"}},
        {"table": "users", "set": {"age": 1}, "all": True, "expect": {"rows": 2}},
    ]})  # fmt: skip
    assert reply.error is not None
    assert reply.error.code == "expectation_failed"
    assert "updates[1] (users)" in reply.error.message
    assert [genre for (genre,) in await run.rows(books, "genre")].count("fiction") == 3


@pytest.mark.parametrize(
    ("expect", "ok"),
    [({"rows": 3}, True), ({"rows": 2}, False), ({"min_rows": 3}, True), ({"min_rows": 4}, False),
     ({"max_rows": 3}, True), ({"max_rows": 2}, False)],
)  # fmt: skip
async def test_each_guard_commits_or_rolls_back(
    run: Runner, expect: dict[str, int], ok: bool
) -> None:
    reply = await run(
        {
            "table": "books",
            "set": {"genre": "sci-fi"},
            "where": {"genre": "fiction"},
            "expect": expect,
        }
    )
    assert reply.status == ("ok" if ok else "error")
    fiction_left = [genre for (genre,) in await run.rows(books, "genre")].count("fiction")
    assert fiction_left == (0 if ok else 3)
    if not ok:
        assert reply.error is not None
        assert reply.error.code == "expectation_failed"
        assert not reply.error.retryable


async def test_dry_run_counts_then_rolls_back_and_leaves_the_ledger_alone(run: Runner) -> None:
    job = {"id": "dry", "table": "books", "set": {"genre": "sci-fi"}, "where": {"genre": "fiction"}}
    reply = await run({**job, "dry_run": True})
    assert (reply.rowcount, reply.dry_run) == (3, True)
    assert [genre for (genre,) in await run.rows(books, "genre")].count("fiction") == 3
    assert await run.ledger_ids() == []
    real = await run(job)
    assert (real.rowcount, real.dry_run, real.replayed) == (3, False, False)


async def test_the_same_id_is_replayed_not_applied_twice(run: Runner) -> None:
    job = {"id": "inc-once", "table": "items", "inc": {"qty": 5}, "key": {"id": 1}}
    first = await run(job)
    second = await run({**job, "reply_to": f"elsewhere-{uuid.uuid4().hex}"})
    assert (first.replayed, second.replayed) == (False, True)
    assert second.rowcount == first.rowcount == 1
    assert (await run.rows(items, "qty"))[0] == (15,)


async def test_the_same_id_with_another_payload_is_an_id_conflict(run: Runner) -> None:
    await run({"id": "taken", "table": "items", "inc": {"qty": 5}, "key": {"id": 1}})
    reply = await run({"id": "taken", "table": "items", "inc": {"qty": 6}, "key": {"id": 1}})
    assert reply.error is not None
    assert reply.error.code == "id_conflict"
    assert (await run.rows(items, "qty"))[0] == (15,)


async def test_permanent_errors_are_recorded_so_a_retry_gets_the_same_answer(run: Runner) -> None:
    job = {
        "id": "guarded",
        "table": "books",
        "set": {"genre": "x"},
        "where": {"genre": "fiction"},
        "expect": {"rows": 1},
    }
    first = await run(job)
    async with run.engine.begin() as connection:  # the data changes so the guard would now pass
        await connection.execute(books.update().where(books.c.book_id > 1).values(genre="other"))
    again = await run(job)
    assert first.error is not None
    assert again.error is not None
    assert (again.error.code, again.replayed) == ("expectation_failed", True)
    assert await run.ledger_ids() == ["guarded"]


async def test_database_errors_map_to_their_codes(run: Runner) -> None:
    integrity = await run(
        {"id": "null-name", "table": "items", "set": {"name": None}, "key": {"id": 1}}
    )
    assert integrity.error is not None
    assert (integrity.error.code, integrity.error.retryable) == ("integrity_error", False)
    data = await run(
        {"id": "bad-price", "table": "books", "set": {"book_price": "lots"}, "key": {"book_id": 1}}
    )
    assert data.error is not None
    assert data.error.code == "data_error"
    assert "books.book_price" in data.error.message


async def test_two_deliveries_of_one_id_at_once_apply_it_once(
    run: Runner, engine: AsyncEngine
) -> None:
    other = Runner(engine, run.schema)
    job = {"id": "raced", "table": "items", "inc": {"qty": 1}, "key": {"id": 3}}
    replies = await asyncio.gather(*(runner(job) for runner in (run, other, run, other)))
    assert sorted(reply.replayed for reply in replies) == [False, True, True, True]
    assert all(reply.status == "ok" for reply in replies)
    assert (await run.rows(items, "qty"))[2] == (26,)
