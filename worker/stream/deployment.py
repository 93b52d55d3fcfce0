"""The deployment record ``<prefix>:meta``: which workers serve a prefix, and what each offers.

Every worker writes one field, ``worker:<consumer>``, holding the fingerprint of what it would
accept (its tables and their columns, what is writable, and the settings that decide a job's
fate) and when it was last seen. It refreshes the field every ``HEARTBEAT_S`` and removes it on
a clean stop. Workers that share a prefix but not a fingerprint answer the same job
differently depending on which one reads it: start-up logs that, and ``check`` reports it.
A field not refreshed for ``LIVE_S`` is a worker that is gone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

from worker.job.plans import Policy
from worker.stream.client import AnyRedis
from worker.stream.names import Names, text

if TYPE_CHECKING:
    from worker.db.schema import Schema

HEARTBEAT_S: Final = 1.0
#: A record older than this is a worker that stopped without saying so (SIGKILL, a crash).
LIVE_S: Final = 3 * HEARTBEAT_S
#: Records older than this are deleted by whichever worker sees them.
FORGET_S: Final = 3600.0
_FIELD: Final = "worker:"
#: The field that holds the partition count P (DESIGN.md §11).
PARTITIONS: Final = "partitions"


@dataclass(frozen=True, slots=True)
class Offer:
    """What one worker would accept; equal offers answer every job the same way."""

    #: table -> its columns as ``name type`` (``*`` marks a writable one), in order.
    tables: dict[str, list[str]]
    settings: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def differences(self, other: Offer) -> list[str]:
        """What differs from ``other``, one short phrase each."""
        found = []
        if only := sorted(self.tables.keys() - other.tables.keys()):
            found.append(f"tables only here: {', '.join(only)}")
        if only := sorted(other.tables.keys() - self.tables.keys()):
            found.append(f"tables only there: {', '.join(only)}")
        shared = sorted(self.tables.keys() & other.tables.keys())
        if changed := [name for name in shared if self.tables[name] != other.tables[name]]:
            found.append(f"columns differ: {', '.join(changed)}")
        settings = sorted(self.settings.keys() | other.settings.keys())
        if changed := [name for name in settings
                       if self.settings.get(name) != other.settings.get(name)]:  # fmt: skip
            found.append("settings differ: " + ", ".join(f"WORKER_{name.upper()}"
                                                          for name in changed))  # fmt: skip
        return found


def offer(schema: Schema, policy: Policy, *, max_job_bytes: int) -> Offer:
    tables = {
        name: [f"{'*' if column in rules.writable else ''}{column} {rules.columns[column].type}"
               for column in sorted(rules.columns)]
        for name, rules in sorted(schema.tables.items())
    }  # fmt: skip
    settings = {"allow_all": policy.allow_all, "max_rows_default": policy.max_rows_default,
                "max_job_bytes": max_job_bytes}  # fmt: skip
    return Offer(tables=tables, settings=settings)


@dataclass(frozen=True, slots=True)
class Record:
    consumer: str
    offer: Offer
    fingerprint: str
    seen_s: float
    #: Replies this worker sent since it started, by ``ok`` or error code (the dashboard's
    #: replies by status; a worker started before this field carries none).
    answered: Mapping[str, int] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return time.time() - self.seen_s < LIVE_S


async def announce(
    redis: AnyRedis,
    names: Names,
    consumer: str,
    offered: Offer,
    answered: Mapping[str, int] | None = None,
) -> None:
    """Write (or refresh) this worker's record, and forget workers gone for long."""
    body = {"tables": offered.tables, "settings": offered.settings,
            "fingerprint": offered.fingerprint, "seen_s": time.time(),
            "answered": dict(answered or {})}  # fmt: skip
    await redis.hset(names.meta, _FIELD + consumer, json.dumps(body, separators=(",", ":")))
    if forgotten := [f"{_FIELD}{record.consumer}" for record in await records(redis, names)
                     if time.time() - record.seen_s > FORGET_S]:  # fmt: skip
        await redis.hdel(names.meta, *forgotten)


async def record_partitions(redis: AnyRedis, names: Names, partitions: int) -> int:
    """Record the partition count P if none is, and return the recorded one."""
    await redis.hsetnx(names.meta, PARTITIONS, partitions)
    return int(await redis.hget(names.meta, PARTITIONS) or partitions)


async def recorded_partitions(redis: AnyRedis, names: Names) -> int | None:
    found = await redis.hget(names.meta, PARTITIONS)
    return None if found is None else int(found)


async def withdraw(redis: AnyRedis, names: Names, consumer: str) -> None:
    await redis.hdel(names.meta, _FIELD + consumer)


async def records(redis: AnyRedis, names: Names) -> list[Record]:
    """Every worker record, the live and the gone, by consumer name."""
    found = []
    raw: Mapping[Any, Any] = await redis.hgetall(names.meta)
    for key, value in raw.items():
        name = text(key)
        if not name.startswith(_FIELD):
            continue
        try:
            body = json.loads(value)
            record = Record(consumer=name.removeprefix(_FIELD),
                            offer=Offer(tables=body["tables"], settings=body["settings"]),
                            fingerprint=str(body["fingerprint"]),
                            seen_s=float(body["seen_s"]),
                            answered=_counts(body.get("answered")))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue  # not ours to read; never a reason to fail
        found.append(record)
    return sorted(found, key=lambda record: record.consumer)


def _counts(found: Any) -> dict[str, int]:
    if not isinstance(found, dict):
        return {}
    return {str(key): value for key, value in found.items() if isinstance(value, int)}


def mismatches(mine: Record, others: list[Record]) -> list[str]:
    """One line per live worker whose offer differs from ``mine``."""
    return [
        f"worker {other.consumer} (fingerprint {other.fingerprint}) differs from "
        f"{mine.consumer} ({mine.fingerprint}): {'; '.join(mine.offer.differences(other.offer))}"
        for other in others
        if other.live and other.consumer != mine.consumer and other.fingerprint != mine.fingerprint
    ]
