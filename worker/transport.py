"""Redis streams: read and claim jobs, reply and ack, dead letters (DESIGN.md §1, §4, §6).

The only module that knows Redis commands. A reply is stored, published and acked in one
MULTI, so an entry is never acked without its reply, and never replied twice as "final".
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from worker.errors import REDIS_BACKOFF, retry_transient
from worker.jobs import Reply
from worker.metrics import Metrics
from worker.streams import Claim, Entry, Names, text

log = logging.getLogger(__name__)


# Resets the idle time of the given entries, but only of those this consumer still owns: a
# worker whose claim lapsed (a long stall) must not steal an entry back from its new owner.
# XCLAIM ... JUSTID leaves the delivery count alone. Returns the ids another consumer owns now;
# ids no longer pending at all were simply answered in the meantime.
_RENEW_SCRIPT: Final = """
local lost = {}
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #entry > 0 then
    if entry[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    else
      table.insert(lost, ARGV[i])
    end
  end
end
return lost
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
        self._claim_cursor = "0-0"
        self._renew = redis.register_script(_RENEW_SCRIPT)

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing.

        The group starts at 0, not $: jobs XADDed before the first worker started are served.
        """
        try:
            await self.redis.xgroup_create(self.names.stream, self._group, id="0", mkstream=True)
        except ResponseError as error:
            if not str(error).startswith("BUSYGROUP"):
                raise

    async def read(self, *, count: int, block_ms: int | None) -> list[Entry]:
        """New entries for this consumer; ``block_ms=None`` returns at once."""
        try:
            response = await self.redis.xreadgroup(
                self._group, self._consumer, {self.names.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as error:
            await self._recreate_group(error)
            return []
        return [
            Entry(id=entry_id.decode(), fields=fields)
            for _, entries in _streams(response)
            for entry_id, fields in entries
        ]

    async def claim(self, *, count: int, min_idle_ms: int) -> Claim:
        """Take over entries other consumers left pending for ``min_idle_ms`` (XAUTOCLAIM).

        Successive calls walk the whole pending list, ``count`` entries at a time.
        """
        try:
            cursor, claimed, *rest = await self.redis.xautoclaim(
                self.names.stream,
                self._group,
                self._consumer,
                min_idle_ms,
                start_id=self._claim_cursor,
                count=count,
            )
        except ResponseError as error:
            await self._recreate_group(error)
            return Claim(entries=[], deleted=[])
        self._claim_cursor = text(cursor)
        # Redis 7 reports entries whose data is gone in a third element (and drops them from
        # the pending list itself).
        deleted = [text(entry_id) for entry_id in (rest[0] if rest else [])]
        live = [(text(entry_id), fields) for entry_id, fields in claimed if fields is not None]
        counts = await self._deliveries([entry_id for entry_id, _ in live])
        entries = [
            Entry(id=entry_id, fields=fields, deliveries=counts.get(entry_id, 1))
            for entry_id, fields in live
        ]
        return Claim(entries=entries, deleted=deleted)

    async def _deliveries(self, entry_ids: list[str]) -> dict[str, int]:
        if not entry_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(self.names.stream, self._group, entry_id, entry_id, 1)
            found = await pipe.execute()
        return {text(row[0]["message_id"]): int(row[0]["times_delivered"]) for row in found if row}

    async def renew(self, entry_ids: list[str]) -> list[str]:
        """Reset the idle time of entries this consumer is still running.

        Returns the ids another consumer has claimed meanwhile.
        """
        if not entry_ids:
            return []
        keys, args = [self.names.stream], [self._group, self._consumer, *entry_ids]
        try:
            lost = await self._renew(keys=keys, args=args)
        except ResponseError as error:
            await self._recreate_group(error)
            return []
        return [text(entry_id) for entry_id in lost]

    async def _recreate_group(self, error: ResponseError) -> None:
        if "NOGROUP" not in str(error):
            raise error
        # The stream or group vanished (a Redis restart without persistence, a DEL).
        log.warning("consumer group %s is missing; recreating it", self._group)
        await self.ensure_group()

    async def stored_reply(self, job_id: str) -> bytes | None:
        """The reply last stored under the job's result key, if it has not expired."""
        data = await self.redis.get(self.names.result(job_id))
        return data.encode() if isinstance(data, str) else data

    async def reply(
        self, entry_id: str, reply: Reply, *, channel: str | None, ack: bool = True
    ) -> None:
        """Store the reply under its result key, publish it, and (when final) ack the entry."""
        await self.reply_many([(entry_id, reply, channel)], ack=ack)

    async def reply_many(
        self, answers: Sequence[tuple[str, Reply, str | None]], *, ack: bool | None = None
    ) -> None:
        """Store and publish ``(entry_id, reply, channel)`` answers, and ack the entries of
        final replies, in one MULTI: a whole group costs one round trip.

        ``ack=None`` acks exactly the final replies; ``ack=False`` acks none.
        """
        if not answers:
            return

        def commands(pipe: Pipeline) -> None:
            done = []
            for entry_id, reply, channel in answers:
                data = reply.encode()
                pipe.set(self.names.result(reply.id), data, ex=self._result_ttl)
                pipe.publish(channel or self.names.replies, data)
                if ack is not False and (ack or reply.final):
                    done.append(entry_id)
            if done:
                self._ack(pipe, *done)

        await self._write(commands, what=f"{len(answers)} repl(y/ies), {answers[0][1].id} first")

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
            **self._letter(entry.id, reason),
            "deliveries": entry.deliveries,
            **(details or {}),
        }
        if (raw := entry.fields.get(b"job")) is not None:
            letter["job"] = raw
        if other := {key: value for key, value in entry.fields.items() if key != b"job"}:
            letter["fields"] = json.dumps({text(key): text(value) for key, value in other.items()})
        data = reply.encode()

        def commands(pipe: Pipeline) -> None:
            pipe.xadd(self.names.dead, letter)
            pipe.set(self.names.result(reply.id), data, ex=self._result_ttl)
            pipe.publish(channel or self.names.replies, data)
            self._ack(pipe, entry.id)

        await self._write(commands, what=f"dead letter {entry.id}")
        self._metrics.dead_letters.labels(reason).inc()

    async def drop_deleted(self, entry_ids: list[str]) -> None:
        """Ack entries whose data is gone, and leave a dead letter saying so for each."""
        if not entry_ids:
            return

        def commands(pipe: Pipeline) -> None:
            for entry_id in entry_ids:
                pipe.xack(self.names.stream, self._group, entry_id)
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

        await retry_transient(once, attempts=self._write_attempts, backoff=REDIS_BACKOFF, what=what,
                              retried=self._metrics.retried)  # fmt: skip

    def _letter(self, entry_id: str, reason: str) -> dict[Any, Any]:
        return {
            "entry_id": entry_id,
            "reason": reason,
            "worker": self._consumer,
            "failed_at_ms": int(time.time() * 1000),
        }

    def _ack(self, pipe: Pipeline, *entry_ids: str) -> None:
        # XDEL after XACK keeps the stream from growing forever: this group owns the stream, so
        # once an entry is answered nobody needs it. XLEN is then the backlog plus pending.
        pipe.xack(self.names.stream, self._group, *entry_ids)
        pipe.xdel(self.names.stream, *entry_ids)

    async def leave(self) -> bool:
        """Remove this consumer from the group if it holds nothing pending (a clean stop), so
        ``stats`` does not list it for ever; whether it was removed. One with entries pending
        stays: the entries must stay claimable under it."""
        held = await self.redis.xpending_range(
            self.names.stream, self._group, "-", "+", 1, consumername=self._consumer
        )
        if held:
            return False
        await self.redis.xgroup_delconsumer(self.names.stream, self._group, self._consumer)
        return True

    async def aclose(self) -> None:
        await self.redis.aclose()


def _streams(response: Any) -> list[tuple[Any, list[tuple[bytes, Mapping[bytes, bytes]]]]]:
    if not response:
        return []
    if isinstance(response, dict):  # RESP3
        return list(response.items())
    return [(name, entries) for name, entries in response]
