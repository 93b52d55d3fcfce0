"""A worker running as the README's least-privilege PostgreSQL role: the GRANTs are read out of
the README, so the documentation is what is tested."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from tests.test_cli import ROOT
from worker.client import UpdateClient
from worker.db.fencing import ensure_partitions
from worker.db.ledger import ensure_ledger

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # roles are PG's


def readme_grants(role: str) -> list[str]:
    """The statements of the README's least-privilege block, for ``role``."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### PostgreSQL: a least-privilege role\n\n```sql\n(.*?)```", readme, re.S)
    assert block, "the README's least-privilege block is missing"
    lines = [line for line in block[1].splitlines() if line and not line.startswith("--")]
    return [statement.replace("update_worker", role, 1) if statement.startswith("CREATE ROLE")
            else statement.replace("TO update_worker", f"TO {role}")
            for statement in " ".join(lines).split(";") if statement.strip()]  # fmt: skip


@pytest.fixture
async def role_url(engine: AsyncEngine, database_url: str) -> AsyncIterator[str]:
    role = f"uw_{uuid.uuid4().hex[:8]}"
    async with engine.begin() as connection:
        await ensure_ledger(connection)  # created by their owner, as the README says
        await ensure_partitions(connection, 16)
        for statement in readme_grants(role):
            await connection.execute(sa.text(statement))
    yield (
        make_url(database_url)
        .set(username=role, password="change-me")  # noqa: S106 - the README's placeholder
        .render_as_string(hide_password=False)
    )
    async with engine.begin() as connection:
        await connection.execute(sa.text(f"DROP OWNED BY {role}"))
        await connection.execute(sa.text(f"DROP ROLE {role}"))


async def test_a_least_privilege_worker_refuses_other_tables_itself(
    start_worker: WorkerFactory, role_url: str, engine: AsyncEngine, prefix: str
) -> None:
    worker = await start_worker(database_url=role_url)
    assert sorted(worker.schema.tables) == ["books", "users"]  # what the role may UPDATE
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        allowed = await client.update("books", set={"genre": "x"}, where={"genre": "fiction"})
        keyed = await client.update("users", inc={"age": 1}, key={"id": 1})
        other = await client.update("items", set={"qty": 0}, key={"id": 1})
        ledger = await client.update("update_worker_ledger", set={"reply": "{}"}, all=True)
    assert (allowed.status, allowed.rowcount, keyed.rowcount) == ("ok", 3, 1)
    for refused in (other, ledger):
        assert refused.error is not None
        assert (refused.error.code, refused.error.retryable) == ("unknown_table", False)
    async with engine.connect() as connection:
        assert (
            await connection.execute(sa.text("SELECT qty FROM items WHERE id = 1"))
        ).scalar() == 10
        ledger_rows = (
            await connection.execute(sa.text("SELECT count(*) FROM update_worker_ledger"))
        ).scalar()
    # The two applied jobs are recorded (the role's INSERT on the ledger works); the two
    # refusals are this worker's schema speaking, so they are replied but not recorded.
    assert ledger_rows == 2
