"""The worker process's collector settings (worker/service/heap.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.service import heap


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored")
def test_settle_freezes_start_up_objects_and_widens_the_young_generation() -> None:
    gc.unfreeze()
    built_at_start_up = [{"n": index} for index in range(1000)]
    heap.settle()
    assert gc.get_threshold() == heap.THRESHOLDS
    assert gc.get_freeze_count() >= len(built_at_start_up)


@pytest.mark.usefixtures("restored")
def test_a_cycle_made_after_settle_is_still_collected() -> None:
    heap.settle()

    class Node:
        other: object = None

    first, second = Node(), Node()
    first.other, second.other = second, first
    del first, second
    assert gc.collect() >= 2
