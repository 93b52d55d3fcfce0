"""One-row-by-key updates compiled once per shape (worker/job/shapes.py): a job compiled from
the cache is the job compiled afresh, and it is refused the same way. Pure: no database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tests.tables import items
from worker.db.schema import Schema, build_schema
from worker.errors import WorkerError
from worker.job import compiler, shapes
from worker.job.compiler import compile_job
from worker.job.models import Job, parse_entry
from worker.job.plans import DEFAULT_POLICY, Policy, Statement


@pytest.fixture(autouse=True)
def empty_cache() -> Iterator[None]:
    shapes._known.clear()
    yield
    shapes._known.clear()


def schema(**narrowing: Any) -> Schema:
    metadata = sa.MetaData()
    items.to_metadata(metadata)
    return build_schema(metadata, **narrowing)


def job(document: dict[str, Any]) -> Job:
    parsed = parse_entry({b"job": json.dumps(document).encode()}, entry_id="1-0",
                         max_job_bytes=65536)  # fmt: skip
    assert isinstance(parsed, Job), parsed
    return parsed


def statement(
    document: dict[str, Any], rules: Schema, policy: Policy = DEFAULT_POLICY
) -> Statement:
    (compiled,) = compile_job(job(document), rules, policy).statements
    return compiled


def fresh(document: dict[str, Any], rules: Schema, policy: Policy = DEFAULT_POLICY) -> Statement:
    shapes._known.clear()
    return statement(document, rules, policy)


JOBS: list[dict[str, Any]] = [
    {"table": "items", "inc": {"qty": 2}, "key": {"id": 7}},
    {"table": "items", "set": {"price": "12.345", "born": "2024-05-06"}, "key": {"id": 8}},
    {"table": "items", "set": {"tag": "x", "active": True}, "inc": {"weight": 0.5},
     "key": {"id": 9}, "returning": ["qty", "tag"], "expect": {"rows": 1}},
    {"table": "items", "set": {"name": "n"}, "key": {"id": 10}, "expect": {"max_rows": 0}},
]  # fmt: skip


@pytest.mark.parametrize("document", JOBS, ids=range(len(JOBS)))
def test_a_job_compiled_from_its_shape_is_the_job_compiled_afresh(
    document: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = schema()
    statement(document, rules)  # the first of its shape
    assert shapes._known, "the shape was kept"
    follower = {**document, "key": {"id": 41}}
    with monkeypatch.context() as patched:  # the fresh path is not taken
        patched.setattr(compiler, "_key_values", lambda *_: pytest.fail("compiled afresh"))
        cached = statement(follower, rules)
    assert cached == fresh(follower, rules)
    assert cached.row == ("items", 41)
    assert cached.params["k0"] == 41


def test_each_job_binds_its_own_values_and_the_first_is_untouched() -> None:
    rules = schema()
    first = statement({"table": "items", "set": {"qty": 1}, "key": {"id": 1}}, rules)
    second = statement({"table": "items", "set": {"qty": 2}, "key": {"id": 2}}, rules)
    assert (first.params, first.row) == ({"s0": 1, "k0": 1}, ("items", 1))
    assert (second.params, second.row) == ({"s0": 2, "k0": 2}, ("items", 2))
    assert second.update is first.update


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"table": "items", "set": {"qty": "many"}, "key": {"id": 2}}, "is not a valid int"),
        ({"table": "items", "set": {"qty": 3}, "key": {"id": None}}, "cannot be null"),
        ({"table": "items", "set": {"qty": 3}, "key": {"id": "x"}}, "is not a valid int"),
    ],
)
def test_a_job_of_a_known_shape_is_refused_as_a_fresh_compile_refuses_it(
    document: dict[str, Any], message: str
) -> None:
    rules = schema()
    statement({"table": "items", "set": {"qty": 1}, "key": {"id": 1}}, rules)
    with pytest.raises(WorkerError) as cached:
        statement(document, rules)
    with pytest.raises(WorkerError) as afresh:
        fresh(document, rules)
    assert (cached.value.code, cached.value.message) == (afresh.value.code, afresh.value.message)
    assert message in cached.value.message


def test_another_schema_or_policy_never_reuses_a_shape() -> None:
    document = {"table": "items", "set": {"tag": "t"}, "key": {"id": 1}}
    statement(document, schema())
    with pytest.raises(WorkerError, match="read-only"):
        statement(document, schema(readonly_columns=["items.tag"]))
    capped = statement({**document, "key": {"id": 2}}, schema(), Policy(max_rows_default=0))
    assert capped.guards.max_rows == 0


def test_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shapes, "_MOST", 3)
    rules = schema()
    for column, value in (("qty", 1), ("name", "n"), ("tag", "t"), ("weight", 1.5), ("price", 2)):
        statement({"table": "items", "set": {column: value}, "key": {"id": 1}}, rules)
        assert 0 < len(shapes._known) <= 3


@pytest.mark.parametrize("rowcount", [-1, 0, 1, 2, 7])
def test_a_statement_without_returning_reports_the_row_count_it_was_given(rowcount: int) -> None:
    document = {"table": "items", "set": {"qty": 1}, "where": {"qty": 0}}
    result = statement(document, schema()).outcome(rowcount, None, max_returning=10, label="t")
    assert (result.rowcount, result.returning) == (rowcount, None)
