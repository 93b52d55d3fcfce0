"""The filter language of DESIGN.md §3, parsed once into a small typed tree.

``{"genre": "fiction", "book_price": {"lt": 100}}`` becomes
``AllOf((Compare("genre", "eq", "fiction"), Compare("book_price", "lt", 100)))``.
Column names are kept as plain strings here; the compiler resolves them against the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, cast, get_args

Operator = Literal[
    "eq", "neq", "gt", "gte", "lt", "lte", "in", "nin",
    "like", "nlike", "ilike", "nilike", "is_null", "between",
]  # fmt: skip
OPERATORS: Final = frozenset(get_args(Operator))
_LIST_OPERATORS: Final = frozenset({"in", "nin"})
_PATTERN_OPERATORS: Final = frozenset({"like", "nlike", "ilike", "nilike"})
_ORDERED_OPERATORS: Final = frozenset({"gt", "gte", "lt", "lte"})

MAX_DEPTH: Final = 32
MAX_IN_VALUES: Final = 10_000


@dataclass(frozen=True, slots=True)
class Compare:
    column: str
    op: Operator
    value: Any


@dataclass(frozen=True, slots=True)
class AllOf:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Negate:
    part: Filter


Filter = Compare | AllOf | AnyOf | Negate


def parse_where(raw: Any) -> Filter | None:
    """Parse a job's ``where``. ``{}`` means no filter at all (DESIGN.md §3).

    Raises ``ValueError`` with a message fit for an ``invalid_job`` reply.
    """
    if raw is None or raw == {}:
        return None
    return _parse(raw, depth=1)


def columns_of(node: Filter) -> set[str]:
    """Every column a filter mentions."""
    if isinstance(node, Compare):
        return {node.column}
    if isinstance(node, Negate):
        return columns_of(node.part)
    return set().union(*(columns_of(part) for part in node.parts))


def _parse(raw: Any, *, depth: int) -> Filter:
    if depth > MAX_DEPTH:
        raise ValueError(f"filter nests deeper than the limit of {MAX_DEPTH} levels")
    if not isinstance(raw, dict):
        raise ValueError(f"a filter must be an object, got {_json_kind(raw)}")
    if not raw:
        # Only the whole `where` may be empty; a nested {} would silently match every row.
        raise ValueError("an empty filter is only allowed as the whole `where`")
    parts = [_parse_entry(key, value, depth=depth) for key, value in raw.items()]
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _parse_entry(key: str, value: Any, *, depth: int) -> Filter:
    if key in ("and", "or"):
        if not isinstance(value, list) or not value:
            raise ValueError(f"`{key}` takes a non-empty list of filters")
        parts = tuple(_parse(item, depth=depth + 1) for item in value)
        return AllOf(parts) if key == "and" else AnyOf(parts)
    if key == "not":
        return Negate(_parse(value, depth=depth + 1))
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"column `{key}`: an operator object needs at least one operator")
        comparisons = tuple(_parse_operator(key, op, operand) for op, operand in value.items())
        return comparisons[0] if len(comparisons) == 1 else AllOf(comparisons)
    if value is None:
        return Compare(key, "is_null", True)
    return Compare(key, "eq", _scalar(key, "eq", value))


def _parse_operator(column: str, name: str, operand: Any) -> Compare:
    if name not in OPERATORS:
        known = " ".join(sorted(OPERATORS))
        raise ValueError(f"column `{column}`: unknown operator `{name}` (known: {known})")
    op = cast(Operator, name)
    if op in _LIST_OPERATORS:
        if not isinstance(operand, list):
            raise ValueError(f"column `{column}`: `{op}` takes a list")
        if len(operand) > MAX_IN_VALUES:
            raise ValueError(
                f"column `{column}`: `{op}` has {len(operand)} values, over the limit of "
                f"{MAX_IN_VALUES}"
            )
        return Compare(column, op, tuple(_scalar(column, op, item) for item in operand))
    if op == "between":
        if not isinstance(operand, list) or len(operand) != 2:
            raise ValueError(f"column `{column}`: `between` takes [low, high]")
        low, high = (_scalar(column, op, item) for item in operand)
        if low is None or high is None:
            raise ValueError(f"column `{column}`: `between` bounds cannot be null")
        return Compare(column, "between", (low, high))
    if op == "is_null":
        if not isinstance(operand, bool):
            raise ValueError(f"column `{column}`: `is_null` takes true or false")
        return Compare(column, "is_null", operand)
    if op in _PATTERN_OPERATORS and not isinstance(operand, str):
        raise ValueError(f"column `{column}`: `{op}` takes a string pattern")
    if op in _ORDERED_OPERATORS and operand is None:
        raise ValueError(f"column `{column}`: `{op}` cannot compare with null")
    if op in ("eq", "neq"):
        return Compare(column, op, operand)  # JSON columns may compare whole objects
    return Compare(column, op, _scalar(column, op, operand))


def _scalar(column: str, op: str, value: Any) -> Any:
    if isinstance(value, dict | list):
        raise ValueError(f"column `{column}`: `{op}` takes scalar values, got {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")


FILTER_JSON_SCHEMA: Final[dict[str, Any]] = {
    "description": (
        "Keys are columns (combined with AND) or `and`/`or` (non-empty lists) and `not`. "
        "A column maps to a value (equality; null means IS NULL) or to an object of operators."
    ),
    "type": "object",
    "properties": {
        "and": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Filter"}},
        "or": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/Filter"}},
        "not": {"$ref": "#/$defs/Filter"},
    },
    "additionalProperties": {
        "anyOf": [
            {"type": ["string", "number", "boolean", "null"]},
            {
                "type": "object",
                "minProperties": 1,
                "propertyNames": {"enum": sorted(OPERATORS)},
                "properties": {
                    "in": {"type": "array", "maxItems": MAX_IN_VALUES},
                    "nin": {"type": "array", "maxItems": MAX_IN_VALUES},
                    "between": {"type": "array", "minItems": 2, "maxItems": 2},
                    "is_null": {"type": "boolean"},
                    "like": {"type": "string"},
                    "nlike": {"type": "string"},
                    "ilike": {"type": "string"},
                    "nilike": {"type": "string"},
                },
            },
        ]
    },
}
