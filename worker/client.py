"""The async producer client (DESIGN.md §8).

    async with UpdateClient("redis://localhost:6379/0") as client:
        reply = await client.update("books", set={"genre": "sci-fi"}, where={"genre": "fiction"})

Each client listens on a reply channel of its own (``<prefix>:replies:<uuid>``), so it receives
only its own replies. A reply is also kept under its result key, which covers a reply that was
published before anyone listened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from pydantic import ValidationError
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub
from redis.exceptions import RedisError

from worker.errors import REDIS_BACKOFF, InvalidJob, retry_transient
from worker.job.models import validate
from worker.job.order import derive_order_key, partition_of
from worker.job.replies import Reply
from worker.stream import deployment
from worker.stream.client import AnyRedis, RedisTarget, check_prefix, open_redis
from worker.stream.names import Names

log = logging.getLogger(__name__)
AnyPubSub = PubSub | ClusterPubSub

_POLL_START_S = 0.01
_POLL_MAX_S = 0.5
#: Tries of one pipeline of XADDs while Redis fails transiently (about 6 s of backoff in all).
_SEND_ATTEMPTS = 6


class UpdateClient:
    def __init__(
        self,
        redis: AnyRedis | RedisTarget | str = "redis://localhost:6379/0",
        *,
        prefix: str = "updates",
        owns_redis: bool | None = None,
    ) -> None:
        """``redis``: a URL (one server or any node of a cluster, found out at the first
        call), a :class:`RedisTarget` (for Sentinel), or a client, which :meth:`aclose`
        closes only if ``owns_redis`` (by default, only a client made here)."""
        made_here = isinstance(redis, str | RedisTarget)
        self._target = redis if isinstance(redis, str | RedisTarget) else None
        self._given = None if isinstance(redis, str | RedisTarget) else redis
        self._owns_redis = made_here if owns_redis is None else owns_redis
        self.names = Names(prefix)
        self.channel = f"{prefix}:replies:{uuid.uuid4().hex}"
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._interim: dict[str, Reply] = {}
        self._pubsub: AnyPubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._partition_count: int | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def submit(self, job: Mapping[str, Any]) -> str:
        """Send ``job`` (a dict in the job format) and return its id; an id is made if absent.

        Raises :class:`~worker.errors.InvalidJob` for a job no worker would accept, before
        anything is sent.
        """
        return (await self.submit_many([job]))[0]

    async def submit_many(self, jobs: Sequence[Mapping[str, Any]]) -> list[str]:
        """Send ``jobs`` in one pipeline and return their ids, in order.

        Every job is validated first: one invalid job raises :class:`InvalidJob` and nothing is
        sent. A Redis fault is retried with backoff; since every job carries an id by then, a
        job that a failed try did add is applied once all the same (the worker's ledger).
        """
        prepared = [self._prepare(job) for job in jobs]
        if any(waits for _, _, waits, _ in prepared):
            await self._listen()
        loop = asyncio.get_running_loop()
        for job_id, _, waits, _ in prepared:
            if waits:
                self._waiting.setdefault(job_id, loop.create_future())

        partitions = await self._partitions()
        redis = await self._redis()

        async def send() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for _, encoded, _, order_key in prepared:
                    pipe.xadd(self._stream(order_key, partitions), {"job": encoded})
                await pipe.execute()

        await retry_transient(send, attempts=_SEND_ATTEMPTS, backoff=REDIS_BACKOFF,
                              what=f"sending {len(prepared)} job(s)")  # fmt: skip
        return [job_id for job_id, _, _, _ in prepared]

    async def _partitions(self) -> int | None:
        """The deployment's partition count, once its first worker recorded it."""
        if self._partition_count is None:
            self._partition_count = await deployment.recorded_partitions(
                await self._redis(), self.names
            )
        return self._partition_count

    async def _redis(self) -> AnyRedis:
        """The client: the one given, or one opened at the first call."""
        if self._given is None:
            assert self._target is not None  # noqa: S101 - one of the two is set
            self._given = await open_redis(self._target)
            check_prefix(self._given, self.names.prefix)
        return self._given

    def _stream(self, order_key: str, partitions: int | None) -> str:
        """Straight to the job's partition (DESIGN.md §11), saving the mover's hop; to the
        ingest while no worker has recorded the partition count yet."""
        if partitions is None:
            return self.names.stream
        return self.names.partition(partition_of(order_key, partitions))

    def _prepare(self, job: Mapping[str, Any]) -> tuple[str, str, bool, str]:
        """``(id, JSON, whether this client awaits the reply, order key)`` of a valid job."""
        body = dict(job)
        body.setdefault("id", uuid.uuid4().hex)
        waits = "reply_to" not in body
        if waits:
            body["reply_to"] = self.channel
        validate(body)
        try:
            encoded = json.dumps(body, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as error:
            raise InvalidJob(f"job is not JSON: {error}") from None
        order_key = derive_order_key(body)
        assert order_key is not None, "a valid job has one"  # noqa: S101 - validate() passed
        return str(body["id"]), encoded, waits, order_key

    async def result(self, job_id: str, *, timeout: float = 30.0) -> Reply:
        """The final reply for ``job_id``; raises ``TimeoutError`` if none comes in time.

        An ``unavailable`` reply is not final (the worker retries the job later); if nothing
        final arrives in time, the last such reply is returned instead of raising.
        """
        future = self._waiting.get(job_id)
        try:
            if future is not None:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), timeout)
            else:
                return await asyncio.wait_for(self._poll(job_id), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiting.pop(job_id, None)
        stored = await (await self._redis()).get(self.names.result(job_id))
        if stored is not None:
            return Reply.model_validate_json(stored)
        if interim := self._interim.pop(job_id, None):
            return interim
        raise TimeoutError(f"no reply for job {job_id!r} within {timeout} s")

    async def update(
        self,
        table: str,
        *,
        set: Mapping[str, Any] | None = None,  # noqa: A002 - the job field's name (DESIGN.md §2)
        inc: Mapping[str, float] | None = None,
        where: Mapping[str, Any] | None = None,
        key: Mapping[str, Any] | None = None,
        all: bool = False,  # noqa: A002 - the job field's name
        expect: Mapping[str, int] | None = None,
        returning: list[str] | None = None,
        dry_run: bool = False,
        id: str | None = None,  # noqa: A002 - the job field's name
        timeout: float = 30.0,
    ) -> Reply:
        """Submit one update and wait for its reply."""
        job: dict[str, Any] = {"table": table}
        optional = {
            "set": set,
            "inc": inc,
            "where": where,
            "key": key,
            "expect": expect,
            "returning": returning,
            "id": id,
        }
        job.update({name: value for name, value in optional.items() if value is not None})
        if all:
            job["all"] = True
        if dry_run:
            job["dry_run"] = True
        return await self.result(await self.submit(job), timeout=timeout)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._owns_redis and self._given is not None:
            await self._given.aclose()

    async def _listen(self) -> None:
        if self._pubsub is None:
            self._pubsub = await self._subscribe()
            self._listener = asyncio.create_task(self._dispatch(), name="update-client replies")

    async def _subscribe(self) -> AnyPubSub:
        pubsub = (await self._redis()).pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel)
        return pubsub

    async def _dispatch(self) -> None:
        while True:
            assert self._pubsub is not None  # noqa: S101 - set before this task starts
            try:
                message = await self._pubsub.get_message(timeout=None)
            except RedisError:
                # A lost connection, or a failed-over node: listen again (through the
                # cluster's or Sentinel's new view), then look up what was published
                # meanwhile under the result keys.
                await asyncio.sleep(_POLL_MAX_S)
                with contextlib.suppress(RedisError):
                    await self._resubscribe()
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                reply = Reply.model_validate_json(message["data"])
            except ValidationError:
                # Someone else's message on our channel: not ours to answer, and the listener
                # must outlive it.
                log.warning("ignored a message on %s that is no reply", self.channel)
                continue
            self._deliver(reply)

    def _deliver(self, reply: Reply) -> None:
        future = self._waiting.get(reply.id)
        if future is None or future.done():
            return
        if reply.final:
            future.set_result(reply)
        else:
            self._interim[reply.id] = reply

    async def _resubscribe(self) -> None:
        old, self._pubsub = self._pubsub, await self._subscribe()
        if old is not None:
            with contextlib.suppress(RedisError):
                await old.aclose()
        redis = await self._redis()
        for job_id in [job_id for job_id, future in self._waiting.items() if not future.done()]:
            if (stored := await redis.get(self.names.result(job_id))) is not None:
                self._deliver(Reply.model_validate_json(stored))

    async def _poll(self, job_id: str) -> Reply:
        """For ids this client did not submit: watch the result key, backing off."""
        delay = _POLL_START_S
        while True:
            stored = await (await self._redis()).get(self.names.result(job_id))
            if stored is not None:
                reply = Reply.model_validate_json(stored)
                if reply.final:
                    return reply
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX_S)
