"""The unit-of-work path (WORKER_ORM, issue 14): with the application's models, a job honours
their validators, update events and version counter, on both backends; WORKER_ORM=never is the
Core path, which bypasses them, and says so."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import WorkerFactory
from tests.model_app import FIXED_NOW
from tests.model_rules import TOUCHED_BY, Base, Member, Plain, audit
from tests.test_order import (
    test_jobs_on_a_row_apply_in_order_across_three_worker_processes as test_order_through_orm,
)
from tests.test_order import workers  # noqa: F401 - the fixture the ordering test takes
from worker.client import UpdateClient
from worker.db import orm
from worker.db.executor import Executor
from worker.db.groups import groupable
from worker.db.ledger import ensure_ledger
from worker.db.schema import Schema, build_schema, through_orm
from worker.errors import SettingsError
from worker.job.compiler import compile_job
from worker.job.models import Job, parse_entry
from worker.job.plans import Plan
from worker.job.replies import Reply
from worker.settings import load_settings

MODELS = "tests.model_rules:Base"
__all__ = ["test_order_through_orm"]  # tests/test_order.py's, every job through the unit of work


@pytest.fixture
def worker_settings() -> dict[str, str]:
    return {"WORKER_MODELS": "tests.model_series:Base", "WORKER_ORM": "always"}


members_table: sa.Table = Member.__table__  # type: ignore[assignment]
plains_table: sa.Table = Plain.__table__  # type: ignore[assignment]


@pytest.fixture
async def members(engine: AsyncEngine) -> AsyncEngine:
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
        await connection.execute(members_table.insert(), [
            {"id": n, "name": f"m{n}", "age": 20 + n, "version": 1} for n in (1, 2, 3)
        ])  # fmt: skip
        await connection.execute(plains_table.insert(), [{"id": 1, "n": 0}])
    return engine


@pytest.fixture
async def client(
    members: AsyncEngine, start_worker: WorkerFactory, prefix: str, redis_url: str,
    request: pytest.FixtureRequest,
) -> AsyncIterator[UpdateClient]:  # fmt: skip
    del members
    mode = getattr(request, "param", "auto")
    await start_worker(models=MODELS, orm=mode)
    async with UpdateClient(redis_url, prefix=prefix) as made:
        yield made


async def row(engine: AsyncEngine, member: int) -> Any:
    async with engine.connect() as connection:
        query = sa.select(members_table).where(members_table.c.id == member)
        return (await connection.execute(query)).one()


async def audited(engine: AsyncEngine) -> list[tuple[int, int]]:
    async with engine.connect() as connection:
        query = sa.select(audit.c.member_id, audit.c.version).order_by(audit.c.id)
        return [tuple(found) for found in (await connection.execute(query)).all()]


def test_worker_orm_other_than_auto_needs_models() -> None:
    with pytest.raises(SettingsError, match="WORKER_ORM: 'always' needs WORKER_MODELS"):
        load_settings({"WORKER_ORM": "always"})
    assert load_settings({"WORKER_ORM": "never", "WORKER_MODELS": MODELS}).orm == "never"


def test_auto_routes_only_the_classes_with_rules() -> None:
    mappers = [Member.__mapper__, Plain.__mapper__]
    assert orm.routed(mappers, "auto") == {"members": Member}
    assert orm.routed(mappers, "always") == {"members": Member, "plains": Plain}
    assert orm.routed(mappers, "never") == {}


async def test_a_key_job_runs_the_validator_the_events_and_the_version_counter(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    reply = await client.update("members", key={"id": 1}, set={"name": "John Doe", "age": 30,
                                "tags": ["B", "a"]}, returning=["version", "touched_by"])  # fmt: skip
    assert (reply.status, reply.rowcount) == ("ok", 1), reply.error
    assert reply.returning == [{"version": 2, "touched_by": TOUCHED_BY}]
    again = await client.update("members", key={"id": 1}, inc={"age": 1})
    assert again.status == "ok", again.error
    found = await row(engine, 1)
    assert (found.name, found.age, found.version, found.touched_by) == ("John Doe", 31, 3,
                                                                        TOUCHED_BY)  # fmt: skip
    assert found.tags == ["a", "b"]  # the TypeDecorator: sorted, lower-cased
    assert str(found.updated_at).startswith(str(FIXED_NOW))  # the onupdate= default
    assert await audited(engine) == [(1, 2), (1, 3)]  # after_update, once per applied job
    replayed = await client.update("members", key={"id": 1}, inc={"age": 1}, id=again.id)
    assert replayed.replayed  # from the ledger: no validator, no event, no new version
    assert (await row(engine, 1)).version == 3
    assert len(await audited(engine)) == 2


async def test_a_refused_value_is_a_recorded_data_error_and_the_row_stays(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    refused = await client.update("members", key={"id": 2}, set={"age": -5, "name": "x"},
                                  id="negative")  # fmt: skip
    assert refused.error is not None
    assert refused.error.code == "data_error"
    assert "age must not be negative" in refused.error.message
    found = await row(engine, 2)
    assert (found.age, found.name, found.version, found.touched_by) == (22, "m2", 1, None)
    replayed = await client.update("members", key={"id": 2}, set={"age": -5, "name": "x"},
                                   id="negative")  # fmt: skip
    assert replayed.replayed
    assert replayed.error is not None
    assert replayed.error.code == "data_error"
    assert await audited(engine) == []
    below = await client.update("members", key={"id": 2}, inc={"age": -100})
    assert below.error is not None  # `inc` adds to the locked row's value: the validator sees it
    assert below.error.code == "data_error"
    assert (await row(engine, 2)).age == 22


async def test_where_jobs_batches_and_caps_go_through_the_unit_of_work(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    adults = await client.update("members", where={"age": {"gte": 22}}, set={"name": "grown"},
                                 returning=["id"])  # fmt: skip
    assert (adults.status, adults.rowcount) == ("ok", 2), adults.error
    assert sorted(found["id"] for found in adults.returning or []) == [2, 3]
    assert [(await row(engine, n)).touched_by for n in (1, 2, 3)] == [None, TOUCHED_BY, TOUCHED_BY]
    together = await client.submit({"id": "both", "updates": [
        {"table": "members", "key": {"id": 2}, "inc": {"age": 1}},
        {"table": "members", "key": {"id": 3}, "inc": {"age": 1}},
    ]})  # fmt: skip
    assert (await client.result(together, timeout=20)).rowcount == 2
    refused = await client.update("members", where={"age": {"gte": 0}}, set={"age": -1})
    assert refused.error is not None  # the validator, on every loaded row of a `where` job
    assert refused.error.code == "data_error"
    capped = await client.update("members", all=True, set={"name": "all"}, expect={"max_rows": 2})
    assert capped.error is not None
    assert capped.error.code == "expectation_failed"
    job_id = await client.submit({"updates": [
        {"table": "members", "key": {"id": 1}, "set": {"name": "first"}},
        {"table": "members", "key": {"id": 2}, "set": {"age": -1}},
    ]})  # fmt: skip
    batch: Reply = await client.result(job_id, timeout=20)
    assert batch.error is not None
    assert batch.error.code == "data_error"
    dry = await client.update("members", key={"id": 1}, set={"name": "dry"}, dry_run=True)
    assert (dry.status, dry.rowcount, dry.dry_run) == ("ok", 1, True)
    assert [(await row(engine, n)).name for n in (1, 2, 3)] == ["m1", "grown", "grown"]
    assert [(await row(engine, n)).version for n in (1, 2, 3)] == [1, 3, 3]  # where, then batch
    assert sorted(await audited(engine)) == [(2, 2), (2, 3), (3, 2), (3, 3)]


@pytest.fixture
def stale_once() -> Iterator[list[int]]:
    """Another writer bumps a member's version between the job's load and its flush, once."""
    bumped: list[int] = []

    def bump(_mapper: Any, connection: sa.Connection, target: Member) -> None:
        if not bumped:
            bumped.append(target.id)
            table = members_table
            connection.execute(
                sa.update(table).where(table.c.id == target.id).values(version=table.c.version + 1)
            )

    event.listen(Member, "before_update", bump)
    yield bumped
    event.remove(Member, "before_update", bump)


async def test_a_concurrent_version_bump_makes_the_job_run_again_and_succeed(
    client: UpdateClient, engine: AsyncEngine, stale_once: list[int]
) -> None:
    reply = await client.update("members", key={"id": 3}, set={"name": "retried"})
    assert reply.status == "ok", reply.error
    assert reply.attempts == 2
    assert stale_once == [3]
    found = await row(engine, 3)
    assert (found.name, found.version) == ("retried", 2)  # the stale try rolled back


@pytest.mark.parametrize("client", ["never"], indirect=True)
async def test_never_is_the_core_path_which_bypasses_the_models_rules(
    client: UpdateClient, engine: AsyncEngine
) -> None:
    reply = await client.update("members", key={"id": 1}, set={"age": -5})
    assert reply.status == "ok"  # the validator never ran
    found = await row(engine, 1)
    assert (found.age, found.touched_by, found.version) == (-5, None, 1)  # nor events, counter
    assert str(found.updated_at).startswith(str(FIXED_NOW))  # onupdate= is Core's: it applies
    assert await audited(engine) == []


async def test_a_group_loads_its_rows_in_one_select_and_counts_every_job(
    members: AsyncEngine,
) -> None:
    """Group commits on this path: one SELECT ... IN for the group's rows; two jobs on one
    row (different producer-given order keys) are flushed apart, so the version counter and
    the after_update event count both."""
    engine = members
    async with engine.begin() as connection:
        await ensure_ledger(connection)
    schema = through_orm(build_schema(Base.metadata),
                         orm.routed([Member.__mapper__, Plain.__mapper__], "auto"))  # fmt: skip
    documents = [
        {"id": "g1", "table": "members", "key": {"id": 1}, "set": {"name": "one"}},
        {"id": "g2", "table": "members", "key": {"id": 2}, "inc": {"age": 1},
         "returning": ["age"]},
        {"id": "g3", "table": "members", "key": {"id": 3}, "set": {"name": "three"},
         "order_key": "a"},
        {"id": "g4", "table": "members", "key": {"id": 3}, "set": {"name": "three again"},
         "order_key": "b"},
        {"id": "g5", "table": "members", "key": {"id": 99}, "set": {"name": "nobody"}},
    ]  # fmt: skip
    jobs = [_compiled(schema, document) for document in documents]
    assert all(groupable(*job) for job in jobs)
    selects: list[str] = []

    def seen(*args: Any) -> None:
        statement = str(args[2])
        if statement.lstrip().upper().startswith("SELECT") and "FROM members" in statement:
            selects.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        replies = await Executor(engine, worker="w").execute_group(jobs)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
    assert [(reply.status, reply.rowcount) for reply in replies if reply] == [
        ("ok", 1), ("ok", 1), ("ok", 1), ("ok", 1), ("ok", 0)]  # fmt: skip
    assert replies[1] is not None
    assert replies[1].returning == [{"age": 23}]
    loads = [statement for statement in selects if "members.version" in statement]
    assert len(loads) == 1, selects  # the group's rows, in one load (a refresh reads `age`)
    assert " IN (" in loads[0]
    assert [(await row(engine, n)).version for n in (1, 2, 3)] == [2, 2, 3]
    assert (await row(engine, 3)).name == "three again"
    assert sorted(await audited(engine)) == [(1, 2), (2, 2), (3, 2), (3, 3)]


def _compiled(schema: Schema, document: dict[str, Any]) -> tuple[Job, Plan]:
    parsed = parse_entry({b"job": json.dumps(document).encode()}, entry_id="1-0",
                         max_job_bytes=65536)  # fmt: skip
    assert isinstance(parsed, Job), parsed
    return parsed, compile_job(parsed, schema)
