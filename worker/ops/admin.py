"""What an operator asks of a deployment: is it in order (``check``, ``/readyz``), and its
backlog (the gauges); ``stats`` is worker/ops/snapshot.py. Read-only: nothing here changes Redis or
the database.

Every problem is one line that starts with the component it is about (``redis:``,
``database:``, ``group:``, ``ledger:``), with any password masked.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.db.ledger import LEDGER_TABLE, ledger
from worker.errors import classify
from worker.ops.logs import mask_secrets
from worker.stream import deployment
from worker.stream.client import AnyRedis
from worker.stream.names import Names, text

#: How a TLS server answers a plaintext client: it drops the connection.
_DROPPED = re.compile(r"reset by peer|closed by server|Connection closed|EOF", re.IGNORECASE)


async def reachability(redis: AnyRedis, engine: AsyncEngine, *, deadline_s: float) -> list[str]:
    """Redis answers PING and the database ``SELECT 1``, each within ``deadline_s``."""

    async def database() -> None:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT 1"))

    results = await asyncio.gather(
        _problem("redis", redis.ping, deadline_s),
        _problem("database", database, deadline_s),
    )
    plaintext = not issubclass(_connection_class(redis), SSLConnection)
    return [
        f"{problem} (a TLS port? use rediss://)"
        if plaintext and problem.startswith("redis:") and _DROPPED.search(problem)
        else problem
        for problem in results
        if problem is not None
    ]


def _connection_class(redis: AnyRedis) -> type:
    if isinstance(redis, RedisCluster):
        found: type = redis.connection_kwargs.get("connection_class", Connection)
        return found
    return redis.connection_pool.connection_class


async def setup(
    redis: AnyRedis,
    engine: AsyncEngine,
    names: Names,
    group: str,
    *,
    partitions: int,
    deadline_s: float,
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
            problems.extend(await deployment_problems(redis, names, partitions))
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


async def deployment_problems(redis: AnyRedis, names: Names, partitions: int) -> list[str]:
    """Live workers on the prefix that would answer the same job differently; a partition
    count other than the recorded one; partitions no live worker owns."""
    try:
        every = await deployment.records(redis, names)
        recorded = await deployment.recorded_partitions(redis, names)
        owners = [await redis.get(names.owner(number)) for number in range(recorded or 0)]
    except RedisError as error:
        return [f"deployment: {mask_secrets(classify(error).message)}"]
    live = [record for record in every if record.live]
    problems = []
    if recorded is not None and recorded != partitions:
        problems.append(f"partitions: this deployment has {recorded}, WORKER_PARTITIONS says "
                        f"{partitions} (a worker would refuse to start)")  # fmt: skip
    alive = {record.consumer for record in live}
    if orphaned := [number for number, owner in enumerate(owners)
                    if owner is None or text(owner) not in alive]:  # fmt: skip
        problems.append(f"partitions: {', '.join(map(str, orphaned))} have no live owner "
                        "(their jobs wait until a worker takes them)")  # fmt: skip
    if len({record.fingerprint for record in live}) > 1:
        note = f"(prefix {names.prefix!r}: one prefix, one schema and settings)"
        problems += [f"deployment: {line} {note}"
                     for line in deployment.mismatches(live[0], live[1:])]  # fmt: skip
    return problems


async def local_readiness(port: int, *, deadline_s: float) -> str | None:
    """The ``/readyz`` of the worker on this host's ``port``: None when it answers 200.

    What a container's healthcheck asks: whether *its own* worker is up, not whether some
    worker created the group."""

    def ask() -> str | None:
        url = f"http://127.0.0.1:{port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=deadline_s):
                return None
        except urllib.error.HTTPError as error:
            body = error.read().decode("utf-8", errors="replace").strip()
            return f"worker: /readyz on :{port} answered {error.code} {error.reason}: {body}"
        except (OSError, TimeoutError) as error:
            reason = getattr(error, "reason", None) or error or "no answer"
            return f"worker: no worker answers /readyz on :{port} ({reason})"

    return await asyncio.to_thread(ask)


async def backlog(
    redis: AnyRedis, names: Names, group: str, partitions: int
) -> tuple[int, int, int]:
    """Entries in the ingest and partition streams (unread plus pending), the group's pending
    count over them, and the ingest's own length (entries not yet moved)."""
    streams = [names.stream, *map(names.partition, range(partitions))]
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xpending(stream, group)
        found = await pipe.execute(raise_on_error=False)
    lengths, pendings = found[::2], found[1::2]
    length = sum(int(value) for value in lengths if not isinstance(value, Exception))
    pending = sum(int(value["pending"]) for value in pendings if isinstance(value, dict))
    ingest = lengths[0] if not isinstance(lengths[0], Exception) else 0
    return length, pending, int(ingest)


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
