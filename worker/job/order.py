"""Order keys and partitions (DESIGN.md §11). Pure: no I/O.

A job's order key is its ``order_key`` when given. Otherwise, for a job with one update that
has ``key``: ``<table>:<v1>:<v2>…``, the key's values in the alphabetical order of their
column names, a string as it is and any other value as its compact JSON; for every other job
(``where``, ``all``, a batch): the table of its first update. Its partition is
``crc32(order key as UTF-8) mod P``, with zlib's CRC-32, which every language has.

The same functions serve the worker (from a parsed job) and the ingest mover (from the raw
JSON, before any validation), so both always agree on where a job belongs.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, Final

#: WORKER_PARTITIONS' default.
DEFAULT_PARTITIONS: Final = 16

_DECODER: Final = json.JSONDecoder()


def derive_order_key(document: Mapping[str, Any]) -> str | None:
    """The order key of a job given as its JSON object; None when it has none to derive
    (not a job at all: the caller then places it by its entry id)."""
    given = document.get("order_key")
    if isinstance(given, str):
        return given
    updates = document.get("updates")
    if isinstance(updates, list):
        first = updates[0] if updates else None
        table = first.get("table") if isinstance(first, dict) else None
        return table if isinstance(table, str) else None
    table, key = document.get("table"), document.get("key")
    if not isinstance(table, str):
        return None
    if isinstance(key, dict) and key:
        if len(key) == 1:  # the usual key, one column: nothing to sort
            (value,) = key.values()
            return f"{table}:{_part(value)}"
        return ":".join([table, *(_part(key[name]) for name in sorted(key))])
    return table


def partition_of(order_key: str, partitions: int) -> int:
    """The partition of ``order_key`` among ``partitions``."""
    return zlib.crc32(order_key.encode("utf-8", errors="surrogatepass")) % partitions


def partition_of_raw(raw: bytes, *, fallback: str, partitions: int) -> int:
    """The partition of a stream entry's raw ``job`` bytes; an entry that is no JSON object
    (it will be dead-lettered by whoever serves it) goes by ``fallback``, its entry id."""
    try:
        # As the worker reads a job (UTF-8 text); an entry either refuses goes by ``fallback``.
        document = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        document = None
    order_key = derive_order_key(document) if isinstance(document, dict) else None
    return partition_of(order_key if order_key is not None else fallback, partitions)


def _part(value: Any) -> str:
    if isinstance(value, str):
        return value
    if type(value) is int:  # its compact JSON, without json.dumps's cost (bool is not int here)
        return str(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
