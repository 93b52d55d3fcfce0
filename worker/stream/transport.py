"""Redis streams: groups, reply and ack, dead letters (DESIGN.md §1, §4, §6).

Reading is reading.py, the ingest mover mover.py. Replies are stored, published and their
entries acked in one script (atomic, like MULTI), so an entry is never acked without its reply,
and never replied twice as "final". One script call, not a MULTI of four commands a job: the
client parses one answer instead of 4N + 2.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from worker.errors import REDIS_BACKOFF, retry_transient
from worker.job.replies import Reply
from worker.ops.metrics import Metrics
from worker.stream.names import Entry, Names, text
from worker.stream.scripts import run_each

log = logging.getLogger(__name__)

#: KEYS: the result keys, one per reply, then the streams to ack in. ARGV: TTL, group, the
#: number of replies, then per reply its data and channel, then per stream a count and the ids.
REPLY: Final = """
local ttl, group, replies = ARGV[1], ARGV[2], tonumber(ARGV[3])
local at = 4
for i = 1, replies do
  redis.call('SET', KEYS[i], ARGV[at], 'EX', ttl)
  redis.call('PUBLISH', ARGV[at + 1], ARGV[at])
  at = at + 2
end
for k = replies + 1, #KEYS do
  local count = tonumber(ARGV[at])
  for first = at + 1, at + count, 500 do
    local ids = {unpack(ARGV, first, math.min(first + 499, at + count))}
    redis.call('XACK', KEYS[k], group, unpack(ids))
    redis.call('XDEL', KEYS[k], unpack(ids))
  end
  at = at + 1 + count
