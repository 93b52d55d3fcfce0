"""Entries -> units of work, and how many entries a worker may hold at once. Pure, no I/O.

A unit is what one task answers: a group of single-row jobs that share a transaction, or one
entry on its own. The window of entries held is paced by the worker's own recent completion
rate, so a crash hands back only about ``horizon_s`` of work, while a fast worker still keeps
every transaction slot busy with full groups.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from worker.db.groups import groupable
from worker.db.schema import Schema
from worker.errors import WorkerError
from worker.job.compiler import compile_job
from worker.job.models import Job, Rejection, parse_entry
from worker.job.plans import Plan, Policy
from worker.stream.names import Entry


@dataclass(frozen=True, slots=True)
class Work:
    """One entry, parsed and (when it parsed) compiled or refused."""

    entry: Entry
    job: Job | Rejection
    plan: Plan | None = None
    error: WorkerError | None = None
    #: Delivered more than WORKER_MAX_DELIVERIES times: not to be run again.
    exhausted: bool = False

    @property
    def groupable(self) -> bool:
        job, plan = self.job, self.plan
        return (
            isinstance(job, Job)
            and plan is not None
            and not self.exhausted
            and groupable(job, plan)
        )


def prepare(
    entry: Entry,
    *,
    schema: Schema,
    max_job_bytes: int,
    max_deliveries: int,
    policy: Policy = Policy(),  # noqa: B008 - frozen
) -> Work:
    """Parse and compile one entry."""
    parsed = parse_entry(entry.fields, entry_id=entry.known_as, max_job_bytes=max_job_bytes)
    exhausted = entry.deliveries > max_deliveries
    if isinstance(parsed, Rejection) or exhausted:
        return Work(entry, parsed, exhausted=exhausted)
    try:
        return Work(entry, parsed, plan=compile_job(parsed, schema, policy))
    except WorkerError as error:
        return Work(entry, parsed, error=error)


def units(works: list[Work], *, group_size: int) -> list[list[Work]]:
    """Single-row jobs in full groups of ``group_size``; the rest one by one; in an order
    that keeps each order key's entries in stream order (worker/service/lanes.py registers them so).

    Full groups, not groups spread thin over every free slot: a transaction's fixed cost
    (begin, ledger lookup, row locks, ledger insert, commit) is paid once per group. A unit
    alone whose order key is in the open group closes the group first: the group holds the
    key's earlier entries.
    """
    made: list[list[Work]] = []
    group: list[Work] = []
    keys: set[str] = set()
    for work in works:
        if work.groupable:
            group.append(work)
            keys.add(order_key(work) or "")
            if len(group) >= group_size:
                made.append(group)
                group, keys = [], set()
            continue
        if group and order_key(work) in keys:
            made.append(group)
            group, keys = [], set()
        made.append([work])
    if group:
        made.append(group)
    return made


def order_key(work: Work) -> str | None:
    """The order key a unit must respect: only a job that runs against the database has one
    (a refusal or an unparsable entry changes nothing, so it needs no place in a lane)."""
    job = work.job
    if isinstance(job, Job) and work.error is None:
        return job.order_key
    return None


class Pace:
    """How many entries to hold: what this worker finished in the last ``horizon_s``,
    between ``floor`` and ``ceiling``."""

    def __init__(self, *, floor: int, ceiling: int, horizon_s: float = 0.25) -> None:
        self.floor, self.ceiling, self.horizon_s = floor, max(floor, ceiling), horizon_s
        self._done: deque[tuple[float, int]] = deque()
        self._recent = 0

    def finished(self, count: int) -> None:
        self._done.append((time.monotonic(), count))
        self._recent += count

    def window(self) -> int:
        horizon = time.monotonic() - self.horizon_s
        while self._done and self._done[0][0] < horizon:
            self._recent -= self._done.popleft()[1]
        return min(self.ceiling, max(self.floor, self._recent))
