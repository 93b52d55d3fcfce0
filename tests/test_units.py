"""Entries -> units of work, and the paced window: pure, no services."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_compiler import schema
from worker.service import units as units_module
from worker.service.units import Pace, prepare, units
from worker.stream.names import Entry


def entry(document: Any, *, deliveries: int = 1, entry_id: str = "1-0") -> Entry:
    return Entry(id=entry_id, fields={b"job": json.dumps(document).encode()}, deliveries=deliveries)


def test_single_row_jobs_go_in_full_groups_and_everything_else_alone() -> None:
    allowed = schema()
    key_job = {"table": "items", "key": {"id": 1}, "inc": {"qty": 1}}
    works = [prepare(entry({**key_job, "id": f"k{n}"}), schema=allowed, max_job_bytes=65536, max_deliveries=5)
             for n in range(7)]  # fmt: skip
    others = [
        {"id": "filter", "table": "items", "inc": {"qty": 1}, "where": {"id": 1}},
        {"id": "dry", **key_job, "dry_run": True},
        {"id": "refused", "table": "nope", "key": {"id": 1}, "inc": {"qty": 1}},
        "not an object",
    ]
    works += [
        prepare(entry(other), schema=allowed, max_job_bytes=65536, max_deliveries=5)
        for other in others
    ]
    works.append(prepare(entry({**key_job, "id": "tired"}, deliveries=6), schema=allowed,
                         max_job_bytes=65536, max_deliveries=5))  # fmt: skip
    split = units(works, group_size=3)
    assert [len(unit) for unit in split] == [3, 3, 1, 1, 1, 1, 1, 1]
    assert all(work.groupable for unit in split if len(unit) > 1 for work in unit)
    assert [work.exhausted for unit in split for work in unit if len(unit) == 1].count(True) == 1
    # Stream order per order key: "dry" (items:1, not groupable) comes after the group that
    # holds the earlier items:1 job k6, which it closes; "filter" (order key items) need not.
    ids = [[work.job.id for work in unit] for unit in split]
    assert ids[2:5] == [["filter"], ["k6"], ["dry"]]


def test_the_window_follows_what_was_finished_lately_between_floor_and_ceiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(
        units_module, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])})
    )
    pace = Pace(floor=16, ceiling=400, horizon_s=0.25)
    assert pace.window() == 16
    pace.finished(120)
    pace.finished(200)
    assert pace.window() == 320
    pace.finished(500)
    assert pace.window() == 400
    now[0] += 0.3  # all of it is older than the horizon now
    assert pace.window() == 16
