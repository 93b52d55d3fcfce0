"""What an operator asks of a deployment: is it in order (``check``, ``/readyz``), and how is
it doing (``stats``, the backlog gauges). Read-only: nothing here changes Redis or the database.

Every problem is one line that starts with the component it is about (``redis:``,
``database:``, ``group:``, ``ledger:``), with any password masked.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker import deployment
from worker.errors import classify
from worker.ledger import LEDGER_TABLE, ledger
from worker.logs import mask_secrets
from worker.streams import Names, entry_ms, text

#: How a TLS server answers a plaintext client: it drops the connection.
_DROPPED = re.compile(r"reset by peer|closed by server|Connection closed|EOF", re.IGNORECASE)


async def reachability(redis: Redis, engine: AsyncEngine, *, deadline_s: float) -> list[str]:
    """Redis answers PING and the database ``SELECT 1``, each within ``deadline_s``."""

    async def database() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    results = await asyncio.gather(
        _problem("redis", redis.ping, deadline_s),
        _problem("database", database, deadline_s),
    )
    plaintext = not issubclass(redis.connection_pool.connection_class, SSLConnection)
    return [
        f"{problem} (a TLS port? use rediss://)"
        if plaintext and problem.startswith("redis:") and _DROPPED.search(problem)
        else problem
        for problem in results
        if problem is not None
    ]


async def setup(
    redis: Redis, engine: AsyncEngine, names: Names, group: str, *, deadline_s: float
) -> list[str]:
    """Reachability, then what a worker needs in place: its consumer group and the ledger."""
    problems = await reachability(redis, engine, deadline_s=deadline_s)
    if not any(problem.startswith("redis:") for problem in problems):
        try:  # XPENDING, not XINFO: the worker's minimal ACL allows it (README, Security)
            await redis.xpending(names.stream, group)
        except ResponseError as error:
            if "NOGROUP" in str(error):
                problems.append(
                    f"group: consumer group {group!r} on stream {names.stream!r} is missing "
                    "(a worker creates it when it starts)"
                )
            else:
                problems.append(f"group: {mask_secrets(str(error))}")
        else:  # with a group there may be workers: do they agree?
            problems.extend(await deployment_problems(redis, names))
    if not any(problem.startswith("database:") for problem in problems):

        async def ledger_ready() -> None:
            async with engine.connect() as connection:
                await connection.execute(sa.select(ledger.c.job_id).limit(1))

        if problem := await _problem("ledger", ledger_ready, deadline_s):
            problems.append(
                f"{problem} (table {LEDGER_TABLE} missing or unreadable; "
                "a worker creates it when it starts)"
            )
    return problems


async def deployment_problems(redis: Redis, names: Names) -> list[str]:
    """Live workers on the prefix that would answer the same job differently."""
    try:
        every = await deployment.records(redis, names)
    except RedisError as error:
        return [f"deployment: {mask_secrets(classify(error).message)}"]
    live = [record for record in every if record.live]
    if len({record.fingerprint for record in live}) <= 1:
        return []
    return [f"deployment: {line} (prefix {names.prefix!r}: one prefix, one schema and settings)"
            for line in deployment.mismatches(live[0], live[1:])]  # fmt: skip


async def local_readiness(port: int, *, deadline_s: float) -> str | None:
    """The ``/readyz`` of the worker on this host's ``port``: None when it answers 200.

    What a container's healthcheck asks: whether *its own* worker is up, not whether some
    worker created the group."""

    async def ask() -> str | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            response = (await reader.read()).decode("utf-8", errors="replace")
        finally:
            writer.close()
        status, _, body = response.partition("\r\n\r\n")
        if status.split(" ")[1:2] == ["200"]:
            return None
        return f"worker: /readyz on :{port} answered {status.splitlines()[0]}: {body.strip()}"

    try:
        return await asyncio.wait_for(ask(), deadline_s)
    except (OSError, TimeoutError) as error:
        return f"worker: no worker answers /readyz on :{port} ({error or 'no answer'})"


async def backlog(redis: Redis, names: Names, group: str) -> tuple[int, int]:
    """The stream's length (unread plus pending) and the group's pending count."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xlen(names.stream)
        pipe.xpending(names.stream, group)
        try:
            length, pending = await pipe.execute()
        except ResponseError:
            return 0, 0  # no stream or group yet
    return int(length), int(pending["pending"])


@dataclass(frozen=True, slots=True)
class Consumer:
    name: str
    pending: int
    idle_s: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One look at a deployment, for ``update-worker stats``."""

    taken: float
    stream_length: int
    pending: int
    #: Entries the group has read minus those pending: the answered ones, ever.
    answered: int
    oldest_pending_age_s: float | None
    dead_letters: int
    consumers: list[Consumer] = field(default_factory=list)
    #: Consumers whose worker is running: its deployment record is fresh.
    alive: frozenset[str] = frozenset()

    def rate(self, earlier: Snapshot) -> float:
        """Jobs answered per second since ``earlier``."""
        elapsed = self.taken - earlier.taken
        return max(0, self.answered - earlier.answered) / elapsed if elapsed > 0 else 0.0


async def snapshot(redis: Redis, names: Names, group: str) -> Snapshot:
    try:
        groups = await redis.xinfo_groups(names.stream)
    except ResponseError:
        groups = []
    info: dict[str, Any] = next((g for g in groups if text(g.get("name")) == group), {})
    consumers, oldest = [], None
    if info:
        for entry in await redis.xinfo_consumers(names.stream, group):
            consumers.append(Consumer(text(entry["name"]), int(entry["pending"]),
                                      int(entry["idle"]) / 1000))  # fmt: skip
        summary = await redis.xpending(names.stream, group)
        if summary["pending"]:
            oldest = max(0.0, time.time() - entry_ms(text(summary["min"])) / 1000)
    length = await redis.xlen(names.stream)
    pending = int(info.get("pending", 0))
    return Snapshot(
        taken=time.monotonic(),
        stream_length=int(length),
        pending=pending,
        answered=int(info.get("entries-read") or 0) - pending,
        oldest_pending_age_s=oldest,
        dead_letters=int(await redis.xlen(names.dead)),
        consumers=sorted(consumers, key=lambda consumer: consumer.name),
        alive=frozenset(
            record.consumer for record in await deployment.records(redis, names) if record.live
        ),
    )


async def _problem(
    component: str, check: Callable[[], Awaitable[Any]], deadline_s: float
) -> str | None:
    try:
        await asyncio.wait_for(check(), deadline_s)
    except TimeoutError:
        return f"{component}: no answer within {deadline_s} s"
    except Exception as error:  # noqa: BLE001 - every failure is a reason to report
        message = mask_secrets(classify(error).message)
        return message if message.startswith(f"{component}:") else f"{component}: {message}"
    return None
