"""Lanes (DESIGN.md §11): inside a worker, jobs with the same order key run one after another,
in stream order; jobs with different keys run at once.

Units of work (a group, or one entry) are registered in stream order. A unit waits for the
last unit registered before it on each of its order keys, and becomes the last one on each.
The waits form chains per key, so a job held up (a lock, a transient failure being retried)
holds up its own keys only, never the partition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

Waiter = asyncio.Future[None]


class Lanes:
    def __init__(self) -> None:
        self._last: dict[str, Waiter] = {}

    def enter(self, keys: Collection[str]) -> tuple[list[Waiter], Waiter]:
        """Register a unit on ``keys``: what it must wait for, and its own completion, which
        the caller resolves with :meth:`leave`."""
        done: Waiter = asyncio.get_running_loop().create_future()
        before = {self._last[key] for key in keys if key in self._last}
        for key in keys:
            self._last[key] = done
        return list(before), done

    def leave(self, keys: Collection[str], done: Waiter) -> None:
        if not done.done():
            done.set_result(None)
        for key in keys:
            if self._last.get(key) is done:
                del self._last[key]

    def __len__(self) -> int:
        """Order keys with a unit registered (running or waiting)."""
        return len(self._last)
