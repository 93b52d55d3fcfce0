"""The tables and columns a job may touch (DESIGN.md §5).

Built once at start-up, by reflecting the database or from the application's own models, then
narrowed by ``WORKER_TABLES``, ``WORKER_READONLY_COLUMNS`` and ``WORKER_WRITABLE_KEYS``. Every
identifier a job names is looked up here by exact membership; nothing else reaches SQL.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapper

from worker.db.fencing import PARTITIONS_TABLE
from worker.db.ledger import LEDGER_TABLE
from worker.errors import ForbiddenColumn, SettingsError, UnknownColumn, UnknownTable

#: The worker's own tables: never offered to jobs (a job could otherwise rewrite a verdict or
#: a partition's fencing generation).
OWN_TABLES = frozenset({LEDGER_TABLE, PARTITIONS_TABLE})


@dataclass(frozen=True, slots=True)
class TableRules:
    """One allowed table: its columns by database name, and which of them a job may set."""

    table: sa.Table
    columns: Mapping[str, sa.Column[Any]]
    writable: frozenset[str]
    primary_key: tuple[str, ...]
    #: The mapped class whose jobs run through the unit of work (WORKER_ORM), if any.
    mapped: type | None = None

    def column(self, name: str) -> sa.Column[Any]:
        try:
            return self.columns[name]
        except KeyError:
            raise UnknownColumn(f"table `{self.table.name}` has no column `{name}`") from None

    def writable_column(self, name: str) -> sa.Column[Any]:
        column = self.column(name)
        if name not in self.writable:
            why = "a primary-key column" if name in self.primary_key else "read-only"
            raise ForbiddenColumn(f"column `{self.table.name}.{name}` is {why} and may not be set")
        return column


@dataclass(frozen=True, slots=True)
class Schema:
    tables: Mapping[str, TableRules]

    def rules(self, name: str) -> TableRules:
        try:
            return self.tables[name]
        except KeyError:
            raise UnknownTable(f"table `{name}` is not one the worker may update") from None


def build_schema(
    metadata: sa.MetaData,
    *,
    tables: Sequence[str] = (),
    readonly_columns: Sequence[str] = (),
    writable_keys: Sequence[str] = (),
) -> Schema:
    """Apply the settings' narrowing to ``metadata``; a name that does not exist is an error."""
    available = {
        table.fullname: table for table in metadata.tables.values() if table.name not in OWN_TABLES
    }
    if missing := sorted(set(tables) - available.keys()):
        raise SettingsError(
            f"WORKER_TABLES: no such table (or none the role may UPDATE): {', '.join(missing)}"
        )
    chosen = {name: available[name] for name in (tables or sorted(available))}
    readonly = _qualified_columns("WORKER_READONLY_COLUMNS", readonly_columns, available)
    keys = _qualified_columns("WORKER_WRITABLE_KEYS", writable_keys, available)
    return Schema({name: _rules(table, readonly, keys) for name, table in chosen.items()})


def through_orm(schema: Schema, mapped: Mapping[str, type]) -> Schema:
    """``schema`` with the jobs on ``mapped``'s tables (table -> class) routed through the
    unit of work (worker/db/orm.py)."""
    return Schema({name: dataclasses.replace(rules, mapped=mapped.get(name))
                   for name, rules in schema.tables.items()})  # fmt: skip


async def reflect_schema(engine: AsyncEngine, **narrowing: Sequence[str]) -> Schema:
    """Reflect the database's default schema (once, at start-up) and narrow it.

    On PostgreSQL only the tables the worker's role may UPDATE are taken: a job naming any
    other is ``unknown_table``, refused by the worker before the database is asked.
    """
    metadata = sa.MetaData()

    def reflect(connection: sa.Connection) -> None:
        updatable = None
        if connection.dialect.name == "postgresql":
            updatable = set(connection.execute(_UPDATABLE).scalars())
        metadata.reflect(
            connection,
            only=lambda name, _: (
                name not in OWN_TABLES and (updatable is None or name in updatable)
            ),
            resolve_fks=False,  # a referenced table is not thereby a table jobs may update
        )

    async with engine.connect() as connection:
        await connection.run_sync(reflect)
    return build_schema(metadata, **narrowing)


_UPDATABLE = sa.text(
    "SELECT c.relname FROM pg_catalog.pg_class c"
    " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')"
    " AND has_table_privilege(c.oid, 'UPDATE')"
)


def load_models(spec: str) -> sa.MetaData:
    """``package.module:Base`` (a declarative base) or ``package.module:metadata``."""
    found = _load(spec)
    metadata = found if isinstance(found, sa.MetaData) else getattr(found, "metadata", None)
    if not isinstance(metadata, sa.MetaData):
        raise SettingsError(f"WORKER_MODELS: {spec!r} is neither a declarative base nor a MetaData")
    return metadata


def load_mappers(spec: str) -> list[Mapper[Any]]:
    """The mapped classes of ``spec``'s declarative base (none for a plain MetaData)."""
    registry = getattr(_load(spec), "registry", None)
    return sorted(registry.mappers, key=lambda mapper: mapper.class_.__name__) if registry else []


def _load(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SettingsError(f"WORKER_MODELS: expected package.module:Base, got {spec!r}")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as error:
        raise SettingsError(f"WORKER_MODELS: cannot load {spec!r}: {error}") from None
    return found


def _rules(
    table: sa.Table, readonly: set[tuple[str, str]], keys: set[tuple[str, str]]
) -> TableRules:
    columns = {column.name: column for column in table.columns}
    primary_key = tuple(column.name for column in table.primary_key.columns)
    locked = {name for name in columns if (table.fullname, name) in readonly}
    locked |= {name for name in primary_key if (table.fullname, name) not in keys}
    return TableRules(
        table=table,
        columns=columns,
        writable=frozenset(columns.keys() - locked),
        primary_key=primary_key,
    )


def _qualified_columns(
    variable: str, names: Sequence[str], available: Mapping[str, sa.Table]
) -> set[tuple[str, str]]:
    result = set()
    for name in names:
        table_name, _, column_name = name.rpartition(".")
        table = available.get(table_name)
        if table is None or column_name not in {column.name for column in table.columns}:
            raise SettingsError(f"{variable}: no such column {name!r} (expected table.column)")
        result.add((table_name, column_name))
    return result