end
return replies
"""


class Transport:
    def __init__(
        self,
        redis: Redis,
        names: Names,
        *,
        group: str,
        consumer: str,
        result_ttl: int,
        write_attempts: int = 5,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.names = names
        self._group = group
        self._consumer = consumer
        self._result_ttl = result_ttl
        self._write_attempts = write_attempts
        self._metrics = metrics or Metrics()
        self._reply = redis.register_script(REPLY)

    async def ensure_groups(self, partitions: int) -> None:
        """Create the consumer group on the ingest and on every partition stream (and the
        streams) where missing.

        A group starts at 0, not $: jobs XADDed before the first worker started are served.
        """
        for stream in (self.names.stream, *map(self.names.partition, range(partitions))):
            try:
                await self.redis.xgroup_create(stream, self._group, id="0", mkstream=True)
            except ResponseError as error:
                if not str(error).startswith("BUSYGROUP"):
                    raise

    async def stored_reply(self, job_id: str) -> bytes | None:
        """The reply last stored under the job's result key, if it has not expired."""
        data = await self.redis.get(self.names.result(job_id))
        return data.encode() if isinstance(data, str) else data

    async def reply(
        self, entry: Entry, reply: Reply, *, channel: str | None, ack: bool = True
    ) -> None:
        """Store the reply under its result key, publish it, and (when final) ack the entry."""
        await self.reply_many([(entry, reply, channel)], ack=ack)

    async def reply_many(
        self, answers: Sequence[tuple[Entry, Reply, str | None]], *, ack: bool | None = None
    ) -> None:
        """Store and publish ``(entry, reply, channel)`` answers, and ack the entries of
        final replies, in one script call: a whole group costs one round trip. Running it
        twice is harmless (see :meth:`_write`).

        ``ack=None`` acks exactly the final replies; ``ack=False`` acks none.
        """
        if not answers:
            return
        keys: list[str] = []
        args: list[Any] = [self._result_ttl, self._group, len(answers)]
        acked: dict[str, list[str]] = defaultdict(list)
        for entry, reply, channel in answers:
            keys.append(self.names.result(reply.id))
            args += (reply.encode(), channel or self.names.replies)
            if ack is not False and (ack or reply.final):
                acked[self.names.partition(entry.partition)].append(entry.id)
        for stream, entry_ids in acked.items():
            keys.append(stream)
            args += (len(entry_ids), *entry_ids)

        async def once() -> None:
            await run_each(self.redis, self._reply, [(keys, args)])

        await self._retried(once, what=f"{len(answers)} repl(y/ies), {answers[0][1].id} first")

    async def dead_letter(
        self,
        entry: Entry,
        *,
        reason: str,
        reply: Reply,
        channel: str | None,
        details: Mapping[str, str | int] | None = None,
    ) -> None:
        """Move an entry that can never succeed to the dead-letter stream, with its reply."""
        letter: dict[Any, Any] = {
            # The id its producer knows (the ingest's, for a moved entry), and where it was.
            **self._letter(entry.known_as, reason),
            "partition": entry.partition,
            "partition_entry_id": entry.id,
            "deliveries": entry.deliveries,
            **(details or {}),
        }
        if (raw := entry.fields.get(b"job")) is not None:
            letter["job"] = raw
        if other := {key: value for key, value in entry.fields.items()
                     if key not in (b"job", b"src")}:  # fmt: skip
            letter["fields"] = json.dumps({text(key): text(value) for key, value in other.items()})
        data = reply.encode()

        def commands(pipe: Pipeline) -> None:
            pipe.xadd(self.names.dead, letter)
            pipe.set(self.names.result(reply.id), data, ex=self._result_ttl)
            pipe.publish(channel or self.names.replies, data)
            self._ack(pipe, [entry])

        await self._write(commands, what=f"dead letter {entry.id}")
        self._metrics.dead_letters.labels(reason).inc()

    async def drop_deleted(self, partition: int, entry_ids: list[str]) -> None:
        """Ack entries whose data is gone, and leave a dead letter saying so for each."""
        if not entry_ids:
            return

        def commands(pipe: Pipeline) -> None:
            for entry_id in entry_ids:
                pipe.xack(self.names.partition(partition), self._group, entry_id)
                pipe.xadd(self.names.dead, self._letter(entry_id, "entry_deleted"))

        await self._write(commands, what="drop deleted entries")
        self._metrics.dead_letters.labels("entry_deleted").inc(len(entry_ids))

    async def _write(self, commands: Callable[[Pipeline], None], *, what: str) -> None:
        """Run ``commands`` in one MULTI, again after a reconnect if Redis went away.

        Running it twice is harmless: SET, XACK and XDEL are idempotent, a reply published
        twice carries the same id, and a doubled dead letter replays under the same job id.
        If Redis stays away the entry stays pending, and a worker claims it later.
        """

        async def once() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                commands(pipe)
                await pipe.execute()

        await self._retried(once, what=what)

    async def _retried(self, once: Callable[[], Awaitable[None]], *, what: str) -> None:
        await retry_transient(once, attempts=self._write_attempts, backoff=REDIS_BACKOFF, what=what,
                              retried=self._metrics.retried)  # fmt: skip

    def _letter(self, entry_id: str, reason: str) -> dict[Any, Any]:
        return {
            "entry_id": entry_id,
            "reason": reason,
            "worker": self._consumer,
            "failed_at_ms": int(time.time() * 1000),
        }

    def _ack(self, pipe: Pipeline, entries: Sequence[Entry]) -> None:
        # XDEL after XACK keeps the stream from growing forever: this group owns the stream, so
        # once an entry is answered nobody needs it. XLEN is then the backlog plus pending.
        by_stream: dict[str, list[str]] = defaultdict(list)
        for entry in entries:
            by_stream[self.names.partition(entry.partition)].append(entry.id)
        for stream, entry_ids in by_stream.items():
            pipe.xack(stream, self._group, *entry_ids)
            pipe.xdel(stream, *entry_ids)

    async def leave(self, partitions: int) -> bool:
        """Remove this consumer from the groups where it holds nothing pending (a clean
        stop), so ``stats`` does not list it for ever; whether it left every one. Where it
        has entries pending it stays: they must stay claimable under it."""
        left = True
        for stream in (self.names.stream, *map(self.names.partition, range(partitions))):
            held = await self.redis.xpending_range(
                stream, self._group, "-", "+", 1, consumername=self._consumer
            )
            if held:
                left = False
            else:
                await self.redis.xgroup_delconsumer(stream, self._group, self._consumer)
        return left

    async def aclose(self) -> None:
        await self.redis.aclose()
