"""The compiler is pure: compile against both dialects and look at the SQL and its parameters."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tests.tables import items
from worker.db.ledger import ledger
from worker.db.schema import Schema, build_schema
from worker.demo import books, users
from worker.errors import WorkerError
from worker.job.compiler import compile_job
from worker.job.models import Job, parse_entry

DIALECTS: list[sa.Dialect] = [postgresql.dialect(), sqlite.dialect()]  # type: ignore[no-untyped-call]


def schema(**narrowing: Any) -> Schema:
    metadata = sa.MetaData()
    for table in (books, users, items, ledger):
        table.to_metadata(metadata)
    return build_schema(metadata, **narrowing)


def job(document: dict[str, Any]) -> Job:
    parsed = parse_entry(
        {b"job": json.dumps(document).encode()}, entry_id="1-0", max_job_bytes=65536
    )
    assert isinstance(parsed, Job), parsed
    return parsed


def compiled(
    document: dict[str, Any], dialect: sa.Dialect, **narrowing: Any
) -> tuple[str, dict[str, Any]]:
    (statement,) = compile_job(job(document), schema(**narrowing)).statements
    result = statement.update.compile(dialect=dialect)
    return str(result), {**result.params, **statement.params}  # a cached statement binds late


def refused(document: dict[str, Any], **narrowing: Any) -> WorkerError:
    with pytest.raises(WorkerError) as caught:
        compile_job(job(document), schema(**narrowing))
    return caught.value


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_set_based_seed_update(dialect: sa.Dialect) -> None:
    sql, params = compiled(
        {"table": "books", "set": {"genre": "sci-fi"}, "where": {"genre": "fiction"}}, dialect
    )
    assert sql.startswith("UPDATE books SET genre=")
    assert "WHERE books.genre = " in sql
    assert sorted(params.values()) == ["fiction", "sci-fi"]
    assert "fiction" not in sql


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_key_inc_and_returning(dialect: sa.Dialect) -> None:
    document = {
        "table": "items",
        "key": {"id": 2},
        "inc": {"qty": 3, "price": 0.5},
        "returning": ["id", "qty"],
    }
    sql, params = compiled(document, dialect)
    assert "qty=(items.qty + " in sql
    assert sql.endswith(("RETURNING items.id, items.qty", "RETURNING id, qty"))
    assert Decimal("0.5") in params.values()
    (statement,) = compile_job(job(document), schema()).statements
    assert statement.guards.max_rows == 1
    assert statement.returns_rows


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_every_operator_compiles_to_bound_parameters(dialect: sa.Dialect) -> None:
    where = {
        "name": {"like": "A%", "nlike": "%z", "ilike": "a%", "nilike": "%Q"},
        "qty": {"gt": 1, "gte": 1, "lt": 99, "lte": 99, "neq": 50, "between": [0, 100]},
        "id": {"in": [1, 2], "nin": [9]},
        "tag": {"is_null": False, "eq": "fruit"},
        "or": [{"active": True}, {"not": {"born": {"lt": "2024-02-01"}}}],
    }
    sql, _ = compiled({"table": "items", "set": {"tag": "x"}, "where": where}, dialect)
    for literal in ("A%", "fruit", "2024-02-01"):
        assert literal not in sql
    assert "NOT IN" in sql
    assert "BETWEEN" in sql
    assert "IS NOT NULL" in sql
    assert " OR " in sql


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_hostile_values_never_reach_the_sql_text(dialect: sa.Dialect) -> None:
    hostile = "x'); DROP TABLE books; --\x00"
    sql, params = compiled(
        {"table": "books", "set": {"book_name": hostile}, "where": {"genre": hostile}}, dialect
    )
    assert "DROP" not in sql
    assert list(params.values()).count(hostile) == 2


@pytest.mark.parametrize(
    ("document", "code", "message"),
    [
        ({"table": "nope", "set": {"a": 1}, "all": True}, "unknown_table", "`nope`"),
        (
            {"table": "update_worker_ledger", "set": {"reply": "x"}, "all": True},
            "unknown_table",
            "ledger",
        ),
        ({"table": "books", "set": {"nope": 1}, "all": True}, "unknown_column", "`nope`"),
        (
            {"table": "books", "set": {"genre": "x"}, "where": {"nope": 1}},
            "unknown_column",
            "`nope`",
        ),
        (
            {"table": "books", "set": {"genre": "x"}, "all": True, "returning": ["nope"]},
            "unknown_column",
            "`nope`",
        ),
        ({"table": "books", "set": {"book_id": 9}, "all": True}, "forbidden_column", "primary-key"),
        ({"table": "books", "set": {"genre": "x"}}, "missing_filter", "all"),
        ({"table": "books", "set": {"genre": "x"}, "where": {}}, "missing_filter", "all"),
        ({"table": "books", "inc": {"genre": 1}, "all": True}, "invalid_job", "numeric column"),
        (
            {"table": "books", "set": {"genre": "x"}, "key": {"genre": "x"}},
            "invalid_job",
            "whole primary key",
        ),
        (
            {"table": "books", "set": {"genre": "x"}, "key": {"book_id": None}},
            "invalid_job",
            "cannot be null",
        ),
        (
            {"table": "books", "set": {"genre": "x"}, "where": {"book_id": {"like": "1%"}}},
            "invalid_job",
            "text column",
        ),
        (
            {"table": "books", "set": {"book_price": "cheap"}, "all": True},
            "data_error",
            "books.book_price",
        ),
        (
            {"table": "items", "set": {"qty": 1}, "where": {"born": "soon"}},
            "data_error",
            "items.born",
        ),
        ({"table": "items", "inc": {"qty": 1.5}, "all": True}, "data_error", "items.qty"),
    ],
)
def test_refusals_name_the_problem(document: dict[str, Any], code: str, message: str) -> None:
    error = refused(document)
    assert error.code == code
    assert message in error.message


def test_narrowing_by_settings() -> None:
    assert (
        refused({"table": "users", "set": {"name": "x"}, "all": True}, tables=["books"]).code
        == "unknown_table"
    )
    error = refused(
        {"table": "books", "set": {"genre": "x"}, "all": True}, readonly_columns=["books.genre"]
    )
    assert (error.code, "read-only" in error.message) == ("forbidden_column", True)
    sql, _ = compiled({"table": "books", "set": {"book_id": 9}, "key": {"book_id": 1}}, sqlite.dialect(),
                      writable_keys=["books.book_id"])  # fmt: skip
    assert "SET book_id=" in sql


def test_a_batch_error_names_the_failing_update() -> None:
    document = {
        "updates": [
            {"table": "books", "set": {"genre": "x"}, "all": True},
            {"table": "nope", "set": {"a": 1}, "all": True},
        ]
    }
    error = refused(document)
    assert error.message.startswith("updates[1]: ")


@pytest.mark.parametrize(
    ("narrowing", "variable"),
    [({"tables": ["nope"]}, "WORKER_TABLES"), ({"readonly_columns": ["books"]}, "WORKER_READONLY_COLUMNS"),
     ({"writable_keys": ["books.nope"]}, "WORKER_WRITABLE_KEYS")],
)  # fmt: skip
def test_bad_narrowing_settings_name_the_variable(narrowing: dict[str, Any], variable: str) -> None:
    with pytest.raises(Exception, match=variable):
        schema(**narrowing)


def test_jobs_of_one_shape_share_one_statement_and_differ_only_in_parameters() -> None:
    allowed = schema()
    first, second = (
        compile_job(
            job({"table": "items", "key": {"id": n}, "inc": {"qty": n}, "set": {"tag": f"t{n}"}}),
            allowed,
        ).statements[0]
        for n in (1, 2)
    )
    assert first.update is second.update  # built once per shape, compiled once by SQLAlchemy
    assert first.params == {"s0": "t1", "i0": 1, "k0": 1}
    assert second.params == {"s0": "t2", "i0": 2, "k0": 2}
    assert (first.row, second.row) == (("items", 1), ("items", 2))
