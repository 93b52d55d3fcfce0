"""Writing dead letters: the worker's side of ``<prefix>:dead`` (deadletters.py is the
operator's). A letter, its reply (stored and published) and the entry's ack go together: in
one MULTI on one Redis; on a Redis Cluster, where they sit in different slots, one slot at a
time in that order, each write confirmed by a replica before the ack (replicated.py), so a
failover never keeps the ack and loses the letter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.job.replies import Reply
from worker.ops.metrics import Metrics
from worker.stream.client import AnyRedis
from worker.stream.names import Entry, Names, text
from worker.stream.replicated import ReplicatedWrites

#: One Redis command, as sent.
Command = tuple[Any, ...]
#: Runs one try of a write again after transient faults (Transport._retried).
Retried = Callable[[Callable[[], Awaitable[None]], str], Awaitable[None]]


@dataclass
class LetterWriter:
    redis: AnyRedis
    names: Names
    group: str
    consumer: str
    result_ttl: int
    metrics: Metrics
    retried: Retried
    #: On a cluster: the writes an ack must not outlive.
    replicated: ReplicatedWrites | None = None

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
        stream = self.names.partition(entry.partition)
        await self._write(
            [[("XADD", self.names.dead, "*", *_flat(letter))],
             [("SET", self.names.result(reply.id), data, "EX", self.result_ttl)]],
            published=("PUBLISH", channel or self.names.replies, data),
            acks=[("XACK", stream, self.group, entry.id), ("XDEL", stream, entry.id)],
            what=f"dead letter {entry.id}",
        )  # fmt: skip
        self.metrics.dead_letters.labels(reason).inc()

    async def drop_deleted(self, partition: int, entry_ids: list[str]) -> None:
        """Ack entries whose data is gone, and leave a dead letter saying so for each."""
        if not entry_ids:
            return
        letters: list[Command] = [
            ("XADD", self.names.dead, "*", *_flat(self._letter(entry_id, "entry_deleted")))
            for entry_id in entry_ids
        ]
        await self._write([letters], published=None,
                          acks=[("XACK", self.names.partition(partition), self.group, *entry_ids)],
                          what="drop deleted entries")  # fmt: skip
        self.metrics.dead_letters.labels("entry_deleted").inc(len(entry_ids))

    async def _write(
        self,
        steps: Sequence[Sequence[Command]],
        *,
        published: Command | None,
        acks: Sequence[Command],
        what: str,
    ) -> None:
        """``steps``, the publication, then the acks: in one MULTI; on a cluster, each step
        in a MULTI of its own (its keys share a slot), confirmed by a replica, in order.

        Running it twice is harmless: SET, XACK and XDEL are idempotent, a reply published
        twice carries the same id, and a doubled dead letter replays under the same job id.
        If Redis stays away the entry stays pending, and a worker claims it later.
        """

        async def once() -> None:
            if self.replicated is None:
                everything = [command for step in steps for command in step]
                await self._multi([*everything, *([published] if published else []), *acks])
                return
            for step in steps:
                await self.replicated.commands(str(step[0][1]), step)
            if published is not None:
                await self.redis.execute_command(*published)
            await self._multi(acks)

        await self.retried(once, what)

    async def _multi(self, commands: Sequence[Command]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

    def _letter(self, entry_id: str, reason: str) -> dict[Any, Any]:
        return {
            "entry_id": entry_id,
            "reason": reason,
            "worker": self.consumer,
            "failed_at_ms": int(time.time() * 1000),
        }


def _flat(fields: Mapping[Any, Any]) -> list[Any]:
    """A stream entry's fields as XADD takes them: name, value, name, value..."""
    return [item for pair in fields.items() for item in pair]
