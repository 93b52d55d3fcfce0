"""Giving up on an entry (DESIGN.md §6): one handed out more than ``max_deliveries`` times
is not run again. Its stored reply is replayed if the job did finish, and otherwise it goes to
the dead-letter stream with the delivery count and the last error.

Nothing a dead or stalled worker held is lost: its partitions' new owners claim every entry
pending there when they take over (worker/service/ownership.py), and each such claim counts as a
delivery, so an entry that kills every worker that runs it ends here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError

from worker.db.executor import Executor
from worker.errors import InternalError, Unavailable, WorkerError
from worker.job.models import Job
from worker.job.replies import Reply
from worker.stream.names import Entry
from worker.stream.transport import Transport

log = logging.getLogger(__name__)


@dataclass
class Recovery:
    transport: Transport
    executor: Executor
    worker: str

    # -- giving up -----------------------------------------------------------------------------

    async def give_up(self, entry: Entry, job: Job) -> None:
        """Answer an entry delivered too often without running it again."""
        replayed = await self.executor.replay(job)
        if replayed is not None:
            # It did finish; only its reply was lost (the worker died before sending it).
            log.info("entry %s: job %s already finished; replaying", entry.id, job.id)
            await self.transport.reply(entry, replayed, channel=job.reply_to)
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
            f"{gave_up}; none finished: the workers running it crashed, were killed, or lost "
            "its partition"
        )


def _parse_reply(data: bytes | None) -> Reply | None:
    if data is None:
        return None
    try:
        return Reply.model_validate_json(data)
    except ValidationError:
        return None
