"""The Redis names and the stream entries the transport hands out: plain data, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Names:
    """Every Redis name derives from one prefix; ``{updates}`` keeps a cluster in one slot."""

    prefix: str = "updates"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def replies(self) -> str:
        return f"{self.prefix}:replies"

    def result(self, job_id: str) -> str:
        return f"{self.prefix}:result:{job_id}"


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    fields: Mapping[bytes, bytes]
    #: How many times the group has handed this entry out, this time included.
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class Claim:
    """What one XAUTOCLAIM took over from consumers that went quiet."""

    entries: list[Entry]
    #: Pending ids whose stream data was trimmed or deleted; Redis dropped them from the group.
    deleted: list[str]


__all__ = ["Claim", "Entry", "Names"]
