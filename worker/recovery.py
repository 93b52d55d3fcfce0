"""Crash recovery (DESIGN.md §6): nothing a dead or stalled worker held is lost.

- Every live worker claims entries that stayed pending past ``claim_idle_ms`` (XAUTOCLAIM),
  whoever held them.
- While a worker runs an entry, it renews its claim every third of ``claim_idle_ms``, so a
  slow job is never taken away from a worker that is alive.
- An entry handed out more than ``max_deliveries`` times is not run again: its stored reply
  is replayed if the job did finish, and otherwise it goes to the dead-letter stream with
  the delivery count and the last error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import ValidationError

from worker.errors import InternalError, Unavailable, WorkerError, classify
from worker.executor import Executor
from worker.jobs import Job, Reply
from worker.streams import Entry
from worker.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    transport: Transport
    executor: Executor
    worker: str
    claim_idle_ms: int
    _next_claim: float = field(default=0.0, init=False)

    # -- claiming what others left -------------------------------------------------------------

    def until_claim_ms(self) -> int:
        """Milliseconds until the next claim is due; 0 when it is due now."""
        return max(0, int((self._next_claim - time.monotonic()) * 1000))

    async def claim(self, *, count: int) -> list[Entry]:
        """Entries idle past ``claim_idle_ms``, now owned by this worker."""
        # Half the idle time between scans: an orphan waits at most 1.5x claim_idle_ms.
        self._next_claim = time.monotonic() + self.claim_idle_ms / 2000
        claim = await self.transport.claim(count=count, min_idle_ms=self.claim_idle_ms)
        if claim.deleted:
            log.warning(
                "%d pending entr(y/ies) had their data trimmed or deleted before an answer; "
                "acked and dead-lettered as entry_deleted: %s",
                len(claim.deleted), ", ".join(claim.deleted[:10]),
            )  # fmt: skip
            await self.transport.drop_deleted(claim.deleted)
        if claim.entries:
            log.info(
                "claimed %d entr(y/ies) idle for over %d ms", len(claim.entries), self.claim_idle_ms
            )
        if len(claim.entries) == count:
            self._next_claim = time.monotonic()  # there may be more behind them
        return claim.entries

    # -- keeping our own -----------------------------------------------------------------------

    async def keep_claims(self, running: Callable[[], list[str]]) -> None:
        """Renew the claims on ``running()`` entries every third of the idle time; never returns."""
        while True:
            await asyncio.sleep(self.claim_idle_ms / 3000)
            try:
                lost = await self.transport.renew(running())
            except Exception as error:  # noqa: BLE001 - renewal is retried on the next tick
                log.warning("renewing claims failed: %s", classify(error).message)
                continue
            if lost:
                # This worker stalled past claim_idle_ms and others took over; the ledger
                # still lets only one of the runs take effect.
                log.warning("running entries claimed by other workers: %s", ", ".join(lost))

    # -- giving up -----------------------------------------------------------------------------

    async def give_up(self, entry: Entry, job: Job) -> None:
        """Answer an entry delivered too often without running it again."""
        replayed = await self.executor.replay(job)
        if replayed is not None:
            # It did finish; only its reply was lost (the worker died before sending it).
            log.info("entry %s: job %s already finished; replaying", entry.id, job.id)
            await self.transport.reply(entry.id, replayed, channel=job.reply_to)
            return
        error = self._verdict(entry, job, await self.transport.stored_reply(job.id))
        reply = Reply.failure(job.id, error, worker=self.worker, dry_run=job.dry_run)
        log.warning("entry %s: job %s dead-lettered: %s", entry.id, job.id, error.message)
        details: dict[str, str | int] = {"job_id": job.id, "error_code": error.code}
        details["error"] = error.message
        await self.transport.dead_letter(
            entry, reason="max_deliveries", reply=reply, channel=job.reply_to, details=details
        )

    def _verdict(self, entry: Entry, job: Job, stored: bytes | None) -> WorkerError:
        gave_up = f"gave up after {entry.deliveries} deliveries"
        last = _parse_reply(stored)
        if last is not None and last.id == job.id and last.error and last.error.retryable:
            return Unavailable(f"{gave_up}; the last ended with: {last.error.message}",
                               reason="max_deliveries")  # fmt: skip
        return InternalError(
            f"{gave_up}; none finished: the worker running it crashed, was killed, or stalled "
            "past WORKER_CLAIM_IDLE_MS"
        )


def _parse_reply(data: bytes | None) -> Reply | None:
    if data is None:
        return None
    try:
        return Reply.model_validate_json(data)
    except ValidationError:
        return None
