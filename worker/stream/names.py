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

    def partition(self, number: int) -> str:
        """Partition ``number``'s stream; the ``{p<n>}`` tag keeps its keys in one slot."""
        return f"{self.prefix}:{{p{number}}}:jobs"

    def owner(self, number: int) -> str:
        """Partition ``number``'s lease: the owning worker's name, with a TTL."""
        return f"{self.prefix}:{{p{number}}}:owner"

    def moved(self, number: int) -> str:
        """The ingest mover's mark in partition ``number``: the last ingest entry id moved
        there, and the newest mover generation that wrote there (same slot as the stream)."""
        return f"{self.prefix}:{{p{number}}}:moved"

    @property
    def mover(self) -> str:
        """The ingest mover's lease, in the ingest stream's slot (its tag is the stream's
        whole name, which is what an untagged key hashes)."""
        return f"{{{self.stream}}}:mover"

    @property
    def mover_generation(self) -> str:
        return f"{{{self.stream}}}:mover-generation"

    @property
    def meta(self) -> str:
        """The deployment record: the workers serving this prefix (worker/stream/deployment.py)."""
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
    #: The partition stream it was read from (DESIGN.md §11).
    partition: int = 0
    #: Claimed at a takeover: its delivery is counted only when a worker starts it.
    claimed: bool = False

    @property
    def known_as(self) -> str:
        """The id a job without one of its own is known by: the id its producer's XADD
        returned, which for a moved entry is its ingest id (the ``src`` field)."""
        source = self.fields.get(b"src")
        return text(source) if source else self.id


@dataclass(frozen=True, slots=True)
class Claim:
    """What one XAUTOCLAIM took over from consumers that went quiet."""

    entries: list[Entry]
    #: Pending ids whose stream data was trimmed or deleted; Redis dropped them from the group.
    deleted: list[str]


def entry_ms(entry_id: str) -> int:
    """When an entry was added: the first part of its id, Redis's clock in milliseconds."""
    return int(entry_id.split("-", 1)[0])


def read_streams(response: Any) -> list[tuple[Any, Any]]:
    """XREAD's or XREADGROUP's reply as (stream, entries) pairs, under RESP2 or RESP3."""
    if not response:
        return []
    if isinstance(response, dict):
        return list(response.items())
    return [(stream, entries) for stream, entries in response]


def text(value: Any) -> str:
    """A Redis reply value (bytes, or str under decode_responses) as text; never raises."""
    return (
        value.decode("utf-8", errors="backslashreplace") if isinstance(value, bytes) else str(value)
    )


__all__ = ["Claim", "Entry", "Names", "entry_ms", "read_streams", "text"]
