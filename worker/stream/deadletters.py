"""The dead-letter stream (``<prefix>:dead``) for ``update-worker dead list|show|replay|purge``.

Replay puts the original job back on the job stream under its original id, so the ledger
still stops a second effect: a job that did apply meanwhile is answered from the ledger.
A job sent without an id was known by its stream entry id, which replay writes into it as
``id`` (the payload hash leaves ``id`` out, so the job stays the same job).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from worker.stream.client import AnyRedis, is_cluster
from worker.stream.names import Names, entry_ms, text

_PAGE = 500


@dataclass(frozen=True, slots=True)
class Letter:
    id: str  # the dead-letter entry's own id
    fields: dict[str, str]

    @property
    def reason(self) -> str:
        return self.fields.get("reason", "")

    @property
    def job_id(self) -> str:
        """The job's id: its own, or the entry id it was known by."""
        return self.fields.get("job_id") or self._document().get("id") or self.entry_id

    @property
    def entry_id(self) -> str:
        return self.fields.get("entry_id", "")

    @property
    def failed_at_ms(self) -> int:
        return int(self.fields.get("failed_at_ms") or entry_ms(self.id))

    @property
    def error(self) -> str:
        code, message = self.fields.get("error_code"), self.fields.get("error")
        return ": ".join(part for part in (code, message) if part)

    def replayable(self) -> bool:
        return "job" in self.fields

    def replay_body(self) -> str:
        """The job to put back: the original bytes, with the id it was known by made explicit."""
        raw = self.fields["job"]
        document = self._document()
        if document and "id" not in document and self.entry_id:
            return json.dumps({"id": self.entry_id, **document}, separators=(",", ":"))
        return raw

    def _document(self) -> dict[str, Any]:
        try:
            document = json.loads(self.fields.get("job", ""))
        except ValueError:
            return {}
        return document if isinstance(document, dict) else {}


async def letters(redis: AnyRedis, names: Names) -> AsyncIterator[Letter]:
    """Every dead letter, oldest first, read a page at a time."""
    start = "-"
    while page := await redis.xrange(names.dead, min=start, count=_PAGE):
        for entry_id, fields in page:
            yield _letter(entry_id, fields)
        last = text(page[-1][0])
        start = f"({last}"
        if len(page) < _PAGE:
            return


async def newest(redis: AnyRedis, names: Names) -> AsyncIterator[Letter]:
    """Every dead letter, newest first, read a page at a time (stop reading by stopping)."""
    end = "+"
    while page := await redis.xrevrange(names.dead, max=end, count=_PAGE):
        for entry_id, fields in page:
            yield _letter(entry_id, fields)
        end = f"({text(page[-1][0])}"
        if len(page) < _PAGE:
            return


async def find(redis: AnyRedis, names: Names, letter_id: str) -> Letter | None:
    page = await redis.xrange(names.dead, min=letter_id, max=letter_id, count=1)
    if not page:
        return None
    return _letter(*page[0])


async def replay(
    redis: AnyRedis, names: Names, chosen: Sequence[Letter]
) -> list[tuple[Letter, str]]:
    """Put each letter's job back on the job stream and remove the letter, in one MULTI per
    letter (never one without the other); ``(letter, new entry id)`` for each.

    On a cluster the two keys live in different slots: the job is added first, then the
    letter removed. A failure in between leaves the letter (and the job on the stream); a
    second replay adds the job again under its same id, which the ledger answers once."""
    done = []
    for letter in chosen:
        if is_cluster(redis):
            new_id = await redis.xadd(names.stream, {"job": letter.replay_body()})
            await redis.xdel(names.dead, letter.id)
        else:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xadd(names.stream, {"job": letter.replay_body()})
                pipe.xdel(names.dead, letter.id)
                new_id, _ = await pipe.execute()
        done.append((letter, text(new_id)))
    return done


async def purge(redis: AnyRedis, names: Names, chosen: Sequence[Letter]) -> int:
    removed = 0
    for start in range(0, len(chosen), _PAGE):
        ids = [letter.id for letter in chosen[start : start + _PAGE]]
        removed += int(await redis.xdel(names.dead, *ids))
    return removed


def matches(letter: Letter, *, reason: str | None, older_than_s: float | None) -> bool:
    if reason is not None and letter.reason != reason:
        return False
    if older_than_s is not None:
        return letter.failed_at_ms / 1000 <= time.time() - older_than_s
    return True


def _letter(entry_id: Any, fields: dict[Any, Any] | None) -> Letter:
    return Letter(text(entry_id), {text(key): text(value) for key, value in (fields or {}).items()})
