"""Parsing stream entries into jobs: every rejection path, and the JSON Schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from worker.job.filters import MAX_DEPTH, AllOf, AnyOf, Compare, Negate
from worker.job.json_schema import job_json_schema
from worker.job.models import Job, Rejection, parse_entry, payload_hash

LIMIT = 65_536


def parse(job: Any, *, entry_id: str = "1-0") -> Job | Rejection:
    raw = job if isinstance(job, bytes) else json.dumps(job).encode()
    return parse_entry({b"job": raw}, entry_id=entry_id, max_job_bytes=LIMIT)


def job_of(document: Any) -> Job:
    parsed = parse(document)
    assert isinstance(parsed, Job), parsed
    return parsed


def rejection_of(document: Any) -> Rejection:
    parsed = parse(document)
    assert isinstance(parsed, Rejection), parsed
    return parsed


def test_single_job_parses_with_every_field() -> None:
    job = job_of({
        "id": "order-1234-paid", "table": "books", "set": {"genre": "sci-fi"}, "inc": {"stock": -1},
        "where": {"genre": "fiction", "book_price": {"lt": 100}}, "expect": {"max_rows": 1000},
        "returning": ["book_id"], "reply_to": "shop:replies", "dry_run": False,
    })  # fmt: skip
    assert job.id == "order-1234-paid"
    assert job.reply_to == "shop:replies"
    assert not job.batch
    (update,) = job.updates
    assert update.values == {"genre": "sci-fi"}
    assert update.where == AllOf(
        (Compare("genre", "eq", "fiction"), Compare("book_price", "lt", 100))
    )


def test_batch_job_keeps_its_updates_in_order() -> None:
    job = job_of({"id": "b", "updates": [
        {"table": "a", "set": {"x": 1}, "all": True},
        {"table": "b", "inc": {"y": 2}, "key": {"id": 3}},
    ]})  # fmt: skip
    assert job.batch
    assert [update.table for update in job.updates] == ["a", "b"]


def test_missing_id_falls_back_to_the_stream_entry_id() -> None:
    parsed = parse({"table": "t", "set": {"a": 1}, "all": True}, entry_id="1700000000000-7")
    assert isinstance(parsed, Job)
    assert parsed.id == "1700000000000-7"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"table": "t", "set": {"a": 1}, "all": True, "colour": 1}, "colour: Extra inputs"),
        ({"table": "t", "all": True}, "at least one of `set` and `inc`"),
        ({"table": "t", "set": {"a": 1}, "inc": {"a": 1}, "all": True}, "appear in both"),
        (
            {"table": "t", "set": {"a": 1}, "all": True, "where": {"a": 1}},
            "`all` cannot be combined",
        ),
        (
            {"table": "t", "set": {"a": 1}, "key": {"id": 1}, "where": {"a": 1}},
            "mutually exclusive",
        ),
        (
            {"table": "t", "set": {"a": 1}, "where": {"a": {"regex": "x"}}},
            "unknown operator `regex`",
        ),
        ({"table": "t", "set": {"a": 1}, "where": {"a": {"in": 3}}}, "`in` takes a list"),
        (
            {"table": "t", "set": {"a": 1}, "where": {"a": {"between": [1]}}},
            "`between` takes [low, high]",
        ),
        (
            {"table": "t", "set": {"a": 1}, "where": {"a": {"is_null": 1}}},
            "`is_null` takes true or false",
        ),
        ({"table": "t", "set": {"a": 1}, "where": {"a": {"like": 5}}}, "takes a string pattern"),
        ({"table": "t", "set": {"a": 1}, "where": {"or": []}}, "`or` takes a non-empty list"),
        ({"table": "t", "set": {"a": 1}, "where": {"or": [{}]}}, "empty filter is only allowed"),
        ({"table": "t", "set": {"a": 1}, "where": {"a": {}}}, "needs at least one operator"),
        (
            {"table": "t", "set": {"a": 1}, "where": {"a": {"in": list(range(10_001))}}},
            "over the limit of 10000",
        ),
        ({"table": "t", "set": {"a": 1}, "all": "yes"}, "all: Input should be a valid boolean"),
        ({"table": "t", "inc": {"a": "1"}, "all": True}, "inc.a"),
        ({"table": "t", "set": {"a": 1}, "all": True, "expect": {"rows": -1}}, "expect.rows"),
        ({"table": "t", "set": {"a": 1}, "all": True, "reply_to": "has space"}, "reply_to"),
        ({"updates": []}, "updates: List should have at least 1 item"),
        ({"updates": [{"table": "t", "set": {"a": 1}, "all": True}] * 101}, "at most 100 items"),
    ],
)
def test_invalid_jobs_are_rejected_with_a_reason(document: dict[str, Any], message: str) -> None:
    rejection = rejection_of({"id": "job-1", **document})
    assert rejection.error.code == "invalid_job"
    assert message in rejection.error.message
    assert rejection.id == "job-1"
    assert rejection.dead_letter_reason is None


def test_filter_depth_is_limited() -> None:
    where: dict[str, Any] = {"a": 1}
    for _ in range(MAX_DEPTH):
        where = {"not": where}
    rejection = rejection_of({"id": "deep", "table": "t", "set": {"a": 1}, "where": where})
    assert f"deeper than the limit of {MAX_DEPTH}" in rejection.error.message


def test_filter_shorthands_and_nesting() -> None:
    job = job_of({"table": "t", "set": {"a": 1}, "where": {
        "or": [{"a": None}, {"not": {"b": {"gte": 2, "lte": 5}}}], "c": {"in": [1, 2]},
    }})  # fmt: skip
    assert job.updates[0].where == AllOf((
        AnyOf((Compare("a", "is_null", True), Negate(AllOf((Compare("b", "gte", 2), Compare("b", "lte", 5)))))),
        Compare("c", "in", (1, 2)),
    ))  # fmt: skip


def test_empty_where_counts_as_no_filter() -> None:
    assert job_of({"table": "t", "set": {"a": 1}, "where": {}}).updates[0].where is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"other": b"x"}, "no `job` field"),
        ({b"job": b"\xff\xfe"}, "not UTF-8"),
        ({b"job": b"{not json"}, "not JSON"),
        ({b"job": b"[1, 2]"}, "not a JSON object"),
        ({b"job": b'{"a": NaN}'}, "not JSON"),
        ({b"job": b'{"id": "x", "id": "y"}'}, "duplicate key"),
        ({b"job": b"[" * 100_000}, "over WORKER_MAX_JOB_BYTES"),
        ({b"job": json.dumps({"id": "bad id!", "table": "t"}).encode()}, "`id` must be"),
    ],
)
def test_unparsable_entries_go_to_the_dead_letter_stream(
    fields: dict[bytes, bytes], reason: str
) -> None:
    parsed = parse_entry(fields, entry_id="5-0", max_job_bytes=LIMIT)
    assert isinstance(parsed, Rejection)
    assert parsed.dead_letter_reason is not None
    assert reason in parsed.dead_letter_reason
    assert parsed.id == "5-0"  # replied under the stream entry id


def test_too_deep_json_is_a_dead_letter_not_a_crash() -> None:
    parsed = parse_entry(
        {b"job": b"[" * 60_000 + b"]" * 60_000}, entry_id="6-0", max_job_bytes=200_000
    )
    assert isinstance(parsed, Rejection)
    assert parsed.dead_letter_reason is not None


def test_payload_hash_ignores_id_reply_to_and_key_order() -> None:
    first = {"id": "a", "reply_to": "x", "table": "t", "set": {"a": 1, "b": 2}, "all": True}
    second = {"all": True, "set": {"b": 2, "a": 1}, "table": "t", "id": "b"}
    assert payload_hash(first) == payload_hash(second)
    assert payload_hash(first) != payload_hash({**first, "set": {"a": 2, "b": 2}})


def test_json_schema_accepts_the_design_examples_and_refuses_unknown_fields() -> None:
    schema = job_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = [
        {"id": "order-1234-paid", "table": "books", "set": {"genre": "sci-fi"}, "inc": {"stock": -1},
         "where": {"genre": "fiction", "book_price": {"lt": 100}}, "expect": {"max_rows": 1000},
         "returning": ["book_id"], "reply_to": "shop:replies", "dry_run": False},
        {"table": "users", "key": {"id": 1}, "set": {"name": "John Doe", "age": 30}},
        {"id": "b", "updates": [{"table": "t", "set": {"a": 1}, "where": {"or": [{"a": None}, {"not": {"a": 1}}]}}]},
    ]  # fmt: skip
    for document in good:
        validator.validate(document)
        assert isinstance(parse(document), Job)
    bad = [
        {"table": "t", "set": {"a": 1}, "colour": "red"},
        {"table": "t", "set": {"a": 1}, "where": {"a": {"regex": "x"}}},
        {"id": "has space", "table": "t", "set": {"a": 1}},
    ]
    for document in bad:
        assert list(validator.iter_errors(document)), document
        assert isinstance(parse(document), Rejection)
