"""What the README promises, checked as a reader would try it: its Python client example runs
as written, `rowcount` with `returning`, and tables in other PostgreSQL schemas."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import REDIS_URL, WorkerFactory
from tests.model_other_schema import Base as OtherSchemaBase
from tests.test_cli import ROOT
from worker.client import UpdateClient


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


async def test_the_python_client_example_runs_as_written(
    start_worker: WorkerFactory, prefix: str
) -> None:
    """It used `async with` at the top level (no asyncio.run) and no `prefix=`."""
    example = next(block for block in python_blocks() if "UpdateClient" in block)
    assert "asyncio.run(main())" in example
    assert 'prefix="updates"' in example
    # The only changes: this test's Redis and prefix instead of the defaults.
    source = example.replace('"redis://localhost:6379/0"', repr(REDIS_URL)).replace(
        'prefix="updates"', f"prefix={prefix!r}"
    )
    await start_worker()
    code = compile(source.replace("asyncio.run(main())", ""), "README.md", "exec")
    namespace: dict[str, object] = {}
    exec(code, namespace)  # noqa: S102 - the README's own example, run as a reader would
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        await namespace["main"]()  # type: ignore[operator]
    assert printed.getvalue().startswith("ok 3\n"), printed.getvalue()


async def test_rowcount_with_returning_counts_every_matched_row(
    start_worker: WorkerFactory, prefix: str
) -> None:
    await start_worker(max_returning=1)
    async with UpdateClient(REDIS_URL, prefix=prefix) as client:
        reply = await client.update("books", set={"genre": "sci-fi"}, where={"genre": "fiction"},
                                    returning=["book_id"])  # fmt: skip
    assert reply.rowcount == 3
    assert reply.returning is not None
    assert len(reply.returning) == 1


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # SQLite has no schemas
async def test_a_table_in_another_schema_works_with_models_not_with_reflection(
    engine: AsyncEngine, start_worker: WorkerFactory, prefix: str
) -> None:
    async with other_schema(engine):
        await start_worker(consumer="models", models="tests.model_other_schema:Base")
        async with UpdateClient(REDIS_URL, prefix=prefix) as client:
            reply = await client.update("other.things", key={"id": 1}, set={"label": "new"})
        assert (reply.status, reply.rowcount) == ("ok", 1)
        async with engine.connect() as connection:
            assert await connection.scalar(sa.text("SELECT label FROM other.things")) == "new"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_reflection_reads_the_default_schema_only(
    engine: AsyncEngine, start_worker: WorkerFactory, prefix: str
) -> None:
    async with other_schema(engine):
        await start_worker(consumer="reflected")
        async with UpdateClient(REDIS_URL, prefix=prefix) as client:
            reply = await client.update("other.things", key={"id": 1}, set={"label": "new"})
        assert reply.error is not None
        assert reply.error.code == "unknown_table"


@contextlib.asynccontextmanager
async def other_schema(engine: AsyncEngine) -> AsyncIterator[None]:
    """The schema ``other`` with the models' table and its one row, dropped afterwards."""
    async with engine.begin() as connection:
        await connection.execute(sa.text("DROP SCHEMA IF EXISTS other CASCADE"))
        await connection.execute(sa.text("CREATE SCHEMA other"))
        await connection.run_sync(OtherSchemaBase.metadata.create_all)
        await connection.execute(sa.text("INSERT INTO other.things VALUES (1, 'old')"))
    try:
        yield
    finally:
        async with engine.begin() as connection:
            await connection.execute(sa.text("DROP SCHEMA other CASCADE"))
