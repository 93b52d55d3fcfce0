"""``update-worker demo``: the two seed tutorials end to end (DESIGN.md §8).

A fresh SQLite file with the seed ``users`` and ``books`` tables, the two UPDATE styles sent as
jobs through Redis, a worker in burst mode, and the replies printed. The worker uses the
tutorials' models (worker/demo_models.py): the ORM-style job runs through the unit of work,
the Core-style one as an UPDATE. The seed tables and rows here are also what the tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from worker.client import UpdateClient
from worker.job.values import to_json
from worker.service.startup import open_worker
from worker.settings import Settings, mask_url

seed_metadata = sa.MetaData()
users = sa.Table(
    "users",
    seed_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(100)),
    sa.Column("age", sa.Integer),
)
books = sa.Table(
    "books",
    seed_metadata,
    sa.Column("book_id", sa.Integer, primary_key=True),
    sa.Column("book_price", sa.Numeric),
    sa.Column("genre", sa.String(50)),
    sa.Column("book_name", sa.String(100)),
)
#: The tutorials' models: users through the unit of work (a validator), books through Core.
DEMO_MODELS: Final = "worker.demo_models:Base"
SEED_USERS: Final = [{"id": 1, "name": "Jane Roe", "age": 25}]
SEED_BOOKS: Final = [
    {"book_id": 1, "book_price": Decimal("12.2"), "genre": "fiction", "book_name": "Old age"},
    {
        "book_id": 2,
        "book_price": Decimal("13.2"),
        "genre": "non-fiction",
        "book_name": "Saturn rings",
    },
    {"book_id": 3, "book_price": Decimal("121.6"), "genre": "fiction", "book_name": "Supernova"},
    {
        "book_id": 4,
        "book_price": Decimal("100"),
        "genre": "non-fiction",
        "book_name": "History of the world",
    },
    {"book_id": 5, "book_price": Decimal("1112.2"), "genre": "fiction", "book_name": "Sun city"},
]
DEMO_JOBS: Final = [
    (
        "ORM style: load user 1, set name='John Doe' and age=30, commit "
        "(through the unit of work: the User model's validator applies)",
        {
            "id": "demo-user-1",
            "table": "users",
            "key": {"id": 1},
            "set": {"name": "John Doe", "age": 30},
        },
        1,
    ),
    (
        "Core style: update(books).values(genre='sci-fi').where(books.c.genre == 'fiction')",
        {
            "id": "demo-fiction-to-sci-fi",
            "table": "books",
            "set": {"genre": "sci-fi"},
            "where": {"genre": "fiction"},
            "returning": ["book_id"],
        },
        3,
    ),
    (
        "The model's rule holds: age=-1 is refused by User's validator, and the row stays",
        {"id": "demo-user-negative", "table": "users", "key": {"id": 1}, "set": {"age": -1}},
        0,
    ),
]
#: What each demo job must answer: its status, or its error code.
DEMO_ANSWERS: Final = ("ok", "ok", "data_error")


async def seed(connection: AsyncConnection) -> None:
    """(Re)create the seed tables with the tutorials' rows."""
    await connection.run_sync(seed_metadata.drop_all)
    await connection.run_sync(seed_metadata.create_all)
    await connection.execute(users.insert(), SEED_USERS)
    await connection.execute(books.insert(), SEED_BOOKS)


async def run_demo(settings: Settings) -> int:
    with tempfile.TemporaryDirectory(prefix="update-worker-demo-") as directory:
        database_url = f"sqlite+aiosqlite:///{Path(directory) / 'demo.db'}"
        engine = create_async_engine(database_url)
        async with engine.begin() as connection:
            await seed(connection)
        async with _redis_for_demo(settings.redis_url) as redis_url:
            prefix = f"updates-demo-{uuid.uuid4().hex[:8]}"
            print(f"database: SQLite at {directory}/demo.db (users: 1 row, books: 5 rows)")
            print(f"redis:    {mask_url(redis_url)}, names under {prefix}:*")
            print(f"models:   {DEMO_MODELS} (WORKER_ORM=auto)\n")
            demo = settings.model_copy(
                update={"database_url": database_url, "redis_url": redis_url, "prefix": prefix,
                        "models": DEMO_MODELS, "orm": "auto"}
            )  # fmt: skip
            ok = await _send_and_serve(demo)
            async with engine.connect() as connection:
                print("after:")
                for table in (users, books):
                    for row in await connection.execute(
                        sa.select(table).order_by(*table.primary_key)
                    ):
                        print(f"  {table.name}: {json.dumps(to_json(dict(row._mapping)))}")
        await engine.dispose()
    return 0 if ok else 1


async def _send_and_serve(settings: Settings) -> bool:
    ok = True
    async with UpdateClient(settings.redis_url, prefix=settings.prefix) as client:
        ids = [await client.submit(job) for _, job, _ in DEMO_JOBS]
        async with open_worker(settings) as worker:
            await worker.run(burst=True)
        for (title, job, expected_rows), answer, job_id in zip(DEMO_JOBS, DEMO_ANSWERS, ids,
                                                                strict=True):  # fmt: skip
            reply = await client.result(job_id, timeout=10)
            print(title)
            print(f"  job:   {json.dumps(job)}")
            print(f"  reply: {reply.model_dump_json(exclude_none=True)}")
            print(f"  rowcount {reply.rowcount} (expected {expected_rows})\n")
            got = reply.status if reply.error is None else reply.error.code
            ok = ok and got == answer and reply.rowcount == expected_rows
    # The demo's Redis names are its own: leave nothing behind.
    names = [
        client.names.stream,
        client.names.dead,
        *(client.names.result(job_id) for job_id in ids),
    ]
    redis = Redis.from_url(settings.redis_url)
    await redis.delete(*names)
    await redis.aclose()
    return ok


@contextlib.asynccontextmanager
async def _redis_for_demo(url: str) -> AsyncIterator[str]:
    """``url`` when Redis answers there; otherwise a throwaway redis-server on a free port."""
    probe = Redis.from_url(url, socket_connect_timeout=1)
    try:
        await probe.ping()
    except (RedisError, OSError):
        pass
    else:
        yield url
        return
    finally:
        await probe.aclose()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit(
            f"update-worker demo: no Redis at {mask_url(url)} and no redis-server to start"
        )
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        *(server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
    )
    local = f"redis://127.0.0.1:{port}/0"
    try:
        await _wait_for_redis(local)
        print(f"(no Redis at {mask_url(url)}: started redis-server on port {port} for the demo)")
        yield local
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def _wait_for_redis(url: str) -> None:
    redis = Redis.from_url(url)
    try:
        for _ in range(100):
            with contextlib.suppress(RedisError, OSError):
                await redis.ping()
                return
            await asyncio.sleep(0.05)
        raise SystemExit("update-worker demo: redis-server did not start")
    finally:
        await redis.aclose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
