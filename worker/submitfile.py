"""``update-worker submit -f jobs.jsonl``: many jobs, a bounded number in flight, and totals.

Each non-blank line is one job. A line that is not a JSON object is not sent; it counts as
``invalid_job`` under its line number. Jobs without an id get one, so each reply finds its job.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from worker.client import UpdateClient
from worker.jobs import Reply

#: The code counted for a job whose reply did not come within the timeout.
NO_REPLY = "no_reply"


@dataclass
class Totals:
    sent: int = 0
    #: Lines that were no job, so never sent.
    unsent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    #: ``(line number, job id, code, message)`` of the first failures, for the report.
    failures: list[tuple[int, str, str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.statuses["error"]

    def add(self, line: int, job_id: str, reply: Reply) -> None:
        self.statuses[reply.status] += 1
        if reply.error is not None:
            self._note(line, job_id, reply.error.code, reply.error.message)

    def fail(self, line: int, job_id: str, code: str, message: str) -> None:
        """A job that got no reply, or a line that was no job."""
        self.statuses["error"] += 1
        self._note(line, job_id, code, message)

    def _note(self, line: int, job_id: str, code: str, message: str) -> None:
        self.codes[code] += 1
        if len(self.failures) < 20:
            self.failures.append((line, job_id, code, message))


async def submit_lines(
    client: UpdateClient,
    lines: Iterable[str],
    *,
    in_flight: int,
    wait: bool,
    timeout: float,
    advance: Callable[[], None] = lambda: None,
) -> Totals:
    """Send every job in ``lines``, at most ``in_flight`` unanswered at once."""
    totals = Totals()
    room = asyncio.Semaphore(in_flight)
    running: set[asyncio.Task[None]] = set()

    async def one(number: int, job: dict[str, Any]) -> None:
        try:
            job_id = await client.submit(job)
            totals.sent += 1
            if wait:
                try:
                    totals.add(number, job_id, await client.result(job_id, timeout=timeout))
                except TimeoutError:
                    totals.fail(number, job_id, NO_REPLY, f"no reply within {timeout} s")
        finally:
            room.release()
            advance()

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            advance()
            continue
        job = _job(line)
        if isinstance(job, str):
            totals.fail(number, "", "invalid_job", job)
            totals.unsent += 1
            advance()
            continue
        if not wait:
            job.setdefault("reply_to", client.names.replies)
        await room.acquire()
        task = asyncio.create_task(one(number, job))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    return totals


def _job(line: str) -> dict[str, Any] | str:
    """The job on ``line``, or why it is not one."""
    try:
        job = json.loads(line)
    except ValueError as error:
        return f"not JSON: {error}"
    if not isinstance(job, dict):
        return "not a JSON object"
    return job
