"""Redis names, the stream entries the transport hands out, and reading Redis values: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
    def meta(self) -> str:
        """The deployment record: the workers serving this prefix (worker/deployment.py)."""
        return f"{self.prefix}:meta"

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


def entry_ms(entry_id: str) -> int:
    """When an entry was added: the first part of its id, Redis's clock in milliseconds."""
    return int(entry_id.split("-", 1)[0])


def text(value: Any) -> str:
    """A Redis reply value (bytes, or str under decode_responses) as text; never raises."""
    return (
        value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else str(value)
    )


__all__ = ["Claim", "Entry", "Names", "entry_ms", "text"]
