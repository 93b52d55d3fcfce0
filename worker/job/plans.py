"""What the compiler makes (worker/job/compiler.py): plans of statements, with their row-count
guards, and the deployment's policy. Pure data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import sqlalchemy as sa

from worker.errors import ExpectationFailed
from worker.job.replies import UpdateResult
from worker.job.values import to_json


@dataclass(frozen=True, slots=True)
class Guards:
    """The ``expect`` row-count guards, checked inside the transaction."""

    rows: int | None = None
    min_rows: int | None = None
    max_rows: int | None = None
    #: ``max_rows`` is WORKER_MAX_ROWS_DEFAULT's, not the job's: a refusal by it is this
    #: worker's setting speaking, so it is replied but not recorded.
    max_rows_by_policy: bool = False

    def violation(self, rowcount: int) -> str | None:
        if self.rows is not None and rowcount != self.rows:
            return f"expected exactly {self.rows} row(s), matched {rowcount}"
        if self.min_rows is not None and rowcount < self.min_rows:
            return f"expected at least {self.min_rows} row(s), matched {rowcount}"
        if self.max_rows is not None and rowcount > self.max_rows:
            cap = " (WORKER_MAX_ROWS_DEFAULT)" if self.max_rows_by_policy else ""
            return f"expected at most {self.max_rows} row(s){cap}, matched {rowcount}"
        return None

    def refusal(self, rowcount: int, *, label: str) -> ExpectationFailed | None:
        """The error for ``rowcount``, or None when the guards accept it."""
        violation = self.violation(rowcount)
        if violation is None:
            return None
        by_policy = self.max_rows_by_policy and violation.startswith("expected at most")
        return ExpectationFailed(f"{label}: {violation}; rolled back", recorded=not by_policy)


@dataclass(frozen=True, slots=True)
class OrmUpdate:
    """An update for the unit-of-work path (worker/db/orm.py): what to load and assign."""

    cls: type
    #: Which rows: the ``where`` filter; None for ``all``, and for a key job (its statement's
    #: ``row`` holds the key).
    condition: Any
    #: Column name -> value (coerced) and column name -> amount.
    sets: Mapping[str, Any]
    incs: Mapping[str, Any]
    returning: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Statement:
    table: str
    update: sa.Update
    returns_rows: bool
    guards: Guards
    #: ``(table, *primary key values)`` when the statement touches one row by its key: a group
    #: commit orders its jobs by it, puts a second job on one row in a later round, and
    #: matches the keys its UPDATE returns to the jobs (worker/db/bulk.py).
    row: tuple[Any, ...] | None = None
    #: Values for the statement's bound parameters (a cached, shared statement needs them).
    params: Mapping[str, Any] = field(default_factory=dict)
    #: For a one-row-by-key statement: ``(table, sets, incs, keys, returning)`` column names,
    #: so that jobs of one shape can also run as one UPDATE ... FROM (VALUES ...).
    shape: tuple[Any, ...] | None = None
    #: Set when the table's mapped class runs through the unit of work (WORKER_ORM): then
    #: ``update`` is not run, and nothing groups or folds the statement.
    orm: OrmUpdate | None = None

    def outcome(
        self,
        rowcount: int,
        rows: Sequence[Mapping[Any, Any]] | None,
        *,
        max_returning: int,
        label: str,
    ) -> UpdateResult:
        """The statement's result from what the database said (``rows`` when it returns
        rows), or :class:`ExpectationFailed` when its guards refuse the row count."""
        if refusal := self.guards.refusal(rowcount, label=label):
            raise refusal
        if rows is None:
            if 0 <= rowcount < len(_COUNTED):
                return _COUNTED[rowcount]
            return UpdateResult(rowcount=rowcount)
        returning = [{name: to_json(value) for name, value in row.items()}
                     for row in rows[:max_returning]]  # fmt: skip
        return UpdateResult(rowcount=rowcount, returning=returning)


#: The results of statements that return no rows and matched 0 or 1 (one-row jobs): built once.
_COUNTED: Final = (UpdateResult(rowcount=0), UpdateResult(rowcount=1))


@dataclass(frozen=True, slots=True)
class Policy:
    """Deployment-wide rules on top of each job's own (DESIGN.md §6)."""

    #: ``WORKER_MAX_ROWS_DEFAULT``: the ``expect.max_rows`` of a job that sets no cap itself.
    max_rows_default: int | None = None
    #: ``WORKER_ALLOW_ALL``: whether ``"all": true`` (no filter at all) is accepted.
    allow_all: bool = True


#: The policy of a deployment that sets none.
DEFAULT_POLICY: Final = Policy()


@dataclass(frozen=True, slots=True)
class Plan:
    statements: tuple[Statement, ...]
