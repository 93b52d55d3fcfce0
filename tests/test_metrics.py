"""The metrics themselves, without a worker: the duration histogram's buckets, and a group's
replies counted at once exactly as one reply at a time."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.errors import JobTimeout
from worker.job.replies import Reply, UpdateResult
from worker.ops.metrics import Metrics


def series(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for sample in family.samples}  # fmt: skip


def test_histogram_buckets_are_inclusive_cumulative_and_end_at_infinity() -> None:
    metrics = Metrics()
    for seconds in (0.0, 0.0005, 0.0006, 1.0, 60.0, 61.0):
        metrics.duration.phases["execution"].observe(seconds)
    found = series(metrics)

    def bucket(bound: str) -> float:
        key = ("update_worker_job_duration_seconds_bucket", (("le", bound), ("phase", "execution")))
        return found[key]

    assert bucket("0.0005") == 2  # 0 and 0.0005 itself: le is "less than or equal"
    assert bucket("0.001") == 3
    assert bucket("1.0") == 4
    assert bucket("60.0") == 5
    assert bucket("+Inf") == 6
    execution = (("phase", "execution"),)
    assert found["update_worker_job_duration_seconds_count", execution] == 6
    assert found["update_worker_job_duration_seconds_sum", execution] == pytest.approx(122.0011)
    assert found["update_worker_job_duration_seconds_count", (("phase", "queue"),)] == 0


def test_queue_waits_are_measured_from_each_entry_stamp() -> None:
    metrics = Metrics()
    metrics.queued(0, 2**62)  # far in the past; in the future (a skewed clock) counts as 0
    found = series(metrics)
    queue = (("phase", "queue"),)
    assert found["update_worker_job_duration_seconds_count", queue] == 2
    assert found["update_worker_job_duration_seconds_bucket", (("le", "0.0005"), *queue)] == 1
    assert found["update_worker_job_duration_seconds_bucket", (("le", "60.0"), *queue)] == 1


def test_a_group_counts_exactly_as_its_replies_one_by_one() -> None:
    parts = [UpdateResult(rowcount=1), UpdateResult(rowcount=2)]
    replies = [
        (Reply(id="a", status="ok", rowcount=1, duration_ms=2.0), ["items"]),
        (Reply(id="b", status="ok", rowcount=0, duration_ms=0.4), ["items"]),
        (
            Reply(id="c", status="ok", rowcount=3, results=parts, duration_ms=1.0),
            ["items", "books"],
        ),
        (Reply(id="d", status="ok", rowcount=1, replayed=True, duration_ms=0.1), ["items"]),
        (Reply.failure("e", JobTimeout("slow"), duration_ms=5.0), ["items"]),
        (Reply.failure("f", JobTimeout("slow")), []),
    ]
    one_by_one, grouped = Metrics(), Metrics()
    for reply, tables in replies:
        one_by_one.answered(reply, tables)
    grouped.answered_many(replies)
    assert series(grouped) == series(one_by_one)
    found = series(grouped)
    assert found["update_worker_jobs_total", (("status", "ok"), ("table", "items"))] == 3
    assert found["update_worker_jobs_total", (("status", "ok"), ("table", "(several)"))] == 1
    assert found["update_worker_jobs_total", (("status", "timeout"), ("table", "(none)"))] == 1
    assert found["update_worker_rows_updated_total", (("table", "items"),)] == 2  # not d's
    assert found["update_worker_rows_updated_total", (("table", "books"),)] == 2
    assert found["update_worker_job_duration_seconds_count", (("phase", "execution"),)] == 5
    assert grouped.answered_by_status() == {"ok": 4, "timeout": 2}
