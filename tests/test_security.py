"""Hostile input, offline: the parse-and-compile path against generated jobs, and the policy
settings (WORKER_ALLOW_ALL, WORKER_MAX_ROWS_DEFAULT) and limits. Pure: no I/O.

The property: whatever bytes arrive, parse_entry + compile_job either refuse them with an
error of the invalid-job family, or produce statements whose SQL names only identifiers of
the declared schema and carries every value as a bound parameter. Nothing else is raised.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite

from tests.test_compiler import job, schema
from worker.errors import WorkerError
from worker.job.compiler import compile_job
from worker.job.models import MAX_COLUMNS_PER_UPDATE, Job, parse_entry
from worker.job.plans import Policy

#: How many jobs the property test generates; `make test` runs the default.
EXAMPLES = int(os.environ.get("HOSTILE_JOBS", "10000"))
#: The codes a refused job may get: all of them say "this job is wrong", none "we broke".
REFUSALS = {"invalid_job", "unknown_table", "unknown_column", "forbidden_column",
            "missing_filter", "data_error"}  # fmt: skip
SCHEMA = schema()
IDENTIFIERS = set(SCHEMA.tables) | {
    column.name for rules in SCHEMA.tables.values() for column in rules.table.columns
}
#: The only words the compiler writes besides identifiers.
KEYWORDS = {"UPDATE", "SET", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "ILIKE", "BETWEEN", "IS",
            "NULL", "RETURNING", "lower", "SELECT", "FROM", "1"}  # fmt: skip
COLUMNS = sorted(IDENTIFIERS - set(SCHEMA.tables))
HOSTILE = ["'; DROP TABLE items; --", 'name" --', "qty' OR '1'='1", "update_worker_ledger",
           "items.qty", "\x00", "\u202e", "💥", "sqlite_master", "pg_catalog.pg_user", "*", "",
           "x" * 300, "%", "_", "\\", "$1", "?", ":name", "/*", "*/", "; SELECT 1"]  # fmt: skip
OPERATORS = ["eq", "neq", "gt", "gte", "lt", "lte", "in", "nin", "like", "nlike", "ilike",
             "nilike", "between", "regex", "exec", "and", "or", "not", ""]  # fmt: skip

names = st.one_of(st.sampled_from(COLUMNS), st.sampled_from(HOSTILE), st.text(max_size=12))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(HOSTILE),
    st.text(max_size=40), st.sampled_from(["2024-01-01", "2024-01-01T08:00:00", "1.50", "nan"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=3),
    max_leaves=8,
)
comparisons = st.one_of(
    values,
    st.dictionaries(st.sampled_from(OPERATORS), values, min_size=1, max_size=3),
    st.builds(lambda n: {"in": list(range(n))}, st.sampled_from([0, 1, 3, 10_000, 10_001])),
)
filters = st.recursive(
    st.dictionaries(names, comparisons, min_size=1, max_size=3),
    lambda inner: st.one_of(
        st.builds(lambda parts: {"and": parts}, st.lists(inner, max_size=3)),
        st.builds(lambda parts: {"or": parts}, st.lists(inner, max_size=3)),
        st.builds(lambda part: {"not": part}, inner),
        st.dictionaries(names, inner, min_size=1, max_size=2),
    ),
    max_leaves=12,
)
tables = st.one_of(st.sampled_from(sorted(SCHEMA.tables)), st.sampled_from(HOSTILE))
updates = st.fixed_dictionaries(
    {"table": tables},
    optional={
        "set": st.dictionaries(names, values, max_size=4),
        "inc": st.dictionaries(names, scalars, max_size=3),
        "where": filters,
        "key": st.dictionaries(names, scalars, max_size=2),
        "all": st.sampled_from([True, False, 1, "true"]),
        "expect": st.dictionaries(st.sampled_from(["rows", "min_rows", "max_rows", "x"]), scalars),
        "returning": st.lists(names, max_size=3),
        "id": st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE)),
        "reply_to": st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE)),
        "dry_run": st.sampled_from([True, False, "yes"]),
        "unknown": values,
    },
)


# Close to valid, so that most reach the compiler: real tables and columns, hostile values.
# Built once per table: a strategy made afresh at every draw is validated afresh, and that
# (its repr included) made the test take minutes under hypothesis 6.170.
@functools.cache
def _plausible(table: str) -> st.SearchStrategy[dict[str, Any]]:
    rules = SCHEMA.rules(table)
    columns = st.sampled_from(sorted(column.name for column in rules.table.columns))
    writable = st.sampled_from(sorted(rules.writable))
    fitting = scalars | st.integers(0, 9) | st.sampled_from(HOSTILE)  # most columns take these
    operand = scalars | st.lists(scalars, max_size=3)
    where = st.recursive(
        st.dictionaries(columns, scalars | st.dictionaries(st.sampled_from(OPERATORS[:13]), operand,
                                                           min_size=1, max_size=2),
                        min_size=1, max_size=3),
        lambda inner: st.builds(lambda parts: {"or": parts}, st.lists(inner, min_size=1, max_size=3))
        | st.builds(lambda part: {"not": part}, inner),
        max_leaves=8,
    )  # fmt: skip
    return st.fixed_dictionaries(
        {
            "table": st.just(table),
            "set": st.dictionaries(writable, fitting, min_size=1, max_size=3),
            "where": where,
        },
        optional={
            "returning": st.lists(columns, max_size=2, unique=True),
            "expect": st.fixed_dictionaries({}, optional={"max_rows": st.integers(0, 9)}),
            "id": st.sampled_from(["job-1", "a:b@c/d", *HOSTILE]),
        },
    )


plausible = st.sampled_from(sorted(SCHEMA.tables)).flatmap(_plausible)
documents = st.one_of(
    updates,
    plausible,
    plausible,
    st.builds(lambda batch: {"updates": batch}, st.lists(plausible, min_size=1, max_size=3)),
    st.builds(lambda batch: {"updates": batch}, st.lists(updates, max_size=4)),
    values,  # not even an object
)
raws = st.one_of(
    documents.map(lambda document: json.dumps(document).encode()),
    st.binary(max_size=200),
    st.builds(lambda depth: ("[" * depth + "]" * depth).encode(), st.integers(1, 5000)),
    st.builds(
        lambda depth: (
            '{"table":"items","set":{"qty":1},"where":'
            + '{"not":' * depth
            + '{"id":1}'
            + "}" * depth
            + "}"
        ).encode(),
        st.integers(1, 60),
    ),
    st.builds(
        lambda size: json.dumps(
            {"table": "items", "set": {"qty": 1}, "where": {"id": {"in": list(range(size))}}}
        ).encode(),
        st.sampled_from([10_000, 10_001, 20_000]),
    ),
)


# A bound parameter, with PostgreSQL's cast of it: %(s0)s::INTEGER, $1::TIMESTAMP WITH TIME ZONE
_PARAMETER = re.compile(
    r"(?:%\([^)]*\)s|\?|\$\d+)(?:::(?:TIMESTAMP WITH(?:OUT)? TIME ZONE|"
    r"DOUBLE PRECISION|[A-Z]+)(?:\([\d, ]+\))?(?:\[\])?)?"
)


def allowed_sql(statement: sa.Update, dialect: sa.Dialect) -> str | None:
    """Why the SQL of ``statement`` is not acceptable, or None when it is."""
    sql = str(statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}))
    if "'" in sql:
        return f"a literal in the SQL: {sql}"
    sql = re.sub(_PARAMETER, " ", sql)
    for word in re.findall(r'"([^"]*)"|([A-Za-z_][A-Za-z0-9_]*|\d+)', sql):
        token = word[0] or word[1]
        if token not in IDENTIFIERS and token not in KEYWORDS:
            return f"unexpected word {token!r} in {sql}"
    return None


def check(raw: bytes, policy: Policy) -> None:
    parsed = parse_entry({b"job": raw}, entry_id="1-0", max_job_bytes=65_536)
    if not isinstance(parsed, Job):
        assert parsed.error.code == "invalid_job", parsed
        event("dead letter" if parsed.dead_letter_reason else "refused: invalid_job")
        return
    try:
        plan = compile_job(parsed, SCHEMA, policy)
    except WorkerError as error:
        assert error.code in REFUSALS, error  # noqa: PT017 - a property, not one expected error
        event(f"refused: {error.code}")
        return
    event(f"compiled: {len(plan.statements)} statement(s)")
    for statement in plan.statements:
        for dialect in (postgresql.dialect(), sqlite.dialect()):  # type: ignore[no-untyped-call]
            assert allowed_sql(statement.update, dialect) is None


# 10,000 generated jobs take about a minute, most of it hypothesis's own drawing.
@pytest.mark.timeout(300)
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(raw=raws, allow_all=st.booleans(), cap=st.one_of(st.none(), st.integers(0, 5)))
def test_hostile_jobs_are_refused_or_compile_to_safe_sql(
    raw: bytes, allow_all: bool, cap: int | None
) -> None:
    check(raw, Policy(max_rows_default=cap, allow_all=allow_all))


def test_the_checker_itself_catches_a_foreign_identifier_and_a_literal() -> None:
    items = SCHEMA.rules("items").table
    dialect = sqlite.dialect()
    assert allowed_sql(sa.update(items).values(qty=1), dialect) is None
    foreign = sa.table("pg_user", sa.column("passwd"))
    assert allowed_sql(sa.update(foreign).values(passwd=None), dialect) is not None
    literal = sa.update(items).values(name=sa.literal_column("'x'"))
    assert allowed_sql(literal, dialect) is not None


def test_allow_all_false_refuses_an_unfiltered_update() -> None:
    document = {"table": "books", "set": {"genre": "x"}, "all": True}
    assert compile_job(job(document), SCHEMA).statements  # allowed by default
    with pytest.raises(WorkerError) as refused:
        compile_job(job(document), SCHEMA, Policy(allow_all=False))
    assert refused.value.code == "missing_filter"
    assert "WORKER_ALLOW_ALL=false" in refused.value.message


@pytest.mark.parametrize(("expect", "cap"), [
    (None, 5), ({"min_rows": 1}, 5), ({"max_rows": 50}, 50), ({"rows": 7}, None),
])  # fmt: skip
def test_max_rows_default_caps_only_jobs_without_a_cap_of_their_own(
    expect: dict[str, int] | None, cap: int | None
) -> None:
    document: dict[str, Any] = {"table": "books", "set": {"genre": "x"}, "where": {"genre": "y"}}
    if expect is not None:
        document["expect"] = expect
    (statement,) = compile_job(job(document), SCHEMA, Policy(max_rows_default=5)).statements
    assert statement.guards.max_rows == cap


def test_too_many_columns_name_the_limit() -> None:
    columns = {f"c{index}": 1 for index in range(MAX_COLUMNS_PER_UPDATE + 1)}
    raw = json.dumps({"table": "items", "set": columns, "all": True}).encode()
    parsed = parse_entry({b"job": raw}, entry_id="1-0", max_job_bytes=65_536)
    assert not isinstance(parsed, Job)
    assert parsed.error.code == "invalid_job"
    assert f"over the limit of {MAX_COLUMNS_PER_UPDATE} per update" in parsed.error.message


def test_inc_on_a_float_column_compiles() -> None:
    (statement,) = compile_job(job({"table": "items", "inc": {"weight": 0.5}, "key": {"id": 1}}),
                               SCHEMA).statements  # fmt: skip
    assert "weight" in str(statement.update)
