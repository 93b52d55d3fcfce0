"""One try at a job, and the reply it makes: what a reply says besides its outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from worker.errors import WorkerError
from worker.job.models import Job
from worker.job.plans import Statement
from worker.job.replies import Reply, UpdateResult


@dataclass(frozen=True, slots=True)
class Attempt:
    job: Job
    number: int
    started: float
    worker: str

    def succeeded(self, results: list[UpdateResult]) -> Reply:
        """The ``ok`` reply: a batch's per-update results, or a single update's own."""
        if self.job.batch:
            outcome: dict[str, Any] = {
                "rowcount": sum(result.rowcount for result in results),
                "results": results,
            }
        else:
            outcome = {"rowcount": results[0].rowcount, "returning": results[0].returning}
        return Reply(id=self.job.id, status="ok", **self._stamp(), **outcome)

    def failure(self, error: WorkerError) -> Reply:
        return Reply.failure(self.job.id, error, **self._stamp())

    def _stamp(self) -> dict[str, Any]:
        return {
            "dry_run": self.job.dry_run,
            "attempts": self.number,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "worker": self.worker,
        }


def label(job: Job, index: int, statement: Statement) -> str:
    """How errors name an update: ``updates[i] (table)`` in a batch, the table otherwise."""
    return f"updates[{index}] ({statement.table})" if job.batch else statement.table
