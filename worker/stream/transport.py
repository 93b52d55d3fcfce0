"""Redis streams: groups, reply and ack, dead letters (DESIGN.md §1, §4, §6).

Reading is reading.py, the ingest mover mover.py, dead letters letters.py. Replies are stored,
published and their entries acked in one script (atomic, like MULTI), so an entry is never
acked without its reply, and never replied twice as "final". One script call, not a MULTI of
four commands a job: the client parses one answer instead of 4N + 2.

On a Redis Cluster a result key and a partition stream live in different slots, and nothing
may span two (DESIGN.md §11): the replies are stored and published first (a script per reply,
in its result key's slot), and only then are the entries acked (a script per partition), once
a replica of each primary written to has the replies (worker/stream/replicated.py), so that a
failover never keeps an ack and loses its reply. A crash in between leaves the entries
pending; they run again and the ledger replays the same replies.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from worker.errors import REDIS_BACKOFF, retry_transient
from worker.job.replies import Reply
from worker.ops.metrics import Metrics
from worker.stream.client import AnyRedis, is_cluster
from worker.stream.letters import LetterWriter
from worker.stream.names import Entry, Names
from worker.stream.replicated import ReplicatedWrites
from worker.stream.scripts import Call, run_each

log = logging.getLogger(__name__)

#: On a cluster, how long a replica may take to confirm a group's replies.
_WAIT_REPLICA_MS: Final = 1000

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
#: One reply on a cluster. KEYS: its result key. ARGV: TTL, data, channel.
STORE: Final = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""
#: One partition's acks on a cluster. KEYS: the stream. ARGV: group, then the ids.
ACK: Final = """
for first = 2, #ARGV, 500 do
  local ids = {unpack(ARGV, first, math.min(first + 499, #ARGV))}
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return #ARGV - 1
"""


class Transport:
    def __init__(
        self,
        redis: AnyRedis,
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
        self._store = redis.register_script(STORE)
        self._ack_script = redis.register_script(ACK)
        self.cluster = is_cluster(redis)
        self._replicated = (
            ReplicatedWrites(redis, timeout_ms=_WAIT_REPLICA_MS) if isinstance(redis, RedisCluster)
            else None
        )  # fmt: skip
        self._letters = LetterWriter(redis, names, group, consumer, result_ttl, self._metrics,
                                     self._retried, self._replicated)  # fmt: skip

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
        twice is harmless (SET, XACK and XDEL are idempotent, and a reply published twice
        carries the same id).

        ``ack=None`` acks exactly the final replies; ``ack=False`` acks none.
        """
        if not answers:
            return
        if self.cluster:
            await self._reply_by_slot(answers, ack=ack)
            return
        keys: list[str] = []
        args: list[Any] = [self._result_ttl, self._group, len(answers)]
        for _, reply, channel in answers:
            keys.append(self.names.result(reply.id))
            args += (reply.encode(), channel or self.names.replies)
        for stream, entry_ids in self._acked(answers, ack).items():
            keys.append(stream)
            args += (len(entry_ids), *entry_ids)

        async def once() -> None:
            await run_each(self.redis, self._reply, [(keys, args)])

        await self._retried(once, f"{len(answers)} repl(y/ies), {answers[0][1].id} first")

    async def _reply_by_slot(
        self, answers: Sequence[tuple[Entry, Reply, str | None]], *, ack: bool | None
    ) -> None:
        """:meth:`reply_many` on a cluster: store and publish every reply, then ack."""
        stores: list[Call] = [
            ([self.names.result(reply.id)],
             [self._result_ttl, reply.encode(), channel or self.names.replies])
            for _, reply, channel in answers
        ]  # fmt: skip
        acks: list[Call] = [([stream], [self._group, *ids])
                            for stream, ids in self._acked(answers, ack).items()]  # fmt: skip

        async def once() -> None:
            assert self._replicated is not None  # noqa: S101 - on a cluster
            await self._replicated.run(self._store, stores)
            if acks:
                await run_each(self.redis, self._ack_script, acks)

        await self._retried(once, f"{len(answers)} repl(y/ies), {answers[0][1].id} first")

    def _acked(
        self, answers: Sequence[tuple[Entry, Reply, str | None]], ack: bool | None
    ) -> dict[str, list[str]]:
        """Partition stream -> the entry ids to ack: those of final replies (``ack=None``),
        all (``True``) or none (``False``)."""
        acked: dict[str, list[str]] = defaultdict(list)
        for entry, reply, _ in answers:
            if ack is not False and (ack or reply.final):
                acked[self.names.partition(entry.partition)].append(entry.id)
        return acked

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
        await self._letters.dead_letter(entry, reason=reason, reply=reply, channel=channel,
                                        details=details)  # fmt: skip

    async def drop_deleted(self, partition: int, entry_ids: list[str]) -> None:
        """Ack entries whose data is gone, and leave a dead letter saying so for each."""
        await self._letters.drop_deleted(partition, entry_ids)

    async def _retried(self, once: Callable[[], Awaitable[None]], what: str) -> None:
        await retry_transient(once, attempts=self._write_attempts, backoff=REDIS_BACKOFF, what=what,
                              retried=self._metrics.retried)  # fmt: skip

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
        if self._replicated is not None:
            await self._replicated.aclose()
        await self.redis.aclose()
