"""Start-up and shutdown: connect, load the schema, build a :class:`Worker`, serve the metrics
endpoints when asked, and run until a signal (DESIGN.md §8: ``update-worker run``)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import signal
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

from worker.db import fencing, ledger, orm
from worker.db.engine import WRITES, Timeouts, create_engine
from worker.db.executor import Executor
from worker.db.ledger import ensure_ledger
from worker.db.schema import (
    Schema,
    build_schema,
    load_mappers,
    load_models,
    reflect_schema,
    through_orm,
)
from worker.durations import parse_duration
from worker.errors import SettingsError, classify
from worker.ops import admin
from worker.ops.health import Probes, serve_http
from worker.ops.metrics import Metrics
from worker.ops.serving import Served
from worker.service import heap
from worker.service.answers import Answers
from worker.service.loop import Worker
from worker.service.ownership import Ownership
from worker.service.recovery import Recovery
from worker.service.units import Pace
from worker.settings import Settings, mask_url
from worker.stream import deployment
from worker.stream.mover import Mover
from worker.stream.names import Names
from worker.stream.owners import Leases
from worker.stream.reading import Reader
from worker.stream.transport import Transport

log = logging.getLogger(__name__)

_PRUNE_EVERY_S = 3600.0
_CLOSE_WAIT_S = 10.0


@contextlib.asynccontextmanager
async def open_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Connect to the database and Redis, load the schema, and yield a ready Worker."""
    timeouts = Timeouts(
        statement_ms=settings.statement_timeout_ms,
        lock_ms=settings.lock_timeout_ms,
        idle_in_transaction_ms=settings.idle_in_transaction_timeout_ms,
    )
    engine = create_engine(settings.database_url, pool_size=settings.concurrency, timeouts=timeouts)
    metrics = Metrics()
    transport = Transport(
        await settings.redis(block_ms=settings.block_ms),
        Names(settings.prefix),
        group=settings.group,
        consumer=settings.consumer,
        result_ttl=settings.result_ttl,
        write_attempts=settings.max_attempts,
        metrics=metrics,
    )
    endpoints: Served | None = None
    helpers: list[asyncio.Task[None]] = []
    stopping = asyncio.Event()  # ends the helpers' loops; cancelling alone may not (below)
    served = False
    try:
        # BEGIN IMMEDIATE on SQLite: workers starting together on a fresh file queue for the
        # write lock. A deferred transaction that read the schema and then creates the table
        # fails at once (a stale snapshot) when another worker created it meanwhile.
        async with engine.execution_options(**{WRITES: True}).begin() as connection:
            await ensure_ledger(connection)
        narrowing = {
            "tables": settings.tables,
            "readonly_columns": settings.readonly_columns,
            "writable_keys": settings.writable_keys,
        }
        if settings.models:
            schema = build_schema(load_models(settings.models), **narrowing)
            schema = through_orm(schema, orm.routed(load_mappers(settings.models), settings.orm))
        else:
            schema = await reflect_schema(engine, **narrowing)
        await _record_partitions(transport, settings.partitions)
        # It writes: BEGIN IMMEDIATE on SQLite, so workers starting together queue, not fail.
        async with engine.execution_options(**{WRITES: True}).begin() as connection:
            await fencing.ensure_partitions(connection, settings.partitions)
        await transport.ensure_groups(settings.partitions)
        executor = Executor(
            engine,
            worker=settings.consumer,
            max_attempts=settings.max_attempts,
            max_returning=settings.max_returning,
            metrics=metrics,
        )
        log.info(
            "worker %s ready: %d table(s), database %s, redis %s, stream %s, %d partitions, "
            "event loop %s",
            settings.consumer,
            len(schema.tables),
            mask_url(settings.database_url),
            mask_url(settings.redis_url),
            transport.names.stream,
            settings.partitions,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        recovery = Recovery(transport=transport, executor=executor, worker=settings.consumer)
        if settings.metrics_port is not None:
            endpoints = await serve_http(
                settings.metrics_port, metrics, _probes(settings, engine, transport)
            )
            log.info("metrics on :%d (/metrics, /healthz, /readyz)", settings.metrics_port)
        retention = parse_duration(settings.ledger_retention)
        if retention:
            helpers.append(asyncio.create_task(_prune_ledger(engine, retention, stopping),
                                               name="ledger prune"))  # fmt: skip
        worker = _wire(settings, engine, transport, executor, schema, recovery, metrics)
        offered = deployment.offer(schema, worker.policy, max_job_bytes=settings.max_job_bytes)
        await _compare(transport, settings.consumer, offered)
        beating = _heartbeat(transport, settings.consumer, offered, metrics, stopping)
        helpers.append(asyncio.create_task(beating, name="deployment heartbeat"))
        yield worker
        served = True
    finally:
        await _stop(helpers, stopping)
        if endpoints is not None:
            await endpoints.close()
        if served:
            await _leave(transport, settings.consumer, settings.partitions)
        # Bounded: a stop must end even if a connection is wedged (it is dropped, not awaited).
        for closing in (transport.aclose(), engine.dispose()):
            try:
                await asyncio.wait_for(closing, _CLOSE_WAIT_S)
            except TimeoutError:
                log.warning("closing a connection pool took over %.0f s; left behind",
                            _CLOSE_WAIT_S)  # fmt: skip


def _wire(  # noqa: PLR0917 - the pieces open_worker built, wired once
    settings: Settings,
    engine: AsyncEngine,
    transport: Transport,
    executor: Executor,
    schema: Schema,
    recovery: Recovery,
    metrics: Metrics,
) -> Worker:
    names, redis = transport.names, transport.redis
    reader = Reader(redis, names, group=settings.group, consumer=settings.consumer)
    leases = Leases(redis, names, me=settings.consumer, partitions=settings.partitions,
                    lease_ms=settings.lease_ms)  # fmt: skip
    return Worker(
        settings=settings,
        answers=Answers(
            settings=settings,
            transport=transport,
            executor=executor,
            schema=schema,
            recovery=recovery,
            metrics=metrics,
            reader=reader,
        ),
        reader=reader,
        ownership=Ownership(
            leases=leases, reader=reader, transport=transport, engine=engine, metrics=metrics
        ),
        mover=Mover(
            redis,
            names,
            me=settings.consumer,
            group=settings.group,
            partitions=settings.partitions,
            lease_ms=settings.lease_ms,
            batch=max(settings.batch_size, 100),
        ),
        pace=Pace(
            floor=2 * settings.concurrency, ceiling=settings.concurrency * settings.group_size
        ),
    )


async def _record_partitions(transport: Transport, partitions: int) -> None:
    """Record P in ``<prefix>:meta`` if no worker did; refuse to start with another P."""
    recorded = await deployment.record_partitions(transport.redis, transport.names, partitions)
    if recorded != partitions:
        raise SettingsError(
            f"WORKER_PARTITIONS: this deployment ({transport.names.meta}) has {recorded} "
            f"partitions, not {partitions}; `update-worker partitions --set {partitions}` "
            "changes it once every partition is drained"
        )


async def _stop(helpers: list[asyncio.Task[None]], stopping: asyncio.Event) -> None:
    """End the helper loops. The event ends each at its next turn; a cancel cuts short a call
    in progress. Both, because a cancel that lands inside a client call can come out as another
    exception (the loop logs it and goes on), and the event alone waits out a slow call."""
    stopping.set()
    for task in helpers:
        task.cancel()
    if helpers:
        _, late = await asyncio.wait(helpers, timeout=_CLOSE_WAIT_S)
        if late:
            log.warning("%s still running after %.0f s; left behind",
                        ", ".join(task.get_name() for task in late), _CLOSE_WAIT_S)  # fmt: skip


async def _paused(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less when stopping; True once stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()


async def _prune_ledger(
    engine: AsyncEngine, retention: dt.timedelta, stopping: asyncio.Event
) -> None:
    """Every hour or so (jittered, so a fleet does not prune in step), drop ledger rows older
    than the retention: the ledger must not grow forever."""
    while not await _paused(stopping, random.uniform(0.5, 1.0) * _PRUNE_EVERY_S):  # noqa: S311 - jitter
        try:
            if removed := await ledger.prune(engine, older_than=retention):
                log.info("ledger: pruned %d row(s) older than %s", removed, retention)
        except Exception as error:  # noqa: BLE001 - logged; the next round tries again
            log.warning("ledger: pruning failed: %s", classify(error).message)


async def _compare(transport: Transport, consumer: str, offered: deployment.Offer) -> None:
    """Announce this worker, and warn about live workers on the prefix that would answer the
    same job differently (README: Operating, "one prefix, one schema")."""
    await deployment.announce(transport.redis, transport.names, consumer, offered)
    mine = deployment.Record(consumer, offered, offered.fingerprint, seen_s=0.0)
    others = await deployment.records(transport.redis, transport.names)
    for line in deployment.mismatches(mine, others):
        log.warning("deployment: %s; jobs would be answered by whichever reads them", line)


async def _heartbeat(
    transport: Transport,
    consumer: str,
    offered: deployment.Offer,
    metrics: Metrics,
    stopping: asyncio.Event,
) -> None:
    while not await _paused(stopping, deployment.HEARTBEAT_S):
        try:
            await deployment.announce(transport.redis, transport.names, consumer, offered,
                                      metrics.answered_by_status())  # fmt: skip
        except Exception as error:  # noqa: BLE001 - logged; the next beat tries again
            log.warning("deployment: heartbeat failed: %s", classify(error).message)


async def _leave(transport: Transport, consumer: str, partitions: int) -> None:
    """A clean stop: drop this worker's record, and its consumer when it holds nothing."""
    try:
        await deployment.withdraw(transport.redis, transport.names, consumer)
        if await transport.leave(partitions):
            log.info("consumer %s left the group (nothing pending)", consumer)
    except Exception as error:  # noqa: BLE001 - a stopping worker only reports it
        log.warning("leaving the group failed: %s", classify(error).message)


def _probes(settings: Settings, engine: AsyncEngine, transport: Transport) -> Probes:
    names, group = transport.names, settings.group
    return Probes(
        problems=lambda: admin.reachability(transport.redis, engine, deadline_s=1.5),
        backlog=lambda: admin.backlog(transport.redis, names, group, settings.partitions),
        # The loop turns at least once per read (at most block_ms) or per second of waiting.
        liveness_s=max(10.0, 3 * settings.block_ms / 1000),
    )


async def serve(settings: Settings, *, burst: bool = False) -> None:
    """Run a worker until SIGTERM or SIGINT; a second signal exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing in-flight jobs, then exiting", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    async with open_worker(settings) as worker:
        heap.settle()  # this process is the worker's alone: tests' in-process workers skip it
        await worker.run(stop, burst=burst)
