"""``update-worker submit -f jobs.jsonl``: many jobs, a bounded number in flight, and totals.

Each non-blank line is one job. Every line ends in exactly one count: sent (and, unless
``--no-wait``, answered or timed out), or not sent with the reason:

- a line that is no valid job (not JSON, or refused by the same validation a worker applies)
  is not sent; it counts as ``invalid_job`` under its line number;
- jobs go out in pipelines of XADDs, retried with backoff while Redis fails; when Redis stays
  down, the pipeline that failed counts as ``send_failed`` (some of it may have been added:
  its ids are listed, and the ledger applies each id once) and every later line as
  ``not_sent``, and nothing more is tried.

Jobs without an id get one, so each reply finds its job and a resent job applies only once.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from worker.client import UpdateClient
from worker.errors import classify
from worker.job.models import Rejection, parse_entry
from worker.job.replies import Reply

#: The code counted for a job whose reply did not come within the timeout.
NO_REPLY: Final = "no_reply"
#: A pipeline that still failed after its retries: its jobs may or may not be on the stream.
SEND_FAILED: Final = "send_failed"
#: Lines after a failed pipeline: never tried.
NOT_SENT: Final = "not_sent"
#: Most XADDs in one pipeline.
_PIPELINE: Final = 200


@dataclass
class Totals:
    sent: int = 0
    #: Lines that were not sent: no valid job, or Redis failed.
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

    def not_sent(self, line: int, job_id: str, code: str, message: str) -> None:
        self.unsent += 1
        self.fail(line, job_id, code, message)

    def _note(self, line: int, job_id: str, code: str, message: str) -> None:
        self.codes[code] += 1
        if len(self.failures) < 20:
            self.failures.append((line, job_id, code, message))


@dataclass
class _Sender:
    client: UpdateClient
    totals: Totals
    wait: bool
    timeout: float
    room: asyncio.Semaphore
    advance: Callable[[], None]
    waiting: asyncio.TaskGroup
    #: Why sending stopped for good (Redis stayed down), once it did.
    broken: str | None = None

    async def flush(self, chunk: list[tuple[int, dict[str, Any]]]) -> None:
        """Send ``chunk`` (``(line number, job)``), then await its replies in the background."""
        if not chunk:
            return
        if self.broken is None:
            try:
                job_ids = await self.client.submit_many([job for _, job in chunk])
            except Exception as error:  # noqa: BLE001 - every failure is counted, never lost
                self.broken = classify(error).message
                for number, job in chunk:
                    self._unsent(number, str(job.get("id", "")), SEND_FAILED,
                                 f"{self.broken} (may have been added)")  # fmt: skip
                return
        else:
            for number, job in chunk:
                self._unsent(number, str(job.get("id", "")), NOT_SENT,
                             f"not tried after: {self.broken}")  # fmt: skip
            return
        self.totals.sent += len(chunk)
        for (number, _), job_id in zip(chunk, job_ids, strict=True):
            if self.wait:
                self.waiting.create_task(self._reply(number, job_id))
            else:
                self._done()

    async def _reply(self, number: int, job_id: str) -> None:
        try:
            self.totals.add(number, job_id, await self.client.result(job_id, timeout=self.timeout))
        except TimeoutError:
            self.totals.fail(number, job_id, NO_REPLY, f"no reply within {self.timeout} s")
        except Exception as error:  # noqa: BLE001 - counted with its code, never unobserved
            failure = classify(error)
            self.totals.fail(number, job_id, failure.code, failure.message)
        finally:
            self._done()

    def _unsent(self, number: int, job_id: str, code: str, message: str) -> None:
        self.totals.not_sent(number, job_id, code, message)
        self._done()

    def _done(self) -> None:
        self.room.release()
        self.advance()


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
    async with asyncio.TaskGroup() as waiting:
        sender = _Sender(client, totals, wait, timeout, asyncio.Semaphore(in_flight), advance,
                         waiting)  # fmt: skip
        chunk: list[tuple[int, dict[str, Any]]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                advance()
                continue
            job = _job(line)
            if isinstance(job, str):
                totals.not_sent(number, "", "invalid_job", job)
                advance()
                continue
            if not wait:
                job.setdefault("reply_to", client.names.replies)
            await sender.room.acquire()
            chunk.append((number, job))
            # Send when the pipeline is full, or when no more room is free right now: the
            # replies of what is out make room, and they come only for what was sent.
            if len(chunk) >= _PIPELINE or sender.room.locked():
                await sender.flush(chunk)
                chunk = []
        await sender.flush(chunk)
    return totals


def _job(line: str) -> dict[str, Any] | str:
    """The job on ``line``, or why it is not one: the checks a worker makes, but the schema's
    (duplicate keys, NaN, the id's alphabet and every field included)."""
    raw = line.encode("utf-8", errors="surrogatepass")
    parsed = parse_entry({b"job": raw}, entry_id="0-0", max_job_bytes=len(raw))
    if isinstance(parsed, Rejection):
        return parsed.error.message
    job: dict[str, Any] = json.loads(line)
    return job
