"""A job from ``update-worker submit``'s arguments: JSON, or the ``--table/--set`` shorthand.

Shorthand values follow the column's type: ``--set name=123`` on a text column sends the text
``"123"``, on an integer column the number 123. A value is read as JSON when it parses (``30``,
``true``, ``null``, ``"quoted"``) and as plain text when not; on a text column a number or a
boolean stays the text it was typed as. The column types come from the deployment's schema
(``WORKER_MODELS``, else the database), read only when a value is ambiguous. JSON jobs keep
the strict rule: a JSON number for a text column is ``data_error``.

The flags that are about the sending (``--id``, ``--dry-run``) apply to a JSON job too; flags
that would rewrite a JSON job's content (``--table``, ``--set`` ...) are refused with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Final

import sqlalchemy as sa

from worker.db.engine import create_engine
from worker.db.schema import load_models
from worker.errors import SettingsError
from worker.settings import Settings

_PAIRS: Final = ("set", "inc", "where", "key")
#: Shorthand-only flags: they build a job, so they cannot go with a JSON job or a file.
_BUILDING: Final = ("table", *_PAIRS, "returning", "all")


def job_from_args(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The job that ``submit``'s arguments describe; :class:`SettingsError` for a bad mix."""
    building = [f"--{name}" for name in _BUILDING if getattr(args, name)]
    if args.job is not None:
        if building:
            raise SettingsError(f"submit: {', '.join(building)} cannot be combined with a JSON "
                                "job; put those fields in the JSON")  # fmt: skip
        job = _json_job(args.job)
    elif args.table:
        job = _shorthand_job(settings, args)
    else:
        raise SettingsError("submit: give a job as JSON, or --table with --set/--inc")
    if args.id is not None:
        if job.get("id", args.id) != args.id:
            raise SettingsError(f"submit: --id {args.id!r} differs from the job's id "
                                f"{job['id']!r}")  # fmt: skip
        job["id"] = args.id
    if args.dry_run:
        job["dry_run"] = True
    return job


def _json_job(text: str) -> dict[str, Any]:
    try:
        job = json.loads(text)
    except json.JSONDecodeError as error:
        raise SettingsError(f"job: not JSON: {error}") from None
    if not isinstance(job, dict):
        raise SettingsError("job: must be a JSON object")
    return job


def _shorthand_job(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    table: str = args.table
    pairs = {field: [_split(field, text) for text in getattr(args, field) or ()]
             for field in _PAIRS}  # fmt: skip
    ambiguous = any(
        isinstance(_json(raw), int | float | bool) for items in pairs.values() for _, raw in items
    )
    text_columns = _text_columns(settings, table) if ambiguous else frozenset()
    job: dict[str, Any] = {"table": table}
    for field, items in pairs.items():
        if items:
            job[field] = {name: _value(raw, text=name in text_columns) for name, raw in items}
    if args.returning:
        job["returning"] = args.returning
    if args.all:
        job["all"] = True
    return job


def _split(field: str, text: str) -> tuple[str, str]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise SettingsError(f"--{field}: expected column=value, got {text!r}")
    return name, raw


_NOT_JSON: Final = object()


def _json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return _NOT_JSON


def _value(raw: str, *, text: bool) -> Any:
    """``raw`` as JSON when it parses, else as text; a number or boolean for a text column
    stays the text it was typed as."""
    value = _json(raw)
    if value is _NOT_JSON or (text and isinstance(value, int | float | bool)):
        return raw
    return value


def _text_columns(settings: Settings, table: str) -> frozenset[str]:
    """The text columns of ``table`` in the deployment's schema; with a note on stderr, none
    when the schema cannot be read (the values are then read as JSON)."""
    try:
        if settings.models:
            columns = _model_columns(settings.models, table)
        else:
            columns = asyncio.run(_reflected_columns(settings.database_url, table))
    except Exception as error:  # noqa: BLE001 - any failure means: fall back, and say so
        print(f"update-worker: note: column types of `{table}` unknown ({type(error).__name__}: "
              f"{str(error).splitlines()[0] if str(error) else ''}); values are read as JSON",
              file=sys.stderr)  # fmt: skip
        return frozenset()
    return frozenset(name for name, kind in columns.items() if isinstance(kind, sa.String))


def _model_columns(spec: str, table: str) -> dict[str, Any]:
    found = load_models(spec).tables.get(table)
    if found is None:
        raise LookupError(f"no table {table!r} in {spec}")
    return {column.name: column.type for column in found.columns}


async def _reflected_columns(database_url: str, table: str) -> dict[str, Any]:
    schema, _, name = table.rpartition(".")
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            columns = await connection.run_sync(
                lambda sync: sa.inspect(sync).get_columns(name, schema=schema or None)
            )
    finally:
        await engine.dispose()
    if not columns:
        raise LookupError(f"no table {table!r}")
    return {column["name"]: column["type"] for column in columns}
