"""Group commits: many single-row jobs in one transaction (worker/db/bulk.py builds the
statements), with the ledger, and the fallback to one job at a time.

No two concurrent groups hold the same order key (worker/service/lanes.py), so groups take no row
locks up front; jobs with different producer-given order keys on one row may still meet, and
a deadlock between them is retried like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from worker.db import bulk, fencing, ledger, orm
from worker.db.attempts import Attempt
from worker.errors import Fenced, Unavailable, WorkerError
from worker.job.models import Job
from worker.job.plans import Plan
from worker.job.replies import Reply

if TYPE_CHECKING:
    from worker.db.executor import Executor, Fences

log = logging.getLogger(__name__)


def groupable(job: Job, plan: Plan) -> bool:
    """Whether a job may share a transaction with others: one row, by key, for real."""
    return not job.dry_run and len(plan.statements) == 1 and plan.statements[0].row is not None


async def execute_group(
    executor: Executor, items: Sequence[tuple[Job, Plan]], *, fences: Fences
) -> list[Reply | None]:
    """Apply many single-row jobs (see :func:`groupable`) in one transaction.

    Ids already in the ledger are replayed, and an id repeated within the group replays its
    first copy. If anything goes wrong inside (a guard, a bad value, a deadlock, an id
    another worker is recording right now), the whole group rolls back and each job runs
    alone: one bad job never fails its neighbours. A job whose order key's earlier job ended
    without a final reply is not run then (None): its lane waits.
    """
    started = time.perf_counter()
    try:
        return list(await _commit(executor, items, started, fences))
    except Fenced:
        raise
    except WorkerError as error:
        log.info("group of %d rolled back (%s); one job at a time", len(items), error.message)
    replies: list[Reply | None] = []
    held_up: set[str] = set()  # order keys whose earlier job did not finish
    for job, plan in items:
        if job.order_key in held_up:
            replies.append(None)  # not run: its lane waits for the earlier job
            continue
        reply = await executor.execute(job, plan, fences=fences)
        if not reply.final:
            held_up.add(job.order_key)
        replies.append(reply)
    return replies


async def _commit(
    executor: Executor, items: Sequence[tuple[Job, Plan]], started: float, fences: Fences
) -> list[Reply]:
    first: dict[str, int] = {}  # id -> index of its first copy in the group
    for index, (job, _) in enumerate(items):
        first.setdefault(job.id, index)
    attempts = [Attempt(job=job, number=1, started=started, worker=executor.worker)
                for job, _ in items]  # fmt: skip
    made: dict[str, Reply] = {}
    recorded: dict[str, ledger.Entry] = {}
    async with executor.session() as session:
        finished = await fencing.check_and_look_up(session, fences, list(first))
        todo = [index for index in sorted(first.values(), key=lambda index: _row(items[index][1]))
                if items[index][0].id not in finished]  # fmt: skip
        statements = {index: items[index][1].statements[0] for index in todo}
        core = [index for index in todo if statements[index].orm is None]
        through_orm = [index for index in todo if statements[index].orm is not None]
        results = dict(zip(core, await bulk.run_rows(
            session, [statements[index] for index in core], max_returning=executor.max_returning,
        ), strict=True))  # fmt: skip
        results |= dict(zip(through_orm, await orm.run_rows(
            session, [statements[index] for index in through_orm],
            max_returning=executor.max_returning,
        ), strict=True))  # fmt: skip
        for index in todo:
            result = results[index]
            job = items[index][0]
            made[job.id] = attempts[index].succeeded([result])
            stored = made[job.id].rendered
            recorded[job.id] = ledger.Entry(payload_hash=job.payload_hash, reply=stored)
        rows = [(job_id, entry.payload_hash, entry.reply) for job_id, entry in recorded.items()]
        if await ledger.record_many(session, rows) != len(rows):
            raise Unavailable("another delivery recorded one of these ids first",
                              reason="ledger_race")  # fmt: skip
        await session.commit()
    return [
        made[job.id]
        if job.id in made and first[job.id] == index
        else executor.replayed(attempts[index], finished.get(job.id) or recorded[job.id])
        for index, (job, _) in enumerate(items)
    ]


def _row(plan: Plan) -> tuple[Any, ...]:
    row = plan.statements[0].row
    assert row is not None, "only groupable plans are grouped"  # noqa: S101 - an invariant
    return row
