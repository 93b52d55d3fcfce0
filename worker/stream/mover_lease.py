"""The ingest mover's lease (DESIGN.md §11): ``{<prefix>:jobs}:mover``, in the ingest stream's
slot, held by one worker at a time. Its value carries a generation that grows at every
takeover, which fences an older mover's reads and moves (worker/stream/mover.py)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import KW_ONLY, dataclass, field

from worker.stream import mover_lua as lua
from worker.stream.client import AnyRedis
from worker.stream.names import Names, text

log = logging.getLogger(__name__)


@dataclass
class MoverLease:
    redis: AnyRedis
    names: Names
    _: KW_ONLY
    me: str
    lease_ms: int
    token: str | None = None
    generation: int = 0
    #: When the lease was last taken or renewed (event-loop time).
    _renewed_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._acquire = self.redis.register_script(lua.ACQUIRE)
        self._renew = self.redis.register_script(lua.RENEW)
        self._release = self.redis.register_script(lua.RELEASE)

    @property
    def holding(self) -> bool:
        return self.token is not None

    async def acquire(self) -> bool:
        """Take the lease if it is free, under the next generation."""
        got = await self._acquire(keys=[self.names.mover, self.names.mover_generation],
                                  args=[self.me, self.lease_ms])  # fmt: skip
        if not got:
            return False
        self.generation, self.token = int(got[0]), text(got[1])
        self._renewed_at = asyncio.get_running_loop().time()
        log.info("moving the ingest stream %s (mover generation %d)", self.names.stream,
                 self.generation)  # fmt: skip
        return True

    async def renew(self) -> bool:
        if self.token is None:
            return False
        now = asyncio.get_running_loop().time()
        if await self._renew(keys=[self.names.mover], args=[self.token, self.lease_ms]):
            self._renewed_at = now
        else:
            log.warning("lost the mover lease (generation %d)", self.generation)
            self.token = None
        return self.holding

    async def renew_when_due(self, every_s: float) -> bool:
        """Renew once ``every_s`` has passed since the last renewal. Safety never rests on
        it: every read checks the lease in Redis, and every move its generation."""
        if (
            self.token is not None
            and asyncio.get_running_loop().time() - self._renewed_at < every_s
        ):
            return True
        return await self.renew()

    async def release(self) -> None:
        if self.token is not None:
            await self._release(keys=[self.names.mover], args=[self.token])
            self.token = None


__all__ = ["MoverLease"]
