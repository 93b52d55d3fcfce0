"""Redis streams: read jobs, reply and ack, dead letters (DESIGN.md §1, §4, §6).

The only module that knows Redis commands. A reply is stored, published and acked in one
MULTI, so an entry is never acked without its reply, and never replied twice as "final".
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from worker.jobs import Reply

log = logging.getLogger(__name__)

#: Extra socket time beyond a blocking read's own BLOCK, so the read returns before the socket
#: times out: redis-py 8 defaults to a 5 s socket timeout, shorter than a long BLOCK.
_SOCKET_MARGIN_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class Names:
    """Every Redis name derives from one prefix; ``{updates}`` keeps a cluster in one slot."""

    prefix: str = "updates"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def replies(self) -> str:
        return f"{self.prefix}:replies"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    fields: Mapping[bytes, bytes]


def connect(url: str, *, block_ms: int = 0) -> Redis:
    """A client whose socket timeout outlasts a blocking read of ``block_ms``."""
    timeout = max(_SOCKET_MARGIN_S, block_ms / 1000 + _SOCKET_MARGIN_S)
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=_SOCKET_MARGIN_S)


class Transport:
    def __init__(
        self,
        redis: Redis,
        names: Names,
        *,
        group: str,
        consumer: str,
        result_ttl: int,
    ) -> None:
        self.redis = redis
        self.names = names
        self._group = group
        self._consumer = consumer
        self._result_ttl = result_ttl

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
            if not str(error).startswith("NOGROUP"):
                raise
            # The stream or group vanished (a Redis restart without persistence, a DEL).
            log.warning("consumer group %s is missing; recreating it", self._group)
            await self.ensure_group()
            return []
        return [
            Entry(id=entry_id.decode(), fields=fields)
            for _, entries in _streams(response)
            for entry_id, fields in entries
        ]

    async def reply(
        self, entry_id: str, reply: Reply, *, channel: str | None, ack: bool = True
    ) -> None:
        """Store the reply under its result key, publish it, and (when final) ack the entry."""
        data = reply.encode()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.names.result(reply.id), data, ex=self._result_ttl)
            pipe.publish(channel or self.names.replies, data)
            if ack:
                self._ack(pipe, entry_id)
            await pipe.execute()

    async def dead_letter(
        self, entry: Entry, *, reason: str, reply: Reply, channel: str | None
    ) -> None:
        """Move an entry that can never succeed to the dead-letter stream, with its reply."""
        letter: dict[Any, Any] = {
            "entry_id": entry.id,
            "reason": reason,
            "worker": self._consumer,
            "failed_at_ms": int(time.time() * 1000),
        }
        if (raw := entry.fields.get(b"job")) is not None:
            letter["job"] = raw
        if other := {key: value for key, value in entry.fields.items() if key != b"job"}:
            letter["fields"] = json.dumps(
                {_text(key): _text(value) for key, value in other.items()}
            )
        data = reply.encode()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.names.dead, letter)
            pipe.set(self.names.result(reply.id), data, ex=self._result_ttl)
            pipe.publish(channel or self.names.replies, data)
            self._ack(pipe, entry.id)
            await pipe.execute()

    def _ack(self, pipe: Any, entry_id: str) -> None:
        # XDEL after XACK keeps the stream from growing forever: this group owns the stream, so
        # once an entry is answered nobody needs it. XLEN is then the backlog plus pending.
        pipe.xack(self.names.stream, self._group, entry_id)
        pipe.xdel(self.names.stream, entry_id)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _streams(response: Any) -> list[tuple[Any, list[tuple[bytes, Mapping[bytes, bytes]]]]]:
    if not response:
        return []
    if isinstance(response, dict):  # RESP3
        return list(response.items())
    return [(name, entries) for name, entries in response]


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="backslashreplace")
