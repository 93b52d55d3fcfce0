"""One-row-by-key updates, compiled once per shape of job.

Jobs of one shape (the same table, ``set``, ``inc`` and ``key`` column names, ``returning``
and ``expect``) differ only in their values. Once a first job of a shape has compiled, its
table, columns and key are known to be valid, and its statement is cached
(``compiler._by_key``): the next jobs of that shape only coerce and bind their values, with
the same checks and the same errors as a fresh compile. That was most of a job's compile time.

Bounded: a producer that sends ever new shapes empties the cache now and then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from worker.errors import InvalidJob
from worker.job.models import UpdateSpec
from worker.job.plans import Statement
from worker.job.values import coercer

if TYPE_CHECKING:
    from worker.db.schema import TableRules
    from worker.job.plans import Policy

_MOST: Final = 4096

#: (parameter, the column's coercer) by job field name: the column's type is looked at once
#: per shape, not once per value.
_Bound = Mapping[str, tuple[str, Callable[[Any], Any]]]


@dataclass(frozen=True, slots=True)
class _Shape:
    rules: TableRules
    sets: _Bound
    incs: _Bound
    keys: _Bound
    #: The parameters of the key, in primary-key order: the statement's ``row``.
    key_params: tuple[str, ...]
    #: The first job's statement: every field but ``row`` and ``params`` is the shape's.
    model: Statement

    def bind(self, spec: UpdateSpec) -> Statement:
        params = {param: convert(spec.values[name])
                  for name, (param, convert) in self.sets.items()}  # fmt: skip
        params |= {param: convert(spec.inc[name])
                   for name, (param, convert) in self.incs.items()}  # fmt: skip
        for name, value in (spec.key or {}).items():  # in the job's order, as a fresh compile
            if value is None:
                raise InvalidJob(f"`key` value for `{name}` cannot be null")
            param, convert = self.keys[name]
            params[param] = convert(value)
        model = self.model
        return Statement(model.table, model.update, model.returns_rows, model.guards,
                         row=(spec.table, *(params[param] for param in self.key_params)),
                         params=params, shape=model.shape)  # fmt: skip


_known: dict[tuple[Any, ...], _Shape] = {}


def known(spec: UpdateSpec, rules: TableRules, policy: Policy) -> Statement | None:
    """The statement of ``spec`` when a job of its shape compiled before, else None."""
    shape = _known.get(_key(spec, rules, policy))
    if shape is None or shape.rules is not rules:
        return None
    return shape.bind(spec)


def remember(
    spec: UpdateSpec, rules: TableRules, policy: Policy, statement: Statement
) -> Statement:
    """Keep the shape of ``spec``, a by-key job just compiled to ``statement``; returns it."""
    if statement.shape is None:
        return statement
    _, sets, incs, keys, _ = statement.shape

    def bound(prefix: str, names: tuple[str, ...]) -> dict[str, tuple[str, Callable[[Any], Any]]]:
        return {name: (f"{prefix}{index}", coercer(rules.columns[name]))
                for index, name in enumerate(names)}  # fmt: skip

    if len(_known) >= _MOST:
        _known.clear()
    by_key = bound("k", keys)
    _known[_key(spec, rules, policy)] = _Shape(
        rules, bound("s", sets), bound("i", incs), by_key,
        tuple(by_key[name][0] for name in keys), statement,
    )  # fmt: skip
    return statement


def _key(spec: UpdateSpec, rules: TableRules, policy: Policy) -> tuple[Any, ...]:
    expect = spec.expect
    limits = None if expect is None else (expect.rows, expect.min_rows, expect.max_rows)
    # id(rules): TableRules holds mappings, so it does not hash; `known` checks it is the same.
    return (id(rules), policy, tuple(spec.values), tuple(spec.inc), tuple(spec.key or ()),
            tuple(spec.returning), limits)  # fmt: skip
