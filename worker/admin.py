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
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

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
